"""End-to-end build throughput through Ray, and how busy the pipeline keeps the generation workers.

    python benchmarks/pipeline.py [MANIFEST] [--set key=value ...] [--standin SECONDS] [--compare-local]
    # on a GPU machine, e.g.:
    python benchmarks/pipeline.py manifests/demo.yaml --set model.checkpoint=/models/maugen \\
        --set sampler.batch_invariant=false --set sampler.batch_size=16 --set sampler.dtype=float16 \\
        --set resources.gpus_per_worker=1 --set identities.count=64
    # on a CPU, a generator that behaves like a GPU (fixed seconds per batch) and the real judges:
    python benchmarks/pipeline.py --standin 1.0 --compare-local --set identities.count=64

"Generator busy" is the time the generation workers spent inside generation (sampling, synchronised by copying
results to the host) over wall time x workers: the share of the build during which the GPU had work, from the
run manifest's `generation_last_run` (per worker; "after warm-up" leaves out each worker's first shard, which
waits for the model load and has nothing to overlap with). `--standin SECONDS`: the generator is
benchmarks/standin.py, which sleeps SECONDS per batch (GIL released, as while a GPU computes) and returns the
reference faces, so judging, encoding and writing are the real ones: the figure then shows whether the CPU work
keeps up with a GPU of that speed. `--compare-local`: the same build with `--runner local` first (its generator's
busy share too), and the Ray wall time over the local one. Prints every figure, last one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from mifa_pipeline.config import load_manifest
from mifa_pipeline.ray_executor import start_ray
from mifa_pipeline.runner import build_data, prepare

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # `python benchmarks/pipeline.py` from a checkout: benchmarks.standin importable


def build(manifest_path: str, overrides: list[str], out: Path, runner: str) -> tuple[float, dict, object]:
    m = load_manifest(manifest_path, overrides, output=out)
    start = time.perf_counter()
    result = build_data(prepare(m), runner, progress=False)  # includes loading the model in each worker
    return time.perf_counter() - start, result.manifest, m


def start_ray_with(standin: float | None) -> None:
    if standin is None:
        start_ray(None)
        return
    import ray

    from benchmarks.standin import ENV

    ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False,
             runtime_env={"worker_process_setup_hook": "benchmarks.standin.install",
                          "env_vars": {ENV: str(standin), "PYTHONPATH": os.pathsep.join(
                              [str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default="manifests/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--standin", type=float, default=None, metavar="SECONDS",
                        help="stand-in generator with this fixed latency per batch (a GPU stand-in; real judges)")
    parser.add_argument("--compare-local", action="store_true", help="also build with --runner local; print Ray/local")
    args = parser.parse_args()
    load = os.getloadavg()
    figures: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        if args.standin is not None:
            from benchmarks.standin import install

            install(args.standin)  # this process (the local runner); Ray workers get it from their setup hook
        if args.compare_local:
            local_wall, local, _ = build(args.manifest, args.overrides, Path(tmp) / "local", "local")
            figures["local_wall_s"] = round(local_wall, 2)
            figures["local_generator_busy"] = local["generation_last_run"]["busy_share_of_wall"]
        start = time.perf_counter()
        start_ray_with(args.standin)  # started here so that its start-up is reported apart from the build
        ray_start = time.perf_counter() - start
        wall, c, m = build(args.manifest, args.overrides, Path(tmp) / "out", "ray")
    stages = c["stages"]
    gen = c["generation_last_run"]
    workers = gen["workers"]
    after = [w["busy_share_after_first_shard"] for w in workers if w["busy_share_after_first_shard"] is not None]
    samples = stages["generate"]["out"]
    figures = {
        "samples": samples, "kept": c["counts"]["kept_samples"], "wall_s": round(wall, 2), "ray_start_s": round(ray_start, 2),
        **figures, "images_per_s": round(samples / wall, 3), "workers": len(workers),
        "generator_busy": gen["busy_share_of_wall"],
        "generator_busy_after_warmup": round(min(after), 4) if after else None,
        "standin_s_per_batch": args.standin, "shards": len(c["shards"]),
        "resolution": m.sampler.resolution, "steps": m.sampler.steps, "batch_size": m.sampler.batch_size,
        "batch_invariant": m.sampler.batch_invariant, "dtype": m.sampler.dtype, "model": c["model"],
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()}, "load_avg_at_start": [round(x, 2) for x in load],
        "cpus": os.cpu_count(),
    }
    if "local_wall_s" in figures:
        figures["ray_over_local"] = round(wall / figures["local_wall_s"], 3)
    print(f"{samples} samples in {wall:.1f} s = {samples / wall:.2f} images/s with labels; generation workers busy "
          f"{gen['busy_share_of_wall']:.0%} of the wall time ({len(workers)} worker(s)), "
          f"{figures['generator_busy_after_warmup'] or 0:.0%} after warm-up (the least busy worker)")
    if "ray_over_local" in figures:
        print(f"Ray {wall:.1f} s / local {figures['local_wall_s']:.1f} s = {figures['ray_over_local']:.2f}; the local "
              f"generator busy {figures['local_generator_busy']:.0%} of its wall time")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
