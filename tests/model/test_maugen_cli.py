"""``import-official`` and ``info`` through typer's CliRunner on tiny files."""

from __future__ import annotations

import json

import torch
from typer.testing import CliRunner

from conftest import make_inputs
from mifa_pipeline.maugen import MAUGen
from mifa_pipeline.maugen.checkpoints import sha256_file
from mifa_pipeline.maugen.cli import model_app

runner = CliRunner()


def _args(files, out, **override):
    f = {**files, **override}
    return ["import-official", "--base", str(f["base"]), "--unet-state", str(f["unet_state"]), "--au-cue", str(f["au_cue"]),
            "--msid", str(f["msid"]), "--mapping", str(f["mapping"]), "--out", str(out), "--preset", "tiny"]


def test_import_official_then_info(tiny, official_files, tmp_path):
    out = tmp_path / "maugen"
    result = runner.invoke(model_app, _args(official_files, out))
    assert result.exit_code == 0, result.output
    assert "12 AUs" in result.output and "64px" in result.output
    model = MAUGen.from_pretrained(out)
    images, masks = make_inputs(1)
    gens = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    a = model.sample(["a face"], images, masks, None, gens(), num_inference_steps=2)
    b = tiny.sample(["a face"], images, masks, None, gens(), num_inference_steps=2)
    assert torch.equal(a.images, b.images) and torch.equal(a.intensity, b.intensity)

    info = runner.invoke(model_app, ["info", str(out)])
    assert info.exit_code == 0, info.output
    assert "AU1, AU2, AU4, AU5, AU6, AU9, AU12, AU15, AU17, AU20, AU25, AU26" in info.output
    for comp in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "label_branch", "au_cue", "identity_encoder", "mapping"):
        assert comp in info.output
    digest = sha256_file(out / "label_branch" / "model.safetensors")
    assert f"{digest}  label_branch/model.safetensors" in info.output

    js = runner.invoke(model_app, ["info", str(out), "--json"])
    data = json.loads(js.output)
    assert data["au_names"][0] == "AU1" and data["parameters"]["au_cue"] == 12 * tiny.token_dim
    assert data["parameters"]["identity_encoder"] == sum(v.numel() for v in tiny.identity_encoder.state_dict().values())


def test_import_errors_are_clean(official_files, tmp_path):
    state = torch.load(official_files["unet_state"], weights_only=True)
    state.pop("dual_prediction_head.token_fc_layers_reg.3.2.bias")
    torch.save(state, tmp_path / "bad.pt")
    result = runner.invoke(model_app, _args(official_files, tmp_path / "o1", unet_state=tmp_path / "bad.pt"))
    assert result.exit_code == 2
    assert "bad.pt" in result.output and "dual_prediction_head.token_fc_layers_reg.3.2.bias" in result.output
    assert "Traceback" not in result.output and isinstance(result.exception, SystemExit)
    assert not (tmp_path / "o1").exists()

    missing = runner.invoke(model_app, _args(official_files, tmp_path / "o2", msid=tmp_path / "nope.pt"))
    assert missing.exit_code == 2 and "nope.pt: file not found" in missing.output


class _Evil:
    def __reduce__(self):
        return (print, ("unpickled!",))


def test_a_pickled_text_encoder_is_refused_in_one_line_without_unpickling(official_files, tmp_path, capsys):
    """The base's text encoder as pytorch_model.bin (an SD folder without safetensors): refused, never loaded,
    and the message advises nothing unsafe; the official .pt files the same."""
    import shutil

    from safetensors.torch import load_file

    base = tmp_path / "base"
    shutil.copytree(official_files["base"], base)
    te = base / "text_encoder"
    state = load_file(te / "model.safetensors")
    (te / "model.safetensors").unlink()
    torch.save({**state, "payload": _Evil()}, te / "pytorch_model.bin")
    result = runner.invoke(model_app, _args(official_files, tmp_path / "o", base=base))
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    assert result.output.count("\n") == 1 and "text_encoder: holds only pickled weights (pytorch_model.bin)" in result.output
    assert "weights_only" not in result.output and "Traceback" not in result.output
    evil = tmp_path / "mapping.pt"
    torch.save({"x": torch.zeros(1), "payload": _Evil()}, evil)
    result = runner.invoke(model_app, _args(official_files, tmp_path / "o", mapping=evil))
    assert result.exit_code == 2 and "mapping.pt: refused to load" in result.output and "(it names print)" in result.output
    assert "weights_only" not in result.output and "trust" not in result.output
    assert "unpickled!" not in capsys.readouterr().out and not (tmp_path / "o").exists()


def test_info_errors(tmp_path):
    result = runner.invoke(model_app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "not a MAUGen folder" in result.output
    (tmp_path / "maugen_config.json").write_text("{not json")
    result = runner.invoke(model_app, ["info", str(tmp_path)])
    assert result.exit_code == 2 and "invalid config" in result.output


def test_refuses_non_empty_output(official_files, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("keep me")
    result = runner.invoke(model_app, _args(official_files, tmp_path / "out"))
    assert result.exit_code == 2 and "not empty" in result.output


def test_store_half_halves_the_weights_and_loads_back_close(tiny, tmp_path):
    full, half = tmp_path / "full", tmp_path / "half"
    tiny.save_pretrained(full)
    result = runner.invoke(model_app, ["store-half", str(full), str(half)])
    assert result.exit_code == 0, result.output
    size = lambda root: sum(p.stat().st_size for p in root.rglob("*.safetensors"))  # noqa: E731
    assert size(half) < 0.6 * size(full)
    assert sorted(p.relative_to(half) for p in half.rglob("*")) == sorted(p.relative_to(full) for p in full.rglob("*"))
    model = MAUGen.from_pretrained(half)
    assert model.dig.unet.conv_in.weight.dtype == torch.float32
    images, masks = make_inputs(1)
    gens = lambda: [torch.Generator().manual_seed(0)]  # noqa: E731
    a = model.sample(["a face"], images, masks, None, gens(), num_inference_steps=2)
    b = tiny.sample(["a face"], images, masks, None, gens(), num_inference_steps=2)
    assert (a.images - b.images).abs().max() < 0.02 and (a.intensity - b.intensity).abs().max() < 0.02

    again = runner.invoke(model_app, ["store-half", str(full), str(half)])  # never over an existing model
    assert again.exit_code == 2 and "not empty" in again.output


def test_store_half_refuses_weights_float16_cannot_hold(tiny, tmp_path):
    from safetensors.torch import load_file, save_file

    tiny.save_pretrained(tmp_path / "full")
    cue = tmp_path / "full" / "au_cue" / "model.safetensors"
    tensors = load_file(cue)
    tensors["au_cue"] = tensors["au_cue"] * 0 + 1e6
    save_file(tensors, cue)
    result = runner.invoke(model_app, ["store-half", str(tmp_path / "full"), str(tmp_path / "half")])
    assert result.exit_code == 2 and "au_cue" in result.output and "float16" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]  # nothing half-written is left


def _folder_pair(tiny, tmp_path, change_cue):
    """Two saved copies of `tiny`, the second with its AU cue tensor replaced by change_cue(cue)."""
    import shutil

    from safetensors.torch import load_file, save_file

    a, b = tmp_path / "a", tmp_path / "b"
    tiny.save_pretrained(a)
    shutil.copytree(a, b)
    cue = b / "au_cue" / "model.safetensors"
    tensors = load_file(cue)
    tensors["au_cue"] = change_cue(tensors["au_cue"]).contiguous()
    save_file(tensors, cue)
    return a, b


def test_average_writes_the_weighted_mean_and_keeps_the_rest(tiny, tmp_path):
    a, b = _folder_pair(tiny, tmp_path, lambda cue: cue + 4.0)
    result = runner.invoke(model_app, ["average", str(a), str(b), str(tmp_path / "mix"), "--weight", "0.25"])
    assert result.exit_code == 0, result.output
    assert " 1 tensors differed" in result.output  # only the cue: the rest is equal in both
    mixed = MAUGen.from_pretrained(tmp_path / "mix")
    assert torch.allclose(mixed.au_cue.data, tiny.au_cue.data + 1.0, atol=1e-5)
    for shared in ("unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert (tmp_path / "mix" / shared).read_bytes() == (a / shared).read_bytes()  # shared parts unchanged
    assert sorted(p.relative_to(tmp_path / "mix") for p in (tmp_path / "mix").rglob("*")) == sorted(
        p.relative_to(a) for p in a.rglob("*"))

    again = runner.invoke(model_app, ["average", str(a), str(b), str(tmp_path / "mix")])
    assert again.exit_code == 2 and "not empty" in again.output
    bad = runner.invoke(model_app, ["average", str(a), str(b), str(tmp_path / "w"), "--weight", "1.5"])
    assert bad.exit_code == 2 and "weight" in bad.output and "1.5" in bad.output


def test_average_refuses_models_of_different_shapes(tiny, tmp_path):
    a, b = _folder_pair(tiny, tmp_path, lambda cue: cue[:, :-1])
    result = runner.invoke(model_app, ["average", str(a), str(b), str(tmp_path / "mix")])
    assert result.exit_code == 2 and "au_cue" in result.output and "shape" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing half-written is left


def test_average_refuses_models_with_other_tokenizers(tiny, tmp_path):
    a, b = _folder_pair(tiny, tmp_path, lambda cue: cue)
    config = b / "tokenizer" / "tokenizer_config.json"
    config.write_text(config.read_text().replace("{", '{"model_max_length_note": "other",', 1))
    result = runner.invoke(model_app, ["average", str(a), str(b), str(tmp_path / "mix")])
    assert result.exit_code == 2 and "tokenizer_config.json differs" in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]
