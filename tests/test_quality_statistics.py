"""The statistics `benchmarks/quality.py` reports beside its figures (the issue-4 targets are read from them)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "quality.py"


@pytest.fixture(scope="module")
def quality():
    spec = importlib.util.spec_from_file_location("quality_benchmark", _PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sweep_rhos_are_per_identity_and_average_to_the_sweep_figure(quality):
    who = np.repeat([7, 9], 6)
    level = np.tile(np.arange(6.0), 2)
    proxy = np.concatenate([np.arange(6.0), -np.arange(6.0)])   # identity 7 follows, identity 9 goes backwards
    rhos = quality.sweep_rhos(who, level, proxy)
    assert rhos == pytest.approx({7: 1.0, 9: -1.0})
    assert quality.sweep_spearman(who, level, proxy) == pytest.approx(0.0)
    flat = quality.sweep_rhos(who, level, np.ones(12))          # a proxy that never moves has no Spearman
    assert flat == {7: None, 9: None} and quality.sweep_spearman(who, level, np.ones(12)) is None


def test_ratio_interval_resamples_identities_as_pairs(quality):
    teacher = {i: t for i, t in enumerate([0.3, 0.5, 0.9, 1.0, 0.6, 0.8])}
    model = {i: 0.8 * t for i, t in teacher.items()}
    lo, hi = quality.ratio_interval(model, teacher)
    # each face's model sweep is 0.8 of its own teacher sweep: every draw of faces gives 0.8 exactly,
    # which only holds when the model's and the teacher's figure of a face are drawn together
    assert lo == pytest.approx(0.8) and hi == pytest.approx(0.8)


def test_ratio_interval_holds_the_estimate_and_widens_with_spread(quality):
    teacher = {i: 1.0 for i in range(8)}
    tight = {i: 0.7 + 0.02 * (i % 2) for i in range(8)}
    loose = {i: 0.71 + 0.6 * (-1) ** i for i in range(8)}
    t_lo, t_hi = quality.ratio_interval(tight, teacher)
    l_lo, l_hi = quality.ratio_interval(loose, teacher)
    assert t_lo <= np.mean(list(tight.values())) <= t_hi and l_lo <= 0.71 <= l_hi
    assert (l_hi - l_lo) > 10 * (t_hi - t_lo)
    assert quality.ratio_interval(loose, teacher) == (l_lo, l_hi)            # seeded: the same every run
    assert quality.ratio_interval({0: 0.5, 1: None}, {0: 1.0, 1: 1.0}) is None   # one usable face: no interval
    assert quality.ratio_interval({0: 0.5, 1: 0.5}, {0: -0.5, 1: -0.2}) is None  # the teacher never reads it


def test_auc_interval_brackets_the_identity_auc(quality):
    rng = np.random.default_rng(1)
    refs = {i: rng.normal(size=16) for i in range(6)}
    samples = [SimpleNamespace(identity=i % 6) for i in range(36)]
    noisy = [refs[s.identity] + rng.normal(scale=2.0, size=16) for s in samples]
    auc = quality.roc_auc(*quality.identity_pairs(noisy, samples, refs))
    lo, hi = quality.auc_interval(noisy, samples, refs)
    assert lo < auc < hi and hi - lo > 0.02
    exact = [refs[s.identity].copy() for s in samples]                       # every sample is its reference
    assert quality.auc_interval(exact, samples, refs) == (1.0, 1.0)
    assert quality.auc_interval([None] * 36, samples, refs) is None          # no face found anywhere
