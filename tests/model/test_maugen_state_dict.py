"""The full-size networks, built on the meta device, have exactly the official state-dict keys and shapes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from mifa_pipeline.maugen import configs
from mifa_pipeline.maugen.identity import IdentityEncoder, IdentityMapping
from mifa_pipeline.maugen.unet import MAUGenUNet

REFERENCE = Path("/work/shared/reference/maugen_state_dict.json")


@pytest.fixture(scope="module")
def ref() -> dict:
    if not REFERENCE.is_file():
        pytest.skip(f"{REFERENCE} not available")
    return json.loads(REFERENCE.read_text())


@pytest.fixture(scope="module")
def full():
    cfg = configs.full_config()
    with torch.device("meta"):  # no 3.5 GB allocation
        dig = MAUGenUNet(cfg)
        identity = IdentityEncoder(cfg["identity_encoder"])
        mapping = IdentityMapping(identity.out_dim, configs.token_dim(cfg), cfg["mapping"])
    return cfg, dig, identity, mapping


def _shapes(module) -> dict[str, list[int]]:
    return {k: list(v.shape) for k, v in module.state_dict().items()}


def test_built_on_meta(full):
    _, dig, identity, mapping = full
    assert all(p.is_meta for m in (dig, identity, mapping) for p in m.parameters())


def test_custom_unet_keys(full, ref):
    _, dig, _, _ = full
    spec = ref["custom_unet"]
    mine = _shapes(dig)
    assert len(mine) == spec["total_keys"] == 959
    unet = {k: v for k, v in mine.items() if k.startswith("unet.")}
    assert len(unet) == spec["unet_prefixed_keys"]["count"]
    lines = sorted(f"{k[len('unet.'):]}:{'x'.join(map(str, v))}" for k, v in unet.items())
    assert hashlib.sha256("\n".join(lines).encode()).hexdigest() == spec["unet_prefixed_keys"]["sha256_of_sorted_key_shape_lines"]
    for example in spec["unet_prefixed_keys"]["examples"]:
        assert mine[example["key"]] == example["shape"]
    assert sum(p.numel() for p in dig.unet.parameters()) == spec["unet_prefixed_keys"]["num_parameters"]
    label = [(k, v) for k, v in mine.items() if not k.startswith("unet.")]
    expected = [(e["key"], e["shape"]) for e in spec["non_unet_keys"]["keys"]]
    assert label == expected  # same keys, shapes and order
    n_label = sum(p.numel() for n, p in dig.named_parameters() if not n.startswith("unet."))
    assert n_label == spec["non_unet_keys"]["num_parameters"]
    buffers = {k for k, _ in dig.named_buffers()}
    assert buffers == {"position_embedding.0.pe", "position_embedding.1.pe", "position_embedding.2.pe"}


def test_identity_encoder_and_mapping_keys(full, ref):
    _, _, identity, mapping = full
    assert _shapes(identity) == {e["key"]: e["shape"] for e in ref["msid_encoder"]["keys"]}
    assert len(identity.state_dict()) == ref["msid_encoder"]["count"] == 178
    assert sum(p.numel() for p in identity.parameters()) == ref["msid_encoder"]["num_parameters"]
    assert _shapes(mapping) == {e["key"]: e["shape"] for e in ref["img2text_mapping"]["keys"]}
    assert sum(p.numel() for p in mapping.parameters()) == ref["img2text_mapping"]["num_parameters"]


def test_au_cue_shape(full, ref):
    cfg = full[0]
    assert [1, len(cfg["au_names"]), configs.token_dim(cfg)] == ref["au_cue"]["shape"]
    assert cfg["au_names"] == configs.DISFA12


def test_pe_matches_formula_and_derived_lengths():
    cfg = configs.full_config()
    assert configs.tap_tokens(cfg, 512, 512) == [64, 256, 256]
    assert configs.tap_tokens(cfg, 768, 768) == [144, 576, 576]  # not 512-only
    assert configs.required_multiple(cfg) == 64


def test_full_size_forward_shapes_on_meta(full):
    """Run the full DIG on meta tensors: at 512 px the stored PE buffers (64/256/256) are exactly the taps."""
    _, dig, _, _ = full
    used = []
    hooks = [pe.register_forward_hook(lambda m, a, o: used.append((a[0], o is m.pe))) for pe in dig.position_embedding]
    try:
        for latent, expect in ((64, [(64, True), (256, True), (256, True)]), (96, [(144, False), (576, False), (576, False)])):
            used.clear()
            with torch.device("meta"), torch.no_grad():
                x = torch.empty(4, 9, latent, latent)
                noise, det, reg, tokens = dig(x, torch.tensor(500), torch.empty(4, 77, 768), torch.empty(4, 12, 768),
                                              torch.empty(2, 2, 768), label_rows=slice(2, 4))
            assert noise.shape == (4, 4, latent, latent)
            assert det.shape == reg.shape == (2, 12) and tokens.shape == (2, 12, 768)
            assert used == expect
    finally:
        for h in hooks:
            h.remove()
