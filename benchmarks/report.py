"""Time and size of `mifa report` on a build (default: the demo, built into a temporary folder if not given).

    python benchmarks/report.py [BUILD_FOLDER]

Prints the seconds to write the page (three runs after a warm-up import, median), its size, how many
pictures and plots it inlines, and last one JSON line.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", nargs="?", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            from mifa_pipeline.config import load_manifest
            from mifa_pipeline.runner import build_data, prepare

            folder = Path(tmp) / "demo"
            start = time.perf_counter()
            build_data(prepare(load_manifest(Path("manifests/demo.yaml"), [], folder)), "local", progress=False)
            print(f"demo build: {time.perf_counter() - start:.1f} s", file=sys.stderr)
        from mifa_pipeline.report import write_report

        out = Path(tmp) / "report.html"
        seconds = []
        for _ in range(3):
            start = time.perf_counter()
            write_report(folder, out)
            seconds.append(time.perf_counter() - start)
        text = out.read_text()
        manifest = json.loads((folder / "manifest.json").read_text())
        figures = {"planned_samples": manifest["counts"]["planned_samples"], "seconds_median": round(statistics.median(seconds), 2),
                   "seconds_runs": [round(s, 2) for s in seconds], "megabytes": round(out.stat().st_size / 1e6, 2),
                   "images": text.count("<img "), "plots": text.count("class='plot'")}
    for k, v in figures.items():
        print(f"{k}: {v}")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
