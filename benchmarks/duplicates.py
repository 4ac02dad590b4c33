"""Speed and recall of the duplicate-identity search (mifa_pipeline/duplicates.py) on random embeddings.

    python benchmarks/duplicates.py [--n 1000000] [--dim 128] [--cosine 0.9]

N seeded random unit vectors (spread-out embeddings: the hard case for any index) with ~0.1% planted near
duplicates: a later row = an earlier row + random noise of fixed norm, renormalised, cosine ~--cosine. Times
nearest_earlier and prints one JSON line: seconds, peak RSS, planted, found at 0.8, false positives at 0.8, and the
agreement of the first 20k rows with the exact path (their values depend only on earlier rows, so they compare).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mifa_pipeline import duplicates  # noqa: E402

THRESHOLD = 0.8


def make(n: int, dim: int, cosine: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unit vectors with max(1, n // 1000) planted duplicates; returns (x, later rows, their sources)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dst = np.sort(rng.choice(np.arange(1, n), max(1, n // 1000), replace=False))
    src = (rng.random(len(dst)) * dst).astype(np.int64)                   # any earlier row
    radius = np.sqrt(1 / cosine**2 - 1)          # |noise| for which cos(source, source + noise) ~ cosine
    for d, s in zip(dst, src):                   # in order, so a source that was itself planted is final
        noise = rng.standard_normal(dim, dtype=np.float32)
        y = x[s] + radius * noise / np.linalg.norm(noise)
        x[d] = y / np.linalg.norm(y)
    return x, dst, src


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--cosine", type=float, default=0.9, help="planted duplicates' cosine to their source")
    ap.add_argument("--check", type=int, default=20_000, help="first rows compared with the exact path")
    args = ap.parse_args()

    x, dst, src = make(args.n, args.dim, args.cosine)
    t0 = time.perf_counter()
    got = duplicates.nearest_earlier(x)
    seconds = time.perf_counter() - t0

    hit = got >= THRESHOLD
    planted_cos = np.einsum("ij,ij->i", x[dst], x[src])
    m = min(args.check, args.n)
    exact = duplicates.nearest_earlier(x[:m]) if m <= duplicates.EXACT_LIMIT else None
    report = {
        "n": args.n, "dim": args.dim, "seconds": round(seconds, 2),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "cpus": len(os.sched_getaffinity(0)),
        "path": "exact" if args.n <= duplicates.EXACT_LIMIT else "hashed",
        "planted": len(dst), "planted_cosine_min": round(float(planted_cos.min()), 4),
        "found": int(hit[dst].sum()), "false_positives": int(hit.sum() - hit[dst].sum()),
        "planted_value_exact": int((got[dst] >= planted_cos - 1e-5).sum()),
    }
    if exact is not None:
        ok = ~np.isnan(exact)
        near = ok & (exact >= 0.5)
        report.update({
            "check_rows": m,
            "check_equal_frac": round(float(np.mean(np.abs(got[:m][ok] - exact[ok]) <= 1e-5)), 4),
            "check_never_above": bool(np.all(got[:m][ok] <= exact[ok] + 1e-5)),
            "check_near": int(near.sum()),
            "check_near_max_abs_diff": float(np.abs(got[:m][near] - exact[near]).max()) if near.any() else 0.0,
        })
    print(json.dumps(report))


if __name__ == "__main__":
    main()
