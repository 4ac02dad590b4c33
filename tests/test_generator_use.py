"""How the generator is used: sampler.batch_size 'auto' (parsing, the search, what is recorded), the per-worker
busy seconds in the run manifest, and the speed options' place in the fingerprint."""

from __future__ import annotations

import pytest

from mifa_pipeline.config import AUTO_BATCH_CPU, load_manifest, output_determining
from mifa_pipeline.runner import build_data, prepare
from mifa_pipeline.stages.generate import AUTO_BATCH_LIMIT, largest_batch, resolve_batch_size


@pytest.mark.parametrize("value", ["0", "4097", "true", "1.5", "'16'", "autos", "[4]"])
def test_bad_batch_size_is_refused_in_one_line(value):
    with pytest.raises(Exception) as info:
        load_manifest(None, [f"sampler.batch_size={value}"])
    assert "batch_size must be 'auto' or an integer from 1 to 4096" in str(info.value)


def test_auto_batch_size_parses():
    assert load_manifest(None, ["sampler.batch_size=auto"]).sampler.batch_size == "auto"
    assert load_manifest(None, ["sampler.batch_size=32"]).sampler.batch_size == 32


@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 16, 17, 100, 255, AUTO_BATCH_LIMIT, 10_000])
def test_search_finds_the_largest_batch_that_fits_with_few_trials(capacity):
    tried = []

    def fits(b):  # a fake memory probe: b samples fit when b <= capacity
        tried.append(b)
        return b <= capacity

    assert largest_batch(fits) == min(capacity, AUTO_BATCH_LIMIT)
    assert len(tried) <= 2 * AUTO_BATCH_LIMIT.bit_length() and len(set(tried)) == len(tried)


def test_search_reports_nothing_fits():
    assert largest_batch(lambda b: False) == 0


class _Model:
    """Only what resolve_batch_size looks at: where the parameters are."""

    def __init__(self, device):
        import torch

        self.p = torch.nn.Parameter(torch.zeros(1, device=device))

    def parameters(self):
        return iter([self.p])


def test_auto_on_cpu_is_the_stated_default_and_cuda_search_uses_the_probe():
    sampler = load_manifest(None, ["sampler.batch_size=auto", "sampler.batch_invariant=false"]).sampler
    assert resolve_batch_size(sampler, _Model("cpu"), 64)[0] == AUTO_BATCH_CPU
    size, why = resolve_batch_size(sampler, _Model("cpu"), 64, fits=lambda b: b <= 40)
    assert size == 40 and why.startswith("auto: largest batch")
    with pytest.raises(RuntimeError, match="not even one sample"):
        resolve_batch_size(sampler, _Model("cpu"), 64, fits=lambda b: False)
    fixed = load_manifest(None, ["sampler.batch_size=8"]).sampler
    assert resolve_batch_size(fixed, _Model("cpu"), 64, fits=lambda b: False) == (8, "manifest")


def test_run_manifest_records_generator_busy_seconds_and_batch_size(small_manifest, fake_model):
    m = small_manifest("sampler.batch_size=auto")
    content = build_data(prepare(m), "local", progress=False).manifest
    gen = content["generation_last_run"]
    assert gen["wall_seconds"] == pytest.approx(content["wall_seconds_last_run"], abs=0.01)
    [worker] = gen["workers"]
    assert worker["shards"] == len(content["shards"]) == 4
    assert worker["batch_size"] == AUTO_BATCH_CPU and worker["batch_size_source"].startswith("auto: default")
    assert 0 < worker["busy_seconds"] <= gen["wall_seconds"]
    assert 0 < worker["busy_share_of_wall"] <= 1 and 0 < worker["busy_share_after_first_shard"] <= 1
    assert worker["device"] == "cpu"


def test_speed_options_enter_the_fingerprint_only_when_set():
    plain = output_determining(load_manifest(None, []))
    assert "compile" not in plain["sampler"] and "channels_last" not in plain["sampler"]  # old fingerprints hold
    for option in ("compile", "channels_last"):
        assert output_determining(load_manifest(None, [f"sampler.{option}=true"]))["sampler"][option] is True
    assert "batch_size" not in plain["sampler"]  # runtime-only under batch_invariant, 'auto' or not
