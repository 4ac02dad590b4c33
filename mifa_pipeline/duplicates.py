"""Duplicate identities: for each identity, the cosine to the most similar identity before it in the build's order.

A build drops identity i when this value reaches its threshold, so every identity meets every earlier one: N^2/2
pairs, 5e11 at a million identities, far too many to score one by one. Two paths, chosen by the number of rows that
have an embedding:

* up to EXACT_LIMIT rows, exact: blocked float32 matrix products (a block of queries against all earlier rows, then
  the lower triangle inside the block); no Python loop per row.
* above it, locality-sensitive hashing: TABLES independent hash tables; a row is compared only with the earlier rows
  that share its bucket in some table. A table hashes the centred row with three cross-polytope hashes (the nearest
  of 16 random orthonormal directions and its sign: 32768 buckets). A pair at cosine 0.9 shares a bucket of one
  table with probability ~0.16 and a random pair with ~1/28000, so 64 tables miss a 0.9 pair with probability
  ~1.5e-5 (a pair at 0.8: ~2%) while comparing ~0.2% of all pairs. Bucket mates are scored on a 64-d random
  projection (the "sketch"); each row keeps the closest and gets the exact inner product with it.

An inverted-file index (faiss IndexIVFFlat) was measured first and rejected: on spread-out embeddings (random 128-d
vectors, the benchmark's worst case; 1M rows, 4000 lists, 16 probed) it found 907 of 1000 planted 0.9 pairs and took
76 s (60 s of it scanning lists); more probes cost linearly. Many coarse hash tables reach ~1e-5 misses for less.

Deterministic: every random direction comes from a fixed seed, the tables are independent and are merged with a max
that breaks ties toward the earlier row, so neither the worker count nor their scheduling changes the result, and a
BLAS matrix product does not split its inner (summed) dimension between threads, so thread counts leave every dot
product bit for bit the same (tests/test_duplicates.py checks both).
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

EXACT_LIMIT: int = 32768   # exact up to this many embedded rows: 1.4 s for 128-d on 2 cores, 3.7 s for 512-d
TABLES = 64                # hash tables: miss probability ~1.5e-5 for a pair at cosine 0.9, ~2e-2 at 0.8
SKETCH_DIM = 64            # random projection that ranks a row's bucket mates
_HASH_SPAN = 256           # the tables hash a random projection to this many dimensions (all of them if fewer)...
_HASH_DIM = 64             # ...cut into blocks of this many; table t hashes block t % blocks
_GROUPS = 3                # cross-polytope hashes per table (key = their concatenation)
_GROUP_DIM = 16            # directions per hash: 2*16 codes each, 32^3 = 32768 buckets, fits uint16
_SEED = 20240611           # every random direction derives from this
_BLOCK = 2048              # queries per exact block
_COLUMNS = 8192            # earlier rows per exact product (bounds the temporary to 64 MB)
_CLASSES = np.array([2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512])  # bucket size paddings
_CELLS = 1 << 21           # score cells per batched bucket product (8 MB of float32)


def nearest_earlier(embeddings: np.ndarray) -> np.ndarray:
    """embeddings: float array [N, D]; a row of NaN means 'no embedding'. Returns float64 [N]: for row i the
    max inner product with any earlier row that has an embedding, NaN where there is none (row 0, rows
    without an embedding, rows with no earlier embedded row).

    Exact up to EXACT_LIMIT embedded rows. Above it, exact for every pair the hash tables put together (when the
    partner is also the row's closest bucket mate by sketch), which includes every near duplicate the tests plant:
    a pair is missed only if all TABLES tables separate it, probability ~1.5e-5 at cosine 0.9 and ~2% at 0.8 on
    spread-out embeddings. Any other value is the inner product with some earlier row, hence never above the exact
    one. A row with any NaN counts as having no embedding."""
    emb = np.asarray(embeddings)
    if emb.ndim != 2:
        raise ValueError(f"embeddings must be [N, D], got shape {emb.shape}")
    out = np.full(len(emb), np.nan)
    rows = np.flatnonzero(~np.isnan(emb).any(axis=1))
    if len(rows) < 2:
        return out
    x = np.ascontiguousarray(emb if len(rows) == len(emb) else emb[rows], dtype=np.float32)   # no copy if possible
    if len(x) <= EXACT_LIMIT or x.shape[1] < _GROUPS:
        values = _triangle(x)[0]
    else:
        values = _hashed(x)
    values = values.astype(np.float64)
    values[~np.isfinite(values)] = np.nan     # the first embedded row has no earlier one
    out[rows] = values
    return out


def _triangle(x: np.ndarray, with_index: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """Exact max (and, if asked, argmax: the earliest best row) of x[i] . x[j] over j < i; -inf for row 0.

    Blocks of _BLOCK queries against all earlier rows in chunks of _COLUMNS, then the strict lower triangle of
    the block against itself: one BLAS product per chunk, ~n^2 * d multiply-adds in all."""
    n = len(x)
    best = np.full(n, -np.inf, np.float32)
    arg = np.full(n, -1, np.int64) if with_index else None
    upper = np.triu(np.full((min(n, _BLOCK),) * 2, -np.inf, np.float32))    # j >= i within a block
    for b0 in range(0, n, _BLOCK):
        b1 = min(n, b0 + _BLOCK)
        q, top = x[b0:b1], best[b0:b1]
        chunks = [(c0, min(c0 + _COLUMNS, b0)) for c0 in range(0, b0, _COLUMNS)] + [(b0, b1)]
        for c0, c1 in chunks:
            s = q @ x[c0:c1].T
            if c0 == b0:
                s += upper[:b1 - b0, :b1 - b0]
            if not with_index:
                np.maximum(top, s.max(axis=1), out=top)
                continue
            j = s.argmax(axis=1)
            m = s[np.arange(b1 - b0), j]
            better = m > top                # strict: ties keep the earlier chunk, i.e. the earlier row
            top[better] = m[better]
            arg[b0:b1][better] = j[better] + c0
    return best, arg


def _workers() -> int:
    """Threads for the table passes: the CPUs this process may use, at most 8 (the result does not depend on it)."""
    return max(1, min(len(os.sched_getaffinity(0)), TABLES, 8))


def _orthonormal(rng: np.random.Generator, d: int, k: int) -> np.ndarray:
    """k orthonormal random directions in R^d, as a d x k float32 matrix (QR of a seeded Gaussian)."""
    q, r = np.linalg.qr(rng.standard_normal((d, k)))
    return (q * np.sign(np.diag(r))).astype(np.float32)


def _hashed(x: np.ndarray) -> np.ndarray:
    """Max over earlier rows that share a bucket with row i in some table (see the module docstring)."""
    n, d = x.shape
    rng = np.random.default_rng(_SEED)
    sketch = x @ _orthonormal(rng, d, min(d, SKETCH_DIM))
    sketch /= np.maximum(np.linalg.norm(sketch, axis=1, keepdims=True), 1e-12)
    keys = _hash_keys(x, rng)

    # Every row starts with its predecessor as candidate, so each row past the first gets a real value.
    start_val = np.full(n, -np.inf, np.float32)
    start_val[1:] = np.einsum("ij,ij->i", sketch[1:], sketch[:-1])
    start_idx = np.arange(-1, n - 1, dtype=np.int64)

    workers = _workers()

    def run(w: int) -> tuple[np.ndarray, np.ndarray]:
        val, idx = start_val.copy(), start_idx.copy()
        for t in range(w, TABLES, workers):
            _table_pass(sketch, keys[t], val, idx)
        return val, idx

    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(run, range(workers)))
    val, idx = results[0]
    for v, i in results[1:]:
        _merge(val, idx, v, i, np.arange(n))

    values = np.full(n, -np.inf, np.float32)
    for c0 in range(1, n, 65536):
        c1 = min(n, c0 + 65536)
        values[c0:c1] = np.einsum("ij,ij->i", x[c0:c1], np.take(x, idx[c0:c1], axis=0))
    return values


def _hash_keys(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[TABLES, n] uint16 bucket keys: per table, _GROUPS cross-polytope codes (argmax |projection|, its sign).

    The tables do not hash the 64-d sketch: its distortion of a pair's angle would be shared by every table, and
    its unlucky pairs missed by all of them (measured: 10x more missed 0.9 pairs). Instead the rows are projected
    onto _HASH_SPAN random orthonormal directions (no projection if D is smaller), cut into blocks of _HASH_DIM,
    and table t hashes block t % blocks: the blocks split each pair's distance between them, so a pair squeezed
    in one block is spread in another. Projections are of centred rows (embeddings share a common component,
    which would otherwise crowd most rows into a few buckets).

    Each block's columns are ordered (direction, table, group) so the argmax runs across slices, and it is taken
    on the float bits: magnitude with the low 5 bits replaced by (direction, sign), one integer max per code; with
    256-row slices that stay in cache this is ~3x faster than numpy's argmax over the last axis."""
    n, d = x.shape
    span = min(d, _HASH_SPAN)
    parts = np.array_split(np.arange(span), -(-span // _HASH_DIM))
    rotate = _orthonormal(rng, d, span) if len(parts) > 1 else None
    mean = x.mean(axis=0, dtype=np.float64)                     # numpy reductions: no BLAS, no thread split
    if rotate is not None:
        mean = (mean[:, None] * rotate).sum(axis=0)
    blocks = []
    for b, cols in enumerate(parts):
        tables = list(range(b, TABLES, len(parts)))
        m = min(_GROUP_DIM, len(cols) // _GROUPS)
        r = np.stack([_orthonormal(rng, len(cols), _GROUPS * m).reshape(len(cols), _GROUPS, m) for _ in tables], 1)
        r = np.ascontiguousarray(r.transpose(0, 3, 1, 2).reshape(len(cols), -1))
        shift = (mean[cols][:, None] * r).sum(axis=0).astype(np.float32)
        cols = slice(cols[0], cols[-1] + 1)
        blocks.append((cols, tables, m, r, shift, (np.arange(m, dtype=np.uint32) << 1)[:, None]))

    keys = np.empty((TABLES, n), np.uint16)
    for c0 in range(0, n, 4096):
        c1 = min(n, c0 + 4096)
        z = x[c0:c1] if rotate is None else x[c0:c1] @ rotate
        for cols, tables, m, r, shift, low in blocks:
            y = (z if rotate is None else z[:, cols]) @ r
            for s0 in range(0, c1 - c0, 256):
                f = y[s0:s0 + 256]
                f -= shift
                u = f.view(np.uint32).reshape(len(f), m, -1)
                sign = u >> 31
                u &= np.uint32(0x7FFFFFE0)
                u |= low
                u |= sign
                code = (u.max(axis=1) & 31).reshape(len(f), len(tables), _GROUPS)
                key = code[..., 0]
                for g in range(1, _GROUPS):
                    key = key * (2 * m) + code[..., g]
                keys[tables, c0 + s0:c0 + s0 + len(f)] = key.T
    return keys


def _merge(val: np.ndarray, idx: np.ndarray, v: np.ndarray, i: np.ndarray, rows: np.ndarray) -> None:
    """val/idx[rows] := the better of (val, idx)[rows] and (v, i): higher value, ties to the earlier row."""
    cur_v, cur_i = val[rows], idx[rows]
    better = (v > cur_v) | ((v == cur_v) & (i < cur_i))
    val[rows[better]] = v[better]
    idx[rows[better]] = i[better]


def _table_pass(sketch: np.ndarray, key: np.ndarray, val: np.ndarray, idx: np.ndarray) -> None:
    """Compare every row with the earlier rows of its bucket in one table; keep the best in (val, idx).

    Buckets are padded to a few sizes and scored as batched matrix products; a stable sort keeps each bucket's
    rows in global order, so "earlier" is the strict lower triangle of the bucket's product."""
    n = len(sketch)
    order = np.argsort(key, kind="stable")
    sorted_key = key[order]
    starts = np.flatnonzero(np.concatenate(([True], sorted_key[1:] != sorted_key[:-1])))
    sizes = np.diff(np.append(starts, n))
    keep = sizes > 1
    starts, sizes = starts[keep], sizes[keep]
    cls = np.searchsorted(_CLASSES, sizes)
    for c in np.unique(cls):
        sel = cls == c
        if c == len(_CLASSES):      # a bucket larger than every padding: exact blocked products, one by one
            for s0, sz in zip(starts[sel], sizes[sel]):
                rows = order[s0:s0 + sz]
                v, j = _triangle(sketch[rows], with_index=True)
                _merge(val, idx, v[1:], rows[j[1:]], rows[1:])
            continue
        p = int(_CLASSES[c])
        ar = np.arange(p)
        upper = np.where(ar[None, :] < ar[:, None], 0, -np.inf).astype(np.float32)
        st, sz = starts[sel], sizes[sel]
        step = max(1, _CELLS // (p * p))
        for b0 in range(0, len(st), step):
            s2, z2 = st[b0:b0 + step], sz[b0:b0 + step]
            rows = order[np.minimum(s2[:, None] + ar, n - 1)]       # padding repeats some row; masked below
            g = sketch[rows]
            s = np.matmul(g, g.transpose(0, 2, 1))
            s += upper
            j = s.argmax(axis=2)
            m = np.take_along_axis(s, j[..., None], axis=2)[..., 0]
            valid = (ar[None, :] >= 1) & (ar[None, :] < z2[:, None])
            _merge(val, idx, m[valid], np.take_along_axis(rows, j, axis=1)[valid], rows[valid])
