"""scripts/train-demo-gpu.sh, the 128 px recipe for a GPU machine: its stages in order, and a second run after a
cut continues instead of starting over (a GPU lease is short). A stand-in `mifa` records each call, so this
checks the script's wiring; the commands it calls are tested on their own in test_training.py."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train-demo-gpu.sh"

FAKE_MIFA = r"""#!/usr/bin/env bash
echo "$*" >> "$CALLS"
case "$1" in
  teacher) mkdir -p "$2" ;;
  train)
    out=""; prev=""
    for a in "$@"; do [ "$prev" = "--out" ] && out=$a; prev=$a; done
    mkdir -p "$out"; touch "$out/train_log.jsonl"
    [ -n "$FAIL_UNET" ] && [[ "$out" == */unet ]] && exit 3
    mkdir -p "$out/model" && echo {} > "$out/model/maugen_config.json" ;;
  model) mkdir -p "$4" ;;
esac
"""


def run_script(tmp_path: Path, **env) -> tuple[int, list[str]]:
    fake = tmp_path / "mifa"
    fake.write_text(FAKE_MIFA)
    fake.chmod(0o755)
    calls = tmp_path / "calls.txt"
    calls.write_text("")
    full = {**os.environ, "MIFA": str(fake), "CALLS": str(calls), "SETS": "3", "IDENTITIES": "5", **env}
    proc = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "work")], env=full, capture_output=True, text=True)
    return proc.returncode, calls.read_text().splitlines()


def test_renders_then_trains_vae_then_moves_the_model_to_it(tmp_path):
    rc, calls = run_script(tmp_path)
    assert rc == 0
    work = tmp_path / "work"
    teacher = [c for c in calls if c.startswith("teacher ")]
    assert len(teacher) == 4  # three training sets and the held-out one
    assert all("--resolution 128" in c for c in teacher)
    seeds = sorted(c.split("--set seed=")[1].split()[0] for c in teacher)
    assert seeds == ["1", "100", "101", "102"]
    vae, unet = [c for c in calls if c.startswith("train ")]
    assert "--steps 0" in vae and "--resume" not in vae and "--init" not in vae
    assert f"--vae {work}/vae/model" in unet and "--init " in unet and "--max-time 300" in unet
    assert all(f"{work}/teacher/s{k}" in unet for k in range(3))
    assert calls[-1] == f"model store-half {work}/unet/model {work}/half"


def test_a_second_run_after_a_cut_keeps_the_vae_and_resumes_the_unet(tmp_path):
    rc, _ = run_script(tmp_path, FAIL_UNET="1")
    assert rc != 0  # the cut UNet run stops the script before store-half
    rc, calls = run_script(tmp_path)
    assert rc == 0
    train = [c for c in calls if c.startswith("train ")]
    assert len(train) == 1 and "--out" in train[0] and train[0].split("--out ")[1].startswith(str(tmp_path / "work" / "unet"))
    assert "--resume" in train[0]
    rc, calls = run_script(tmp_path)
    assert rc == 0 and not [c for c in calls if c.startswith(("train ", "model "))]  # all done: nothing retrained
