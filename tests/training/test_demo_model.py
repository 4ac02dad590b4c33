"""The committed demo model (mifa_pipeline/assets/demo_model): small, documented, loads and draws faces."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import torch

from mifa_pipeline.aus import DISFA12
from mifa_pipeline.maugen import MAUGen

DEMO = Path(__file__).resolve().parents[2] / "mifa_pipeline" / "assets" / "demo_model"
pytestmark = pytest.mark.skipif(not (DEMO / "maugen_config.json").is_file(), reason="demo model not present")


def test_demo_model_is_small_and_its_card_lists_every_file():
    files = [p for p in DEMO.rglob("*") if p.is_file() and p.name != "MODEL_CARD.md"]
    assert sum(p.stat().st_size for p in files) < 30 * 2**20
    card = (DEMO / "MODEL_CARD.md").read_text()
    assert "Apache-2.0" in card
    by_path = {path: digest for digest, path in re.findall(r"`([0-9a-f]{64})`\s+`([^`]+)`", card)}
    for p in files:
        rel = p.relative_to(DEMO).as_posix()
        assert rel in by_path, f"{rel} not listed in MODEL_CARD.md"
        assert hashlib.sha256(p.read_bytes()).hexdigest() == by_path[rel], rel


def test_demo_model_loads_and_generates():
    model = MAUGen.from_pretrained(DEMO)
    assert model.au_names == list(DISFA12)
    size = model.resolution
    assert f"Resolution {size} px" in (DEMO / "MODEL_CARD.md").read_text()
    refs = torch.rand(2, 3, size, size)
    masks = torch.zeros(2, 1, size, size)
    masks[:, :, size // 8:size * 7 // 8, size // 4:size * 3 // 4] = 1
    gens = [torch.Generator().manual_seed(s) for s in (0, 1)]
    out = model.sample(["a close-up portrait photo of <ID> <ID2>, a person, the face shows strongly pulled-up lip corners",
                        "a close-up portrait photo of a person with light skin, neutral expression"],
                       refs * (1 - masks), masks, model.encode_identity(refs, masks), gens, num_inference_steps=8)
    assert out.images.shape == (2, 3, size, size)
    assert float(out.images.std()) > 0.05
    assert ((out.intensity >= 0) & (out.intensity <= 5)).all() and ((out.occurrence_prob >= 0) & (out.occurrence_prob <= 1)).all()
