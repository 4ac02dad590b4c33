"""The data path at scale: what the driver carries, how its memory grows, and what the plumbing costs.

    python benchmarks/scale.py                      # N = 1,024 / 8,192 / 32,768, local and Ray, then the re-filter
    python benchmarks/scale.py --n 1024 --executors local --no-refilter --no-duplicates
    python benchmarks/scale.py --demo-before f6d39d6  # also the demo build (judges on), that commit vs this checkout
    python benchmarks/scale.py --n --no-duplicates --demo-before f6d39d6   # the demo comparison alone
    python benchmarks/scale.py --n --no-refilter --no-duplicates --storage 4096   # S3 and a 3-node cluster
    python benchmarks/scale.py --n 8192 --executors local --no-refilter --no-duplicates --overlap  # + overlap

Each build runs in a fresh child process (so its peak RSS is the driver's own: with the local executor the
driver is also the worker) with the teacher renderer as a fast generator at 64 px and the judges off. Per N
it prints ms/sample, the driver's peak RSS and CPU time per sample (with Ray: its scheduling alone; local:
all the work), the bytes the driver received per sample (pickled results), and the plumbing (local only:
wall time less the generator's and the filter's own seconds, i.e. scheduling, writing tars, sidecars, scores
tables and done records, hashing) and the write stage alone against a floor measured in the same child: the
same member bytes written by one `webdataset.TarWriter`. For those figures the local worker runs one call at a
time (its stages' seconds would otherwise include the wait for the other thread); `--overlap` also times the
largest local build as a user runs it, generating a shard while the one before is judged and written. Then a
threshold-only `mifa filter` of the largest build against `cp` of its tars (three rounds each, in turn;
medians), its decision pass alone, and the duplicate search over 1M random 128-d identities. `--storage N`
builds N samples to a real S3 server (SeaweedFS, started here) and on a simulated 3-node Ray cluster
(ray.cluster_utils: a head and two nodes with one fake GPU each) to S3 and to a local folder, each against
the same build on a local folder, with the bytes the driver received.
Every figure is printed; the last line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GENERATOR_STAGES = ("prompts", "identities", "duplicates", "generate", "filter")


def _members(tar: Path):
    with tarfile.open(tar) as t:
        for info in t:
            yield info.name, t.extractfile(info).read()


def floor_seconds(out: Path) -> float:
    """One process writing the build's member bytes with webdataset.TarWriter (reading them is not timed)."""
    import webdataset as wds

    spent = 0.0
    with open(os.devnull, "wb") as sink, tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        target = Path(tmp) / "floor.tar"
        with open(target, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=946684800)
            for tar in sorted(out.glob("*.tar")):
                samples: dict[str, dict[str, bytes]] = {}
                for name, data in _members(tar):
                    key, _, ext = name.partition(".")
                    samples.setdefault(key, {"__key__": key})[ext] = data
                start = time.perf_counter()
                for sample in samples.values():
                    writer.write(sample)
                stream.flush()
                os.fsync(stream.fileno())
                spent += time.perf_counter() - start
            writer.close()
        del sink
    return spent


def child(args: argparse.Namespace) -> None:
    """One build (as a user's driver process runs it), then its floor; prints one JSON line."""
    from mifa_pipeline.config import load_manifest
    from mifa_pipeline.runner import build_data, prepare

    n = args.n
    per = 8
    sets = ["model.checkpoint=teacher", f"sampler.resolution={args.resolution}", f"identities.count={n // per}",
            f"identities.samples_per_identity={per}", "writer.samples_per_shard=1024", "resources.identities_per_unit=64",
            "filter.face.detector=none", "filter.identity.embedder=none", "filter.au.estimator=none",
            "resources.cpus_per_worker=1", "resources.filter_cpus=0.5"]
    if args.ray_address:  # the simulated cluster: two generation workers, one per fake-GPU node
        sets += ["resources.generation_workers=2", "resources.gpus_per_worker=1", "resources.cpus_per_worker=0.5",
                 "resources.filter_cpus=0.25"]
    m = load_manifest(None, sets, output=args.out)
    if args.executor == "local" and not args.overlap:  # one call at a time: stage seconds are the stage's own
        from dataclasses import replace

        from mifa_pipeline.runner import BuildJob

        spec = BuildJob.worker_spec
        BuildJob.worker_spec = lambda self, executor: replace(spec(self, executor), concurrency=1)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    result = build_data(prepare(m), args.executor, progress=False, ray_address=args.ray_address)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    driver_cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    c = result.manifest
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    generator = sum(c["stages"][s]["seconds"] for s in GENERATOR_STAGES if s in c["stages"])
    workers = m.resources.generation_workers
    # Local: one thread does everything, so the wall time less the stages' own seconds is the plumbing. Ray
    # overlaps a worker's generation with its judging and writing, so that difference means nothing there.
    plumbing = wall - generator / workers if args.executor == "local" and not args.overlap else None
    floor = None if "://" in args.out else floor_seconds(Path(args.out))
    print(json.dumps({
        "executor": args.executor, "n": n, "kept": c["counts"]["kept_samples"], "wall_s": round(wall, 2),
        "ms_per_sample": round(1000 * wall / n, 3), "driver_peak_rss_mb": round(peak_mb, 1),
        "driver_bytes_per_sample": round(c["driver_received_bytes_last_run"] / n, 2),
        "driver_cpu_ms_per_sample": round(1000 * driver_cpu / n, 4),
        "generator_and_filter_s": round(generator, 2), "write_stage_s": c["stages"]["write"]["seconds"],
        "plumbing_ms_per_sample": None if plumbing is None else round(1000 * plumbing / n, 3),
        "floor_ms_per_sample": None if floor is None else round(1000 * floor / n, 3),
        "plumbing_over_floor": None if plumbing is None or not floor else round(plumbing / floor, 2),
        "write_stage_over_floor": round(c["stages"]["write"]["seconds"] / floor, 2) if floor else None,
        "tar_bytes": sum(s["bytes"] for s in c["shards"]),
    }))


def run_child(n: int, executor: str, out: Path | str, resolution: int, ray_address: str | None = None,
              overlap: bool = False) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", "--n", str(n), "--executor", executor, "--out", str(out),
                           "--resolution", str(resolution), *(["--ray-address", ray_address] if ray_address else []),
                           *(["--overlap"] if overlap else [])],
                          cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"child build failed ({executor}, N={n}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def refilter_figures(parent: Path, work: Path, rounds: int = 3) -> dict:
    """A threshold-only re-filter of `parent` against cp of its tars, `rounds` times each in turn (each followed by
    sync, into a fresh folder), with medians; its decision pass alone (the filter stage's seconds in the new
    version's run manifest: each scores table read, proven and decided)."""
    import statistics

    from mifa_pipeline.refilter import prepare_refilter, run_refilter

    cps, refilters = [], []
    for i in range(rounds):
        copy = work / f"cp{i}"
        copy.mkdir()
        subprocess.run(["sync"], check=True)
        start = time.perf_counter()
        subprocess.run(["cp", *[str(p) for p in sorted(parent.glob("*.tar"))], str(copy)], check=True)
        subprocess.run(["sync"], check=True)
        cps.append(time.perf_counter() - start)
        start = time.perf_counter()
        result = run_refilter(prepare_refilter(parent, ["filter.min_pixel_std=20"], work / f"v2-{i}"), "local",
                              progress=False)
        subprocess.run(["sync"], check=True)
        refilters.append(time.perf_counter() - start)
        if i + 1 < rounds:  # each round starts from the same disk: the last round's copies go
            shutil.rmtree(copy)
            shutil.rmtree(work / f"v2-{i}")
    cp_s, refilter_s = statistics.median(cps), statistics.median(refilters)
    # the decision pass as the re-filter ran it: reading and proving each scores table, deciding every row
    decide_s = result.manifest["stages"]["filter"]["seconds"]
    rows = result.manifest["stages"]["duplicates"]["in"]  # every planned sample
    return {"refilter_s": round(refilter_s, 2), "cp_tars_s": round(cp_s, 2), "refilter_over_cp": round(refilter_s / cp_s, 2),
            "refilter_rounds_s": [round(x, 3) for x in refilters], "cp_rounds_s": [round(x, 3) for x in cps],
            "refilter_kept": result.manifest["counts"]["kept_samples"], "decision_rows": rows,
            "decision_s_per_100k": round(decide_s * 100_000 / rows, 2)}


def duplicate_figures(n: int = 1_000_000, dim: int = 128) -> dict:
    import numpy as np

    from mifa_pipeline.duplicates import nearest_earlier

    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    start = time.perf_counter()
    nearest = nearest_earlier(x)
    seconds = time.perf_counter() - start
    return {"duplicates_n": n, "duplicates_s": round(seconds, 2), "duplicates_max_cosine": round(float(np.nanmax(nearest)), 3)}


def _python_for(rev: str, work: Path) -> Path:
    """A Python that imports mifa as of commit `rev`: a venv with that commit installed (not editable) and this
    one's packages visible through a .pth file, so nothing is downloaded and this checkout is not touched."""
    tree, venv = work / "before-src", work / "before-venv"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), rev], check=True, capture_output=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
        site = next(venv.glob("lib/python*/site-packages"))
        here = next(p for p in map(Path, sys.path) if p.name == "site-packages" and (p / "torch").is_dir())
        (site / "mifa-bench-deps.pth").write_text(f"{here}\n")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(site), str(tree)], check=True, capture_output=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)
    return venv / "bin" / "python"


def demo_figures(before: str, work: Path) -> dict:
    """The demo build (judges on), commit `before` vs this checkout, each with the local and the Ray executor."""
    figures = {}
    old = work / "demo-before.yaml"  # the demo manifest as that commit has it (later ones add keys it refuses)
    old.write_bytes(subprocess.run(["git", "-C", str(ROOT), "show", f"{before}:manifests/demo.yaml"], check=True,
                                   capture_output=True).stdout)
    for label, python, manifest in (("before", _python_for(before, work), old),
                                    ("after", Path(sys.executable), ROOT / "manifests/demo.yaml")):
        for runner in ("local", "ray"):
            out = work / f"demo-{label}-{runner}"
            start = time.perf_counter()
            proc = subprocess.run([str(python), "-m", "mifa_pipeline.cli", "build", str(manifest),
                                   "--out", str(out), "--runner", runner, "--no-progress"],
                                  cwd=work, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"demo build failed ({label}, {runner}):\n{proc.stderr[-3000:]}")
            figures[f"demo_{label}_{runner}_s"] = round(time.perf_counter() - start, 1)
            print(f"demo build {label} ({runner}): {figures[f'demo_{label}_{runner}_s']} s", flush=True)
        figures[f"demo_{label}_ray_over_local"] = round(figures[f"demo_{label}_ray_s"] / figures[f"demo_{label}_local_s"], 2)
    return figures


def storage_figures(n: int, work: Path, resolution: int) -> dict:
    """N samples to S3 and on a 3-node simulated cluster, each against the same build on a local folder."""
    sys.path.insert(0, str(ROOT))
    from ray.cluster_utils import Cluster

    from tests.s3_server import SeaweedS3

    rows = {}
    with SeaweedS3(work / "seaweedfs") as s3:
        rows["local_folder"] = run_child(n, "local", work / "s-local", resolution)
        rows["local_s3"] = run_child(n, "local", s3.url("local"), resolution)
        node = {"num_cpus": 1, "object_store_memory": 96 * 1024**2}
        cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
        try:
            for _ in range(2):
                cluster.add_node(**node, num_gpus=1)
            cluster.wait_for_nodes()
            rows["cluster_folder"] = run_child(n, "ray", work / "s-cluster", resolution, cluster.address)
            rows["cluster_s3"] = run_child(n, "ray", s3.url("cluster"), resolution, cluster.address)
        finally:
            cluster.shutdown()
    base = rows["local_folder"]["wall_s"]
    out = {k: {"wall_s": r["wall_s"], "ms_per_sample": r["ms_per_sample"], "over_local_folder": round(r["wall_s"] / base, 2),
               "driver_bytes_per_sample": r["driver_bytes_per_sample"]} for k, r in rows.items()}
    out["cluster_s3_over_cluster_folder"] = round(rows["cluster_s3"]["wall_s"] / rows["cluster_folder"]["wall_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, nargs="*", default=[1024, 8192, 32768], help="sample counts; none: skip the builds")
    parser.add_argument("--executors", nargs="+", default=["local", "ray"])
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--no-refilter", action="store_true")
    parser.add_argument("--no-duplicates", action="store_true")
    parser.add_argument("--demo-before", metavar="REV", help="also time the demo build at commit REV against this checkout")
    parser.add_argument("--storage", type=int, metavar="N", help="also N samples to S3 and on a 3-node simulated cluster")
    parser.add_argument("--overlap", action="store_true",
                        help="also the largest local build with generation and writing overlapped, as a user runs it")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ray-address", help=argparse.SUPPRESS)
    parser.add_argument("--executor", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.n = args.n[0]
        child(args)
        return
    figures: dict = {"builds": []}
    with tempfile.TemporaryDirectory(dir=os.environ.get("MIFA_BENCH_DIR")) as tmp:
        work = Path(tmp)
        # one executor's builds after another (the local rows first, as when only they are asked for)
        for executor in args.executors:
            for n in args.n:
                row = run_child(n, executor, work / f"{executor}-{n}", args.resolution)
                figures["builds"].append(row)
                print(f"{executor:5s} N={n:6d}: {row['ms_per_sample']:.3f} ms/sample, driver peak RSS "
                      f"{row['driver_peak_rss_mb']:.0f} MB, {row['driver_bytes_per_sample']:.1f} B/sample to the driver, "
                      f"driver CPU {row['driver_cpu_ms_per_sample']:.4f} ms/sample, plumbing "
                      f"{row['plumbing_ms_per_sample']} ms/sample = {row['plumbing_over_floor']}x the floor "
                      f"({row['floor_ms_per_sample']:.3f} ms/sample); write stage {row['write_stage_over_floor']}x", flush=True)
                if not (n == max(args.n) and executor == args.executors[0]):
                    shutil.rmtree(work / f"{executor}-{n}")
        if args.overlap and args.n and "local" in args.executors:
            n = max(args.n)
            row = run_child(n, "local", work / f"overlap-{n}", args.resolution, overlap=True)
            one = next(r for r in figures["builds"] if r["executor"] == "local" and r["n"] == n)
            figures["overlap"] = {"n": n, "wall_s": row["wall_s"], "one_call_at_a_time_wall_s": one["wall_s"],
                                  "speedup": round(one["wall_s"] / row["wall_s"], 3)}
            shutil.rmtree(work / f"overlap-{n}")
            print(f"local N={n} overlapped: {row['wall_s']} s against {one['wall_s']} s one call at a time "
                  f"({figures['overlap']['speedup']}x)", flush=True)
        if not args.no_refilter and args.n:
            parent = work / f"{args.executors[0]}-{max(args.n)}"
            figures["refilter"] = refilter_figures(parent, work)
            r = figures["refilter"]
            print(f"threshold-only re-filter of N={max(args.n)} (median of {len(r['refilter_rounds_s'])}, each after cp): "
                  f"{r['refilter_s']} s vs cp of its tars {r['cp_tars_s']} s = {r['refilter_over_cp']}x (rounds: re-filter "
                  f"{r['refilter_rounds_s']}, cp {r['cp_rounds_s']}); decision pass {r['decision_s_per_100k']} s per 100k "
                  "samples", flush=True)
        if not args.no_duplicates:
            figures["duplicates"] = duplicate_figures()
            d = figures["duplicates"]
            print(f"duplicate search over {d['duplicates_n']:,} random 128-d identities: {d['duplicates_s']} s", flush=True)
        if args.storage:
            figures["storage"] = storage_figures(args.storage, work, args.resolution)
            for k, r in figures["storage"].items():
                print(f"storage {k}: {r}", flush=True)
        if args.demo_before:
            figures["demo"] = demo_figures(args.demo_before, work)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
