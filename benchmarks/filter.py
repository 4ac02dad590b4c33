"""Filter-stage throughput on CPU (faces/s with all three judges) and the time of a threshold-only re-filter.

    python benchmarks/filter.py [--identities 16] [--per-identity 8] [--resolution 128]

It writes a teacher data set (real-looking procedural faces) without judges, then times (1) the filter stage
with YuNet + SFace + MediaPipe over every sample, in one process, model loading excluded and included, and
(2) `mifa filter` changing only a threshold. Prints every figure, and last one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from mifa_pipeline.config import load_manifest
from mifa_pipeline.judging import Judges, judge_specs
from mifa_pipeline.refilter import prepare_refilter, run_refilter
from mifa_pipeline.runner import build_data, prepare
from mifa_pipeline.stages.filter import Filtering
from mifa_pipeline.work import BuildWorker

JUDGED = ["filter.face.detector=yunet", "filter.identity.embedder=sface", "filter.au.estimator=mediapipe"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--identities", type=int, default=16)
    parser.add_argument("--per-identity", type=int, default=8)
    parser.add_argument("--resolution", type=int, default=128)
    args = parser.parse_args()
    base = ["model.checkpoint=teacher", f"sampler.resolution={args.resolution}",
            f"identities.count={args.identities}", f"identities.samples_per_identity={args.per_identity}",
            "resources.identities_per_unit=4"]
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # 1. the filter stage alone, on generated units held in memory
        m = load_manifest(None, [*base, *JUDGED], output=Path(tmp) / "judged")
        worker = BuildWorker(m, str(Path(tmp) / "unused"), "")
        resolution = worker.setup()
        states = []  # (samples, people) per identity block, generated in memory
        for block in prepare(m).plan.blocks:
            people, _ = worker.identities.run([worker.prompts.identity(i) for i in block.identities])
            samples = [s for p in people for s in worker.prompts.samples(p)]
            samples, _ = worker.generation.run(samples, {p.identity: p for p in people})
            states.append((samples, {p.identity: p for p in people}))
        n = sum(len(s) for s, _ in states)
        start = time.perf_counter()
        judges = Judges(m.filter, judge_specs(m.filter))
        load = time.perf_counter() - start
        stage = Filtering(m.filter, resolution, judges)
        start = time.perf_counter()
        for samples, people in states:
            stage.run(samples, people)
        seconds = time.perf_counter() - start
        judges.close()
        figures.update(filter_samples=n, filter_model_load_s=round(load, 3), filter_seconds=round(seconds, 3),
                       filter_faces_per_s=round(n / seconds, 2), filter_faces_per_s_with_load=round(n / (seconds + load), 2))
        print(f"filter stage (YuNet + SFace + MediaPipe, 1 process, {args.resolution}px): {n} samples in {seconds:.2f} s "
              f"= {n / seconds:.1f} faces/s; model load {load:.2f} s")

        # 2. a judged build, then a threshold-only re-filter of it
        parent = Path(tmp) / "v1"
        build_m = load_manifest(None, [*base, *JUDGED], output=parent)
        start = time.perf_counter()
        build_data(prepare(build_m), "local", progress=False)
        figures["judged_build_local_s"] = round(time.perf_counter() - start, 2)
        start = time.perf_counter()
        result = run_refilter(prepare_refilter(parent, ["filter.identity.min_cosine=0.8"], Path(tmp) / "v2"),
                              "local", progress=False)
        refilter_s = time.perf_counter() - start
        c = result.manifest
        figures.update(refilter_threshold_only_s=round(refilter_s, 3), refilter_kept=c["counts"]["kept_samples"],
                       refilter_rescored=len(c["stages"]["filter"]["rescored_judges"]))
        print(f"judged build (teacher + filter + shards, local runner): {figures['judged_build_local_s']} s")
        print(f"threshold-only re-filter of {n} samples: {refilter_s:.2f} s, judges re-run: "
              f"{c['stages']['filter']['rescored_judges'] or 'none'}, kept {c['counts']['kept_samples']}/{n}")
    cos = [s.scores.get("identity_cosine") for samples, _ in states for s in samples]
    figures["identity_cosine_mean"] = round(float(np.mean([c for c in cos if c is not None])), 4)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
