"""benchmarks/gpu_check.sh end to end on the CPU (--tiny), so the first GPU run is not its first run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow  # ~80 s on 2 shared cores: 12 timed sampler rows, the stock pipeline, a Ray build
def test_gpu_check_tiny_prints_one_json_line_with_every_figure():
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run([str(ROOT / "benchmarks" / "gpu_check.sh"), "--tiny"], capture_output=True, text=True,
                          env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1, proc.stdout[-2000:]
    out = json.loads(lines[0])
    assert out["tiny"] is True and out["skipped"] == []
    combos = {(r["dtype"], r["mode"], r["batch"]) for r in out["maugen"] if r.get("images_per_s", 0) > 0}
    assert combos == {(d, m, b) for d in ("fp16", "bf16") for m in ("eager", "compiled") for b in (1, 2, "auto")}
    assert [r["batch"] for r in out["stock_inpaint"]] == [1, 2] and out["maugen_best_over_stock_best"] > 0
    for d in ("fp16", "bf16"):
        agree = out[f"compiled_vs_eager_{d}"]
        assert agree["intensity_rounded_equal_share"] == 1.0 and agree["occurrence_prob_max_abs_diff"] < 1e-3
    build = out["mifa_build"]
    assert build["rc"] == 0 and build["kept"] > 0 and build["runner"] == "ray"
    assert 0 < build["generator_busy"] <= 1 and build["workers"][0]["busy_seconds"] > 0
    assert "peak_gib_overall" in out
