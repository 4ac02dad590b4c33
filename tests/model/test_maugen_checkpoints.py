"""Official files: strict key accounting, no unpickling. Our folder format: exact round trip."""

from __future__ import annotations

import shutil

import pytest
import torch
from diffusers import UNet2DConditionModel

from conftest import make_inputs, write_official
from mifa_pipeline.maugen import MAUGen
from mifa_pipeline.maugen.checkpoints import CheckpointError, import_official, read_state_dict, read_tensors


def _sample(model, n=2, steps=3):
    images, masks = make_inputs(n)
    ids = model.encode_identity(torch.rand(n, 3, 40, 40, generator=torch.Generator().manual_seed(5)))
    return model.sample(["<ID> <ID2> smiling", "a calm face"][:n], images, masks, ids,
                        [torch.Generator().manual_seed(i) for i in range(n)], num_inference_steps=steps)


def _same(a, b):
    assert torch.equal(a.images, b.images)
    assert torch.equal(a.occurrence_prob, b.occurrence_prob) and torch.equal(a.intensity, b.intensity)


def test_save_load_round_trip(tiny, tmp_path):
    tiny.save_pretrained(tmp_path / "m")
    loaded = MAUGen.from_pretrained(tmp_path / "m", device="cpu", dtype=torch.float32)
    assert loaded.config == tiny.config and loaded.au_names == tiny.au_names and loaded.resolution == 64
    for (k1, v1), (k2, v2) in zip(tiny.dig.state_dict().items(), loaded.dig.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)
    _same(_sample(tiny), _sample(loaded))


def test_round_trip_keeps_custom_au_list(tmp_path):
    aus = ["AU1", "AU2", "AU4", "AU6", "AU12"]
    m = MAUGen.tiny(seed=1, au_names=aus)
    m.save_pretrained(tmp_path / "m")
    loaded = MAUGen.from_pretrained(tmp_path / "m")
    assert loaded.au_names == aus and loaded.au_cue.shape == (1, 5, m.token_dim)
    assert _sample(loaded, n=1).intensity.shape == (1, 5)


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_import_official_matches_source(tiny, tmp_path, fmt):
    files = write_official(tiny, tmp_path, fmt=fmt)
    model = import_official(files["base"], files["unet_state"], files["au_cue"], files["msid"], files["mapping"], preset="tiny")
    assert model.au_names == tiny.au_names and model.resolution == tiny.resolution
    _same(_sample(tiny), _sample(model))


def _import(files, **override):
    f = {**files, **override}
    return import_official(f["base"], f["unet_state"], f["au_cue"], f["msid"], f["mapping"], preset="tiny")


def test_strict_missing_and_unexpected_keys(tiny, official_files, tmp_path):
    state = torch.load(official_files["unet_state"], weights_only=True)
    state.pop("auxiliary_head.1.idm.W_Q.weight")
    state.pop("unet.conv_in.bias")
    state["learnable_tokens"] = torch.zeros(12, tiny.token_dim)
    bad = tmp_path / "bad_unet.pt"
    torch.save(state, bad)
    with pytest.raises(CheckpointError) as err:
        _import(official_files, unet_state=bad)
    msg = str(err.value)
    assert str(bad) in msg
    assert "missing keys (2)" in msg and "auxiliary_head.1.idm.W_Q.weight" in msg and "unet.conv_in.bias" in msg
    assert "unexpected keys (1)" in msg and "learnable_tokens" in msg


def test_strict_module_prefix_and_shapes(official_files, tmp_path):
    msid = torch.load(official_files["msid"], weights_only=True)
    prefixed = {f"module.{k}": v for k, v in msid.items()}
    torch.save(prefixed, tmp_path / "msid.pt")
    with pytest.raises(CheckpointError, match=r"unexpected keys \(\d+\):\n    module\."):
        _import(official_files, msid=tmp_path / "msid.pt")
    mapping = torch.load(official_files["mapping"], weights_only=True)
    mapping["null_exp"] = torch.zeros(3)
    torch.save(mapping, tmp_path / "mapping.pt")
    with pytest.raises(CheckpointError, match=r"shape mismatches \(1\):\n    null_exp: file \[3\]"):
        _import(official_files, mapping=tmp_path / "mapping.pt")


def test_au_cue_shape_errors(official_files, tmp_path):
    torch.save(torch.zeros(1, 11, 32), tmp_path / "cue.pt")
    with pytest.raises(CheckpointError, match=r"AU cue has shape \[1, 11, 32\], expected \[1, 12, 32\]"):
        _import(official_files, au_cue=tmp_path / "cue.pt")


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_never_unpickles(official_files, tmp_path, capsys):
    path = tmp_path / "evil.pt"
    torch.save({"x": torch.zeros(1), "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="refused to load"):
        read_tensors(path)
    with pytest.raises(CheckpointError, match=str(path.name)):
        _import(official_files, mapping=path)
    assert "unpickled!" not in capsys.readouterr().out
    plain = tmp_path / "plain.bin"
    torch.save({"a": 1}, plain)  # loadable without code execution, but not a state dict
    with pytest.raises(CheckpointError, match="expected a state dict"):
        read_state_dict(plain)


def test_missing_file_and_base(official_files, tmp_path):
    with pytest.raises(CheckpointError, match="file not found"):
        _import(official_files, msid=tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="missing sub-folder 'unet'"):
        _import(official_files, base=tmp_path)
    with pytest.raises(CheckpointError, match="not a MAUGen folder"):
        MAUGen.from_pretrained(tmp_path)


def test_a_base_whose_unet_is_not_inpainting_is_refused(official_files, tmp_path):
    base = tmp_path / "base"
    shutil.copytree(official_files["base"], base)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    UNet2DConditionModel(**{**unet.config, "in_channels": 4}).save_pretrained(base / "unet")
    with pytest.raises(CheckpointError, match="in_channels is 4, an inpainting UNet for this VAE has 9"):
        _import(official_files, base=base)


def test_half_precision_folder_loads_in_requested_dtype(tmp_path):
    m = MAUGen.tiny(seed=2).to(dtype=torch.bfloat16)
    m.save_pretrained(tmp_path / "m")
    loaded = MAUGen.from_pretrained(tmp_path / "m", dtype=torch.float32)
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}
    assert loaded.dtype == torch.float32
    import json
    json.dumps(loaded.config)  # JSON-able
