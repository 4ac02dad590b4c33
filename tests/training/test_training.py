"""`mifa train`: losses go down, resume continues bit for bit, --base works, a trained checkpoint generates."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mifa_pipeline.maugen import MAUGen
from mifa_pipeline.stages.teacher import SHAPE_ATTRIBUTES
from mifa_pipeline.training import TrainConfig, setup, train
from mifa_pipeline.training.tokenizer import pretokenize, write_word_tokenizer

from .conftest import write_teacher_data

QUICK = dict(resolution=32, batch_size=6, val_identities=2, val_samples=2, val_steps=2, log_every=1, threads=1,
             warmup=2, seed=0)


def _log(out: Path, kind: str = "train") -> list[dict]:
    return [r for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if r["type"] == kind]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(str(p)).items()}


# --------------------------------------------------------------------------- pieces
def test_word_tokenizer_makes_every_corpus_word_one_token(tmp_path):
    from transformers import CLIPTokenizer

    corpus = ["a close-up portrait photo of <ID> <ID2>, the face shows strongly raised inner brows",
              "a person with dark brown skin, moderately pulled-up lip corners"]
    tok = CLIPTokenizer.from_pretrained(str(write_word_tokenizer(tmp_path / "tok", corpus)))
    for text in corpus:
        pieces = tok.convert_ids_to_tokens(tok(text.replace("<ID> <ID2>", "")).input_ids)[1:-1]
        assert len(pieces) == len(pretokenize(text)), pieces
    assert len(tok("an unseen zebra").input_ids) > 4  # unknown words still tokenise (sub-words / bytes)


def test_forward_helpers_match_the_model(tmp_path):
    """The autograd re-implementations equal the inference package's own forward passes."""
    model = MAUGen.tiny(seed=3, resolution=32)
    b, dim = 2, model.token_dim
    ident = torch.randn(b, 2, dim)
    prompts = ["a photo of <ID> <ID2> smiling", "plain prompt"]
    hidden, _ = setup.encode_prompts(model.text, prompts, ident)
    assert torch.equal(hidden, model.text.encode(prompts, ident))
    faces = torch.rand(b, 3, 40, 40)
    assert torch.allclose(model.mapping(setup.identity_features(model, faces)), model.encode_identity(faces))
    x = torch.randn(b, 9, 8, 8)
    t = torch.tensor([10, 500])
    cue = model.au_cue.expand(b, -1, -1)
    eps, levels, tokens = setup.dig_forward(model.dig, x, t, hidden, cue, ident)
    ref = model.dig(x, t, hidden, cue, ident)
    assert torch.equal(eps, ref[0]) and torch.equal(levels[-1][0], ref[1]) and torch.equal(levels[-1][1], ref[2])
    assert torch.equal(tokens, ref[3]) and len(levels) == 3


def test_focal_losses_and_info_nce():
    from mifa_pipeline.training.losses import focal_mse, info_nce, multilabel_focal

    p, y = torch.tensor([0.2, 0.9]), torch.tensor([0.0, 1.0])
    e = (p - y) ** 2
    assert torch.isclose(focal_mse(p, y), ((1 - torch.exp(-e)) ** 2 * e).mean())
    assert torch.isclose(focal_mse(p, y, gamma=0), e.mean())
    assert multilabel_focal(torch.tensor([5.0, -5.0]), torch.tensor([1.0, 0.0])) < multilabel_focal(torch.tensor([-5.0, 5.0]), torch.tensor([1.0, 0.0]))
    a = torch.eye(4)
    assert info_nce(a, a, torch.eye(4, dtype=torch.bool)) < info_nce(a, a.flip(0), torch.eye(4, dtype=torch.bool))


def test_colour_jitter_changes_colours_per_face_and_only_when_asked():
    from mifa_pipeline.training.trainer import colour_jitter

    faces = torch.full((3, 3, 8, 8), 0.5)
    assert colour_jitter(faces, 0.0, torch.Generator().manual_seed(0)) is faces
    a = colour_jitter(faces, 0.3, torch.Generator().manual_seed(0))
    assert torch.equal(a, colour_jitter(faces, 0.3, torch.Generator().manual_seed(0)))  # seeded
    assert a.min() >= 0 and a.max() <= 1
    per_face = a[:, :, :1, :1]                            # one colour per face and channel, all different
    assert torch.equal(a, per_face.expand_as(a)) and len(set(per_face.flatten().tolist())) == 9
    assert (per_face - 0.5).abs().max() <= 0.3 * 0.5 + 0.15 + 1e-6


def test_expression_weights_single_out_what_an_au_moved():
    from mifa_pipeline.training.losses import expression_weights, weighted_mean

    ref = torch.zeros(2, 3, 16, 16)
    img = ref.clone()
    img[0, :, 8, 3] = 0.5                                 # one moved pixel (a lip corner), nothing in row 1
    w = expression_weights(img, ref, 4.0)
    assert w.shape == (2, 1, 16, 16)
    assert torch.all(w[1] == 1) and w[0, 0, 8, 3] == 5.0
    assert w[0, 0, 10, 5] == 5.0 and w[0, 0, 11, 3] == 1.0   # widened 2 px each way (reach 5), no further
    small = img.clone()
    small[0, :, 8, 3] = 0.05                              # a faint change weighs less (saturates at 0.3)
    assert 1.0 < expression_weights(small, ref, 4.0)[0, 0, 8, 3] < 5.0
    lat = expression_weights(img, ref, 4.0, size=4)       # max-pooled to a latent grid
    assert lat.shape == (2, 1, 4, 4) and lat[0, 0, 2, 0] == 5.0 and lat[0, 0, 0, 3] == 1.0
    assert torch.all(expression_weights(img, ref, 0.0) == 1)
    values = torch.rand(2, 4, 4, 4)
    assert torch.isclose(weighted_mean(values, torch.ones(2, 1, 4, 4)), values.mean())
    assert torch.equal(weighted_mean(values, None), values.mean())
    assert weighted_mean(values, lat) != values.mean()


# --------------------------------------------------------------------------- training runs
def test_training_reduces_every_loss(teacher_data, tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(data=[str(teacher_data)], out=str(out), config="tiny", steps=80, vae_steps=40, lr=2e-3,
                      vae_lr=3e-3, checkpoint_every=1000, w_mrl=0.5, cond_drop_prob=0.0, paint_prob=0.0, ema=0,
                      **QUICK), echo=None)
    vae = [r for r in _log(out) if r["phase"] == "vae"]
    main = [r for r in _log(out) if r["phase"] == "main"]
    assert len(vae) == 40 and len(main) == 80

    def mean(rows, key):
        return sum(r[key] for r in rows) / len(rows)

    for key in ("vae_l1", "vae_mse"):
        assert mean(vae[-8:], key) < 0.8 * mean(vae[:8], key), key
    for key in ("diffusion", "occurrence", "intensity", "aux_occurrence", "aux_intensity", "mrl"):
        assert mean(main[-15:], key) < 0.9 * mean(main[:15], key), (key, mean(main[:15], key), mean(main[-15:], key))
    assert (out / "model" / "maugen_config.json").is_file()
    val = _log(out, "validation")
    assert val and Path(val[-1]["grid"]).is_file()


@pytest.fixture(scope="module")
def resumable_run(teacher_data, tmp_path_factory):
    """One uninterrupted run with a checkpoint every 2 steps (VAE phase and main phase), all kept."""
    root = tmp_path_factory.mktemp("resume")
    cfg = dict(data=[str(teacher_data)], config="tiny", steps=6, vae_steps=4, checkpoint_every=2, keep_checkpoints=100,
               **QUICK)
    train(TrainConfig(out=str(root / "a"), **cfg), echo=None)
    return root, cfg


@pytest.mark.parametrize("checkpoint", ["vae-0000002", "step-0000002"])
def test_resume_continues_bit_for_bit(resumable_run, checkpoint):
    root, cfg = resumable_run
    full = root / "a"
    assert {p.name for p in (full / "checkpoints").iterdir()} >= {"vae-0000002", "step-0000000", "step-0000004", "step-0000006"}
    part = root / f"b-{checkpoint}"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / checkpoint, part / "checkpoints" / checkpoint)
    train(TrainConfig(out=str(part), resume=True, **cfg), echo=None)
    starts = _log(part, "start")
    assert starts[-1]["resume_from"].endswith(checkpoint)
    # same loss trajectory after the checkpoint, same step counter, same final weights
    key = lambda r: (r["phase"], r["step"])  # noqa: E731
    a = {key(r): r for r in _log(full)}
    b = {key(r): r for r in _log(part)}
    assert b and set(b) <= set(a)
    for k, rec in b.items():
        for name in ("loss", "diffusion", "occurrence", "intensity", "mrl", "vae_l1"):
            if name in rec:
                assert rec[name] == a[k][name], (k, name)
    assert max(s for p, s in b if p == "main") == 6
    wa, wb = _weights(full / "model"), _weights(part / "model")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_resume_reads_the_latent_cache_and_still_continues_bit_for_bit(resumable_run, monkeypatch):
    """The uninterrupted run left its VAE latents in OUT; a resume beside that file loads them instead of
    encoding every image again (encoding is made to fail), and its losses and final weights are still the
    uninterrupted run's."""
    from mifa_pipeline.training.trainer import Trainer

    def no_encoding(self, images):
        raise AssertionError("the latent cache was on disk: nothing should be encoded")

    root, cfg = resumable_run
    full = root / "a"
    assert [r["loaded"] for r in _log(full, "latent_cache")] == [False]
    part = root / "cached"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(full / "checkpoints" / "step-0000002", part / "checkpoints" / "step-0000002")
    shutil.copy(full / "latent_cache.safetensors", part / "latent_cache.safetensors")
    monkeypatch.setattr(Trainer, "_encode_all", no_encoding)
    train(TrainConfig(out=str(part), resume=True, **cfg), echo=None)
    assert [(r["loaded"], r["reason"]) for r in _log(part, "latent_cache")] == [(True, "loaded")]
    a = {r["step"]: r for r in _log(full) if r["phase"] == "main"}
    b = {r["step"]: r for r in _log(part) if r["phase"] == "main"}
    assert sorted(b) == [3, 4, 5, 6]
    assert all(b[s]["loss"] == a[s]["loss"] and b[s]["diffusion"] == a[s]["diffusion"] for s in b)
    wa, wb = _weights(full / "model"), _weights(part / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_existing_checkpoints_need_resume(resumable_run):
    root, cfg = resumable_run
    with pytest.raises(FileExistsError):
        train(TrainConfig(out=str(root / "a"), **cfg), echo=None)


def test_trained_checkpoint_loads_and_generates(resumable_run):
    root, _ = resumable_run
    model = MAUGen.from_pretrained(root / "a" / "model")
    assert model.resolution == 32 and len(model.au_names) == 12
    refs = torch.rand(2, 3, 32, 32)
    masks = torch.zeros(2, 1, 32, 32)
    masks[:, :, 8:28, 8:24] = 1
    ids = model.encode_identity(refs)

    def run():
        gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
        return model.sample(["a close-up portrait photo of <ID> <ID2>, the face shows strongly raised cheeks"] * 2,
                            refs * (1 - masks), masks, ids, gens, num_inference_steps=3)

    first, again = run(), run()
    assert first.images.shape == (2, 3, 32, 32)
    assert torch.equal(first.images, again.images) and torch.equal(first.intensity, again.intensity)
    assert ((first.intensity >= 0) & (first.intensity <= 5)).all()
    # the checkpoint's optimizer state is plain tensors (safetensors) plus JSON
    ckpt = root / "a" / "checkpoints" / "step-0000006"
    state = load_file(str(ckpt / "training_state.safetensors"))
    assert any(k.startswith("opt/") for k in state) and any(k.startswith("raw/dig.") for k in state)
    assert json.loads((ckpt / "trainer.json").read_text())["step"] == 6


@pytest.mark.parametrize("resolution, factor, channels", [(64, 4, 4), (128, 8, 8)])
def test_small_config_keeps_a_16x16_latent_grid_at_any_resolution(resolution, factor, channels):
    """A finer demo image costs the UNet no more: the VAE factor and latent channels grow instead."""
    from mifa_pipeline.maugen import configs

    cfg = setup.small_config(resolution=resolution)
    assert configs.vae_scale_factor(cfg) == factor and cfg["vae"]["latent_channels"] == channels
    assert (cfg["unet"]["in_channels"], cfg["unet"]["out_channels"]) == (2 * channels + 1, channels)
    model = MAUGen.from_config(cfg, seed=0)
    refs = torch.rand(1, 3, resolution, resolution)
    masks = torch.zeros(1, 1, resolution, resolution)
    masks[:, :, resolution // 4:, resolution // 4: 3 * resolution // 4] = 1
    out = model.sample(["a close-up portrait photo of <ID> <ID2>"], refs * (1 - masks), masks,
                       model.encode_identity(refs), [torch.Generator().manual_seed(0)], num_inference_steps=2)
    assert out.images.shape == (1, 3, resolution, resolution) and out.intensity.shape == (1, 12)
    with pytest.raises(ValueError, match="resolution of 64"):
        setup.small_config(resolution=96)


def test_config_with_unet_channels_that_do_not_fit_the_vae_is_refused():
    from mifa_pipeline.maugen import configs

    cfg = setup.small_config(resolution=128)
    cfg["unet"]["in_channels"] = 9
    with pytest.raises(ValueError, match="in_channels/out_channels are 9/8, expected 17/8"):
        configs.validate(cfg)


# --------------------------------------------------------------------------- from a diffusers SD inpainting folder
def _write_tiny_sd_inpainting(folder: Path) -> Path:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from mifa_pipeline.maugen import configs
    from mifa_pipeline.maugen.text import write_tiny_tokenizer

    cfg = configs.tiny_config(resolution=32)
    torch.manual_seed(0)
    UNet2DConditionModel(**cfg["unet"]).save_pretrained(folder / "unet")
    AutoencoderKL(**cfg["vae"]).save_pretrained(folder / "vae")
    CLIPTextModel(CLIPTextConfig(**cfg["text_encoder"])).save_pretrained(folder / "text_encoder")
    CLIPTokenizer.from_pretrained(str(write_tiny_tokenizer(folder / "_tok"))).save_pretrained(folder / "tokenizer")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg["scheduler"]))
    return folder


def test_training_from_a_diffusers_base(teacher_data, tmp_path):
    base = _write_tiny_sd_inpainting(tmp_path / "sd-inpainting")
    out = tmp_path / "run"
    final = train(TrainConfig(data=[str(teacher_data)], out=str(out), base=str(base), config="tiny", steps=4,
                              checkpoint_every=100, ema=0, **QUICK), echo=None)
    log = _log(out)
    assert [r["phase"] for r in log] == ["main"] * 4  # the base's VAE is used as it is
    assert all(r["diffusion"] > 0 for r in log)
    trained, before = _weights(final), _weights(base)
    # VAE and text encoder frozen (from a base: default), UNet trained
    assert all(torch.equal(trained[k], before[k]) for k in before if k.startswith("vae/"))
    assert any(not torch.equal(trained[k], before[k]) for k in before if k.startswith("unet/"))
    model = MAUGen.from_pretrained(final)
    refs = torch.rand(1, 3, 32, 32)
    out_s = model.sample(["a photo of <ID> <ID2>"], refs, torch.ones(1, 1, 32, 32), model.encode_identity(refs),
                         [torch.Generator().manual_seed(0)], num_inference_steps=2)
    assert out_s.images.shape == (1, 3, 32, 32)


def test_training_from_an_init_checkpoint(resumable_run, teacher_data, tmp_path):
    root, _ = resumable_run
    out = tmp_path / "finetune"
    train(TrainConfig(data=[str(teacher_data)], out=str(out), init=str(root / "a" / "model"), config="tiny", steps=2,
                      checkpoint_every=100, identity_input="mask_region", mrl_colour_jitter=0.3, **QUICK), echo=None)
    assert [r["phase"] for r in _log(out)] == ["main", "main"]
    before, after = MAUGen.from_pretrained(root / "a" / "model"), MAUGen.from_pretrained(out / "model")
    assert after.au_names == before.au_names
    # --identity-input is written into the saved config, so the model is sampled as it was trained
    assert before.config["identity_encoder"].get("input", "frame") == "frame"
    assert after.config["identity_encoder"]["input"] == "mask_region"
    with pytest.raises(ValueError, match="mask_region"):
        after.encode_identity(torch.rand(1, 3, 32, 32))


def _write_vae(folder: Path, levels: int, channels: int) -> Path:
    from diffusers import AutoencoderKL

    from mifa_pipeline.maugen import configs

    vae = dict(configs.tiny_config()["vae"], latent_channels=channels, block_out_channels=[8, 16, 16, 16][:levels],
               down_block_types=["DownEncoderBlock2D"] * levels, up_block_types=["UpDecoderBlock2D"] * levels)
    torch.manual_seed(0)
    AutoencoderKL(**vae).save_pretrained(folder)
    return folder


def test_a_trained_model_moves_to_a_finer_vae_keeping_what_fits(resumable_run, teacher_data, tmp_path):
    """--init with --vae: only the UNet's latent-facing convolutions restart; then it trains at the new size."""
    root, _ = resumable_run
    before = MAUGen.from_pretrained(root / "a" / "model")
    vae = _write_vae(tmp_path / "vae8", levels=4, channels=8)
    moved, restarted = setup.with_vae(MAUGen.from_pretrained(root / "a" / "model"), vae, resolution=64)
    assert sorted(restarted) == ["unet.conv_in.weight", "unet.conv_out.bias", "unet.conv_out.weight"]
    old, new = before.dig.state_dict(), moved.dig.state_dict()
    assert all(torch.equal(new[k], old[k]) for k in new if k not in restarted)
    assert new["unet.conv_in.weight"].shape[1] == 17 and new["unet.conv_out.weight"].shape[0] == 8
    assert torch.equal(moved.au_cue, before.au_cue)
    assert all(torch.equal(a, b) for a, b in zip(moved.identity_encoder.parameters(), before.identity_encoder.parameters()))
    # the same latent layout keeps every weight
    assert setup.with_vae(before, root / "a" / "model")[1] == []
    # another size without a VAE for it is refused, and nothing is written
    with pytest.raises(ValueError, match="--resolution is 64 but the model draws 32 px images"):
        train(TrainConfig(data=[str(teacher_data)], out=str(tmp_path / "refused"), init=str(root / "a" / "model"),
                          config="tiny", steps=2, **dict(QUICK, resolution=64)), echo=None)
    assert not (tmp_path / "refused" / "checkpoints").exists() or not any((tmp_path / "refused" / "checkpoints").iterdir())

    out = tmp_path / "moved"
    train(TrainConfig(data=[str(teacher_data)], out=str(out), init=str(root / "a" / "model"), vae=str(vae), config="tiny",
                      steps=2, checkpoint_every=100, **dict(QUICK, resolution=64)), echo=None)
    assert _log(out, "new_vae")[0]["restarted"] == restarted
    trained = MAUGen.from_pretrained(out / "model")
    assert trained.resolution == 64 and trained.vae.config.latent_channels == 8
    refs = torch.rand(1, 3, 64, 64)
    masks = torch.ones(1, 1, 64, 64)
    drawn = trained.sample(["a portrait of <ID> <ID2>"], refs * 0, masks, trained.encode_identity(refs),
                           [torch.Generator().manual_seed(0)], num_inference_steps=2)
    assert drawn.images.shape == (1, 3, 64, 64)


def test_expression_weights_reach_the_trainers_losses(resumable_run, teacher_data, tmp_path):
    """Same seed, so the same batches and noise: the weights change the diffusion and reconstruction losses
    of the first step, and nothing else."""
    root, _ = resumable_run

    def first_step(name, **weights):
        out = tmp_path / name
        train(TrainConfig(data=[str(teacher_data)], out=str(out), init=str(root / "a" / "model"), config="tiny",
                          steps=1, decoder_steps=1, checkpoint_every=100, ema=0, **weights, **QUICK), echo=None)
        log = _log(out)
        return next(r for r in log if r["phase"] == "main"), next(r for r in log if r["phase"] == "decoder")

    main, dec = first_step("plain")
    main_w, dec_w = first_step("weighted", vae_expression_weight=4.0, diffusion_expression_weight=4.0)
    assert main_w["diffusion"] != main["diffusion"] and dec_w["vae_l1"] != dec["vae_l1"]
    assert main_w["occurrence"] == main["occurrence"] and main_w["intensity"] == main["intensity"]


# --------------------------------------------------------------------------- CLI
def test_cli_mounted_as_mifa_train(teacher_data, tmp_path):
    import typer
    from typer.testing import CliRunner

    from mifa_pipeline.training.cli import train_app

    app = typer.Typer()

    @app.command()
    def other() -> None:  # a second command, so `train` is a real sub-command as in `mifa`
        pass

    app.add_typer(train_app, name="train")
    runner = CliRunner()
    out = tmp_path / "cli"
    res = runner.invoke(app, ["train", str(teacher_data), "--out", str(out), "--steps", "2", "--vae-steps", "1",
                              "--batch-size", "4", "--resolution", "32", "--val-samples", "1", "--val-steps", "1",
                              "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert (out / "model" / "maugen_config.json").is_file() and "model:" in res.output
    res = runner.invoke(app, ["train", str(teacher_data), "--out", str(out), "--base", "x", "--init", "y"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["train", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")])
    assert res.exit_code == 2 and "missing" in res.output
    for flag in ("--diffusion-expression-weight", "--decoder-adversarial-weight", "--identity-attribute-weight"):
        res = runner.invoke(app, ["train", str(teacher_data), "--out", str(tmp_path / "o3"), flag, "-1"])
        assert res.exit_code == 2 and f"{flag} must be >= 0" in res.output and "-1" in res.output
        assert not (tmp_path / "o3").exists()  # refused before anything was written


def test_decoder_phase_trains_only_the_vae_decoder(resumable_run, teacher_data, tmp_path):
    root, _ = resumable_run
    out = tmp_path / "decoder"
    train(TrainConfig(data=[str(teacher_data)], out=str(out), init=str(root / "a" / "model"), config="tiny", steps=0,
                      decoder_steps=12, vae_lr=3e-3, checkpoint_every=100, vae_expression_weight=4.0, **QUICK), echo=None)
    log = [r for r in _log(out) if r["phase"] == "decoder"]
    assert len(log) == 12 and sum(r["vae_l1"] for r in log[-4:]) < sum(r["vae_l1"] for r in log[:4])
    before, after = _weights(root / "a" / "model"), _weights(out / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.split("/", 1)[1].startswith(("decoder.", "post_quant_conv.")) for k in changed), sorted(changed)[:5]
    assert (out / "checkpoints" / "dec-0000012").is_dir()


def test_decoder_critic_trains_and_resumes_bit_for_bit(resumable_run, teacher_data, tmp_path):
    """--decoder-adversarial-weight: the critic's hinge terms are logged and reach the decoder's loss, and its
    weights and optimizer are in the decoder checkpoints, so a resumed run ends with the same weights."""
    root, _ = resumable_run
    cfg = dict(data=[str(teacher_data)], init=str(root / "a" / "model"), config="tiny", steps=0, decoder_steps=4,
               vae_lr=3e-3, checkpoint_every=2, keep_checkpoints=100, **QUICK)
    train(TrainConfig(out=str(tmp_path / "plain"), **cfg), echo=None)
    train(TrainConfig(out=str(tmp_path / "full"), decoder_adversarial_weight=0.5, **cfg), echo=None)
    plain = [r for r in _log(tmp_path / "plain") if r["phase"] == "decoder"]
    full = [r for r in _log(tmp_path / "full") if r["phase"] == "decoder"]
    assert all("adv_critic" in r and "adv_decoder" in r for r in full) and not any("adv_critic" in r for r in plain)
    assert full[0]["vae_l1"] == plain[0]["vae_l1"] and full[0]["loss"] != plain[0]["loss"]  # same batch, added term
    ckpt = load_file(str(tmp_path / "full" / "checkpoints" / "dec-0000004" / "training_state.safetensors"))
    assert any(k.startswith("critic/") for k in ckpt) and any(k.startswith("critic_opt/") for k in ckpt)
    assert _weights(tmp_path / "full" / "model").keys() == _weights(tmp_path / "plain" / "model").keys()  # training-only

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "dec-0000002", part / "checkpoints" / "dec-0000002")
    train(TrainConfig(out=str(part), resume=True, decoder_adversarial_weight=0.5, **cfg), echo=None)
    resumed = {r["step"]: r for r in _log(part) if r["phase"] == "decoder"}
    assert sorted(resumed) == [3, 4]
    for r in full[2:]:
        assert resumed[r["step"]]["adv_critic"] == r["adv_critic"] and resumed[r["step"]]["loss"] == r["loss"]
    wa, wb = _weights(tmp_path / "full" / "model"), _weights(part / "model")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_identity_attributes_train_the_words_and_resume(teacher_data, tmp_path):
    """--identity-attribute-weight: the <ID> words learn to predict each identity's shape attributes (the term
    falls), the read-out head is resumed from checkpoints, and data without the table is refused up front."""
    data = write_teacher_data(tmp_path / "with_attributes", identities=6, per_identity=3, size=32, attributes=True)
    cfg = dict(data=[str(data)], config="tiny", steps=40, vae_steps=2, lr=3e-3, checkpoint_every=20,
               keep_checkpoints=100, w_mrl=0.0, ema=0, identity_attribute_weight=1.0, **QUICK)
    train(TrainConfig(out=str(tmp_path / "full"), **cfg), echo=None)
    log = [r for r in _log(tmp_path / "full") if r["phase"] == "main"]
    first, last = (sum(r["identity_attributes"] for r in rows) / 5 for rows in (log[:5], log[-5:]))
    assert last < 0.7 * first, (first, last)
    state = load_file(str(tmp_path / "full" / "checkpoints" / "step-0000040" / "training_state.safetensors"))
    assert state["mrl/attributes.weight"].shape[0] == len(SHAPE_ATTRIBUTES)

    part = tmp_path / "part"
    (part / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step-0000020", part / "checkpoints" / "step-0000020")
    train(TrainConfig(out=str(part), resume=True, **cfg), echo=None)
    resumed = {r["step"]: r for r in _log(part) if r["phase"] == "main"}
    assert all(resumed[r["step"]]["identity_attributes"] == r["identity_attributes"] for r in log[20:])

    plain = tmp_path / "plain"
    train(TrainConfig(out=str(plain), **{**cfg, "identity_attribute_weight": 0.0, "steps": 2}), echo=None)
    assert not any("identity_attributes" in r for r in _log(plain))
    with pytest.raises(ValueError, match=f"missing in: {teacher_data}"):
        train(TrainConfig(out=str(tmp_path / "refused"), **{**cfg, "data": [str(teacher_data)]}), echo=None)
    assert not (tmp_path / "refused").exists()


def test_identity_image_judge_passes_gradients_to_the_faces_only(resumable_run):
    """The identity side judging generated faces is held fixed: no gradient reaches its weights (so it cannot
    learn to agree with the images), its BatchNorm statistics stay as they were, its train mode comes back."""
    root, _ = resumable_run
    model = MAUGen.from_pretrained(root / "a" / "model")
    model.train()
    head = torch.nn.Linear(2 * model.token_dim, 5)
    judge = [model.identity_encoder, model.mapping, head]
    for module in judge:
        module.requires_grad_(True)
    buffers = {k: v.clone() for k, v in model.identity_encoder.named_buffers()}
    faces = torch.rand(3, 3, 32, 32, requires_grad=True)
    masks = torch.ones(3, 1, 32, 32)
    setup.judged_attributes(model, head, faces, masks).square().sum().backward()
    assert faces.grad is not None and faces.grad.abs().sum() > 0
    assert all(p.grad is None for module in judge for p in module.parameters())
    assert all(torch.equal(v, buffers[k]) for k, v in model.identity_encoder.named_buffers())
    assert model.identity_encoder.training and model.mapping.training


def test_identity_image_term_reaches_the_unet(tmp_path):
    """--identity-image-weight: same batch and noise, so the first step's diffusion loss is the same, the term is
    logged and added, and the UNet ends the step elsewhere; without attribute training it is refused."""
    data = write_teacher_data(tmp_path / "with_attributes", identities=6, per_identity=3, size=32, attributes=True)
    cfg = dict(data=[str(data)], config="tiny", steps=1, vae_steps=1, checkpoint_every=100, ema=0,
               identity_attribute_weight=0.5, **QUICK)
    train(TrainConfig(out=str(tmp_path / "plain"), **cfg), echo=None)
    train(TrainConfig(out=str(tmp_path / "judged"), identity_image_weight=1.0, **cfg), echo=None)
    plain, judged = (next(r for r in _log(tmp_path / n) if r["phase"] == "main") for n in ("plain", "judged"))
    assert "identity_image" not in plain and judged["identity_image"] > 0
    assert judged["diffusion"] == plain["diffusion"] and judged["loss"] != plain["loss"]
    a, b = _weights(tmp_path / "plain" / "model"), _weights(tmp_path / "judged" / "model")
    assert any(not torch.equal(a[k], b[k]) for k in a if k.startswith("unet/"))
    with pytest.raises(ValueError, match="--identity-attribute-weight"):
        train(TrainConfig(out=str(tmp_path / "refused"), identity_image_weight=1.0,
                          **{**cfg, "identity_attribute_weight": 0.0}), echo=None)
    assert not (tmp_path / "refused").exists()


def test_training_reads_the_published_identity_table_or_picks_references_without_one(teacher_data, tmp_path):
    """A build's identities.parquet gives the references; a user's own shards without it still load (the least
    expressive sample stands in); a build of mifa's earlier layout (tables under _work/units) is refused."""
    import shutil

    from mifa_pipeline.training.data import load_folder

    with_table = load_folder(teacher_data, 32)
    own = tmp_path / "own"
    shutil.copytree(teacher_data, own)
    (own / "identities.parquet").unlink()
    without = load_folder(own, 32)
    assert without.ref_images.shape == with_table.ref_images.shape
    assert not torch.equal(without.ref_images, with_table.ref_images)
    (own / "_work" / "units").mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="earlier layout"):
        load_folder(own, 32)
