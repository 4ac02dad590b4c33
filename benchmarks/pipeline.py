"""End-to-end build throughput through Ray, and how busy the pipeline keeps the generation workers.

    python benchmarks/pipeline.py [MANIFEST] [--set key=value ...]
    # on a GPU machine, e.g.:
    python benchmarks/pipeline.py manifests/demo.yaml --set model.checkpoint=/models/maugen \\
        --set sampler.batch_invariant=false --set sampler.batch_size=16 --set sampler.dtype=float16 \\
        --set resources.gpus_per_worker=1 --set identities.count=64

"Generator busy" is the time the generation workers spent inside the generation stage (identities +
sampling, synchronised by copying results to the host) divided by wall time x workers: the share of the
build during which the GPU had work, measured from the run manifest. Prints every figure, last one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from mifa_pipeline.config import load_manifest
from mifa_pipeline.ray_executor import start_ray
from mifa_pipeline.runner import build_data, prepare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", nargs="?", default="manifests/demo.yaml")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        m = load_manifest(args.manifest, args.overrides, output=Path(tmp) / "out")
        start = time.perf_counter()
        start_ray(None)  # started here so that its start-up is reported apart from the build
        ray_start = time.perf_counter() - start
        start = time.perf_counter()
        result = build_data(prepare(m), "ray", progress=False)  # includes loading the model in each worker
        wall = time.perf_counter() - start
    c = result.manifest
    stages = c["stages"]
    workers = m.resources.generation_workers
    busy = (stages["identities"]["seconds"] + stages["generate"]["seconds"]) / (wall * workers)
    samples = stages["generate"]["out"]
    figures = {
        "samples": samples, "kept": c["counts"]["kept_samples"], "wall_s": round(wall, 2), "ray_start_s": round(ray_start, 2),
        "images_per_s": round(samples / wall, 3), "generator_busy": round(busy, 3), "workers": workers,
        "resolution": m.sampler.resolution, "steps": m.sampler.steps, "batch_size": m.sampler.batch_size,
        "batch_invariant": m.sampler.batch_invariant, "dtype": m.sampler.dtype, "model": c["model"],
        "stage_seconds": {k: v["seconds"] for k, v in stages.items()},
    }
    print(f"{samples} samples in {wall:.1f} s = {samples / wall:.2f} images/s with labels; "
          f"generation workers busy {busy:.0%} of the wall time ({workers} worker(s))")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
