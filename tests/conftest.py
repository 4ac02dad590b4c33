import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

import pytest

from mifa_pipeline.config import load_manifest


@pytest.fixture
def small_manifest(tmp_path):
    """A build small enough for a unit test: 6 identities x 3 samples, shards of 5."""
    def make(*overrides, out=None):
        return load_manifest(None, [
            "identities.count=6", "identities.samples_per_identity=3", "resources.identities_per_unit=2",
            "writer.samples_per_shard=5", "sampler.steps=2", "sampler.batch_size=4", *overrides,
        ], output=out or tmp_path / "out")
    return make


@pytest.fixture
def fake_model(monkeypatch):
    """Route the generation stage to the fast fake model (pipeline mechanics tests)."""
    from tests.fake_model import FakeMAUGen

    model = FakeMAUGen()
    monkeypatch.setattr("mifa_pipeline.stages.generate.load_model", lambda *a, **k: model)
    return model
