"""nearest_earlier: exact path against brute force, hashed path finds planted duplicates, NaN rows, determinism."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mifa_pipeline import duplicates

ROOT = Path(__file__).resolve().parent.parent


def unit(rng, n, d=128):
    x = rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def plant(x, rng, count, cosine=0.9):
    """Overwrite `count` later rows with an earlier row + noise (renormalised, cosine ~0.9); returns the rows."""
    dst = np.sort(rng.choice(np.arange(1, len(x)), count, replace=False))
    radius = np.sqrt(1 / cosine**2 - 1)
    for d in dst:
        noise = rng.standard_normal(x.shape[1]).astype(np.float32)
        y = x[rng.integers(0, d)] + radius * noise / np.linalg.norm(noise)
        x[d] = y / np.linalg.norm(y)
    return dst


def brute_force(x):
    """The definition, in float64: each row's max over earlier embedded rows (a masked Gram matrix, row chunks)."""
    x = x.astype(np.float64)
    ok = ~np.isnan(x).any(axis=1)
    z = np.where(ok[:, None], x, 0.0)
    out = np.full(len(x), np.nan)
    for c0 in range(0, len(x), 512):
        rows = np.arange(c0, min(c0 + 512, len(x)))
        g = z[rows] @ z.T
        g[~((np.arange(len(x))[None, :] < rows[:, None]) & ok[None, :])] = -np.inf
        best = g.max(axis=1)
        out[rows] = np.where(ok[rows] & np.isfinite(best), best, np.nan)
    return out


@pytest.fixture
def hashed(monkeypatch):
    """Force the hashed path on small inputs."""
    monkeypatch.setattr(duplicates, "EXACT_LIMIT", 1000)


def test_exact_path_equals_brute_force(monkeypatch):
    monkeypatch.setattr(duplicates, "_BLOCK", 256)     # several blocks and uneven column chunks
    monkeypatch.setattr(duplicates, "_COLUMNS", 300)
    rng = np.random.default_rng(0)
    x = unit(rng, 1500)
    plant(x, rng, 10)
    x[[0, 7, 300, 1499]] = np.nan
    got, want = duplicates.nearest_earlier(x), brute_force(x)
    assert got.dtype == np.float64
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("path", ["exact", "hashed"])
def test_finds_every_planted_duplicate_and_no_other(request, path):
    if path == "hashed":
        request.getfixturevalue("hashed")
    rng = np.random.default_rng(1)
    x = unit(rng, 5000)
    dst = plant(x, rng, 25)
    got = duplicates.nearest_earlier(x)
    np.testing.assert_array_equal(np.flatnonzero(got >= 0.8), dst)
    want = brute_force(x[:dst[-1] + 1])[dst]                 # planted rows: exactly the exact value
    np.testing.assert_allclose(got[dst], want, atol=1e-5)


def test_hashed_values_are_real_inner_products_never_above_exact(hashed):
    rng = np.random.default_rng(2)
    x = unit(rng, 3000, 512)
    x[[0, 10, 2000]] = np.nan
    got, want = duplicates.nearest_earlier(x), brute_force(x)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    assert np.all(got[~np.isnan(got)] <= want[~np.isnan(want)] + 1e-5)


def test_hashed_path_takes_buckets_larger_than_every_padding(hashed):
    rng = np.random.default_rng(3)
    x = unit(rng, 3000)
    x[1000:2000] = x[5]                   # 1001 identical rows: one bucket in every table
    got = duplicates.nearest_earlier(x)
    np.testing.assert_allclose(got[1000:2000], 1.0, atol=1e-5)
    assert np.all(got[2000:] < 0.8)


@pytest.mark.parametrize("limit", [32768, 2], ids=["exact", "hashed"])
def test_rows_without_an_embedding(monkeypatch, limit):
    monkeypatch.setattr(duplicates, "EXACT_LIMIT", limit)
    rng = np.random.default_rng(4)
    x = unit(rng, 6)
    x[0] = x[3] = np.nan                  # row 0 NaN; a NaN row is no candidate
    x[2] = x[1]
    x[4] = -x[1]
    got = duplicates.nearest_earlier(x.astype(np.float64))
    assert np.isnan(got[[0, 1, 3]]).all()                # no embedding / no earlier embedded row
    np.testing.assert_allclose(got[2], 1.0, atol=1e-6)
    np.testing.assert_allclose(got[4], max(x[4] @ x[1], x[4] @ x[2]), atol=1e-6)
    assert np.isnan(duplicates.nearest_earlier(np.full((4, 128), np.nan))).all()
    assert duplicates.nearest_earlier(np.zeros((0, 128))).shape == (0,)
    assert np.isnan(duplicates.nearest_earlier(x[1:2])).all()


def test_hashed_path_is_deterministic_whatever_the_worker_count(hashed, monkeypatch):
    rng = np.random.default_rng(5)
    x = unit(rng, 6000)
    plant(x, rng, 10)
    results = []
    for workers in (1, 2, 3, 1):
        monkeypatch.setattr(duplicates, "_workers", lambda w=workers: w)
        results.append(duplicates.nearest_earlier(x))
    for r in results[1:]:
        assert r.tobytes() == results[0].tobytes()


SCRIPT = """
import hashlib, numpy as np
from mifa_pipeline import duplicates
rng = np.random.default_rng(6)
x, y = rng.standard_normal((40000, 128)).astype(np.float32), rng.standard_normal((8000, 512)).astype(np.float32)
x /= np.linalg.norm(x, axis=1, keepdims=True)
y /= np.linalg.norm(y, axis=1, keepdims=True)
out = [duplicates.nearest_earlier(x[:8000])]
duplicates.EXACT_LIMIT = 1000
out += [duplicates.nearest_earlier(x), duplicates.nearest_earlier(y)]
print(hashlib.sha256(b"".join(o.tobytes() for o in out)).hexdigest())
"""


def test_blas_thread_count_does_not_change_results():
    """Both paths (and the 512-d rotation) in fresh processes with 1 and 2 BLAS threads: bit-identical output."""
    digests = set()
    for threads in ("1", "2"):
        env = {"OPENBLAS_NUM_THREADS": threads, "OMP_NUM_THREADS": threads, "PATH": "/usr/bin:/bin"}
        run = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                             check=True)
        digests.add(run.stdout.strip())
    assert len(digests) == 1


def test_the_identity_table_publishes_nearest_earlier_cosines_across_blocks(tmp_path):
    """Blocks (some identities without an embedding: no face found) are published in global order, each with
    the cosine to its nearest earlier identity and `duplicate` at the threshold; blocks of several embedding
    sizes are refused by name."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from mifa_pipeline import identity_table
    from mifa_pipeline.storage import location

    out = location(tmp_path)
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((7, 4)).astype(np.float32)
    vectors[5] = vectors[1]  # identity 5 repeats identity 1
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    embeddings = [None if i in (2, 6) else vectors[i].tolist() for i in range(7)]

    def block(ids, values):
        return pa.Table.from_pylist([{"identity": i, "seed": i, "prompt": "p", "demographics": "{}", "source": "teacher",
                                      "reference_png": b"png", "mask_png": b"m", "embedding": values[k],
                                      "nearest_earlier_cosine": None, "duplicate": False} for k, i in enumerate(ids)],
                                    schema=identity_table.IDENTITY_SCHEMA)

    parts = []
    for name, ids in (("b0", [0, 1, 2]), ("b1", [3, 4, 5, 6])):
        parts.append(identity_table.block_path(name))
        out.write_parquet(parts[-1], block(ids, [embeddings[i] for i in ids]), identity_table.COMPRESSION)
    assert identity_table.publish(out, out, parts, 0.99) == {"identities": 7, "duplicates": 1}
    table = pq.read_table(tmp_path / identity_table.IDENTITIES_FILE)
    cosines = table.column("nearest_earlier_cosine").to_pylist()
    unit = {i: vectors[i] for i in range(7) if embeddings[i] is not None}
    for i in (1, 3, 4, 5):
        expected = max(float(unit[i] @ unit[j]) for j in unit if j < i)
        assert cosines[i] == pytest.approx(expected, abs=1e-5)
    assert cosines[0] is None and cosines[2] is None and cosines[6] is None
    assert table.column("duplicate").to_pylist() == [False] * 5 + [True, False]
    out.write_parquet(parts[1], block([3, 4, 5, 6], [[1.0, 0.0]] * 4))  # another embedding size
    with pytest.raises(ValueError, match=r"several sizes \(\[2, 4\]\)"):
        identity_table.publish(out, out, parts, 0.99)
