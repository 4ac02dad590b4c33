"""Every random draw in a build derives from (global seed, purpose, identity, sample index).

Nothing depends on batch composition, worker count or completion order, which is what makes a resumed or
re-partitioned build byte-identical to an uninterrupted one.
"""

from __future__ import annotations

import hashlib

import numpy as np


def _purpose_code(purpose: str) -> int:
    return int.from_bytes(hashlib.sha256(purpose.encode("utf-8")).digest()[:4], "little")


def seed_sequence(global_seed: int, purpose: str, *indices: int) -> np.random.SeedSequence:
    return np.random.SeedSequence([int(global_seed), _purpose_code(purpose), *(int(i) for i in indices)])


def derive_seed(global_seed: int, purpose: str, *indices: int) -> int:
    """A 63-bit seed (fits torch.Generator.manual_seed and JSON) for one purpose and position."""
    state = seed_sequence(global_seed, purpose, *indices).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & (2**63 - 1)


def rng(global_seed: int, purpose: str, *indices: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(seed_sequence(global_seed, purpose, *indices)))
