"""A small judged build and a stricter filter version of it, as a curator makes them (report and inspect tests)."""

from pathlib import Path

from mifa_pipeline.config import load_manifest
from mifa_pipeline.refilter import prepare_refilter, run_refilter
from mifa_pipeline.runner import build_data, prepare

JUDGED = ["model.checkpoint=teacher", "sampler.resolution=128", "filter.face.detector=yunet",
          "filter.identity.embedder=sface", "filter.au.estimator=mediapipe"]
TIGHT = "filter.identity.min_cosine=0.9"  # tight enough that some teacher faces are dropped


def make_versions(root: Path) -> tuple[Path, Path]:
    """root/v1: teacher faces (5 identities x 3 samples) judged by YuNet, SFace and MediaPipe, nothing dropped
    on thresholds; root/v1-v1.1.0: the same re-filtered with a tight identity threshold, so drops exist."""
    parent = root / "v1"
    m = load_manifest(None, [*JUDGED, "identities.count=5", "identities.samples_per_identity=3",
                             "resources.identities_per_unit=2", "writer.samples_per_shard=4"], output=parent)
    build_data(prepare(m), "local", progress=False)
    run_refilter(prepare_refilter(parent, [TIGHT]), "local", progress=False)
    return parent, root / "v1-v1.1.0"
