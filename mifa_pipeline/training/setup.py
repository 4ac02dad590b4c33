"""Which MAUGen to train: a preset configuration from scratch, an SD-1.5 inpainting folder (``--base``), or
one of our checkpoint folders (``--init``); and the forward passes training needs with gradients.

The model package is inference-only (frozen weights, ``no_grad`` text and identity encoders); the few
forward helpers here re-run the same computations with autograd (the ``<ID>`` splice of ``maugen.text``,
the identity path of ``MAUGen.encode_identity``, the DIG forward of ``maugen.unet`` with every level's
labels for deep supervision). ``tests/training`` checks that they equal the package's own outputs.
"""

from __future__ import annotations

import copy
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mifa_pipeline.maugen import MAUGen, configs
from mifa_pipeline.maugen.identity import IdentityEncoder, IdentityMapping, identity_input
from mifa_pipeline.maugen.text import TextSide
from mifa_pipeline.maugen.unet import MAUGenUNet

PRESETS = ("tiny", "small", "full")


def small_config(au_names: list[str] | None = None, resolution: int = 64) -> dict[str, Any]:
    """The demo model's configuration: a 3-level UNet on a 16x16 latent grid at any resolution 64 * 2^k.

    The VAE factor grows with the resolution (4 at 64 px, 8 at 128 px) and its latent channels with it
    (4, then 8: 12 and 24 pixel values per latent value), so a finer image costs the UNet no more steps'
    time, only a wider first and last convolution. Self-attention only at 8x8 and 4x4 (the 16x16 level has
    none: most of the CPU cost for little gain), token width 64, a 2-layer text encoder, 2 label-branch
    levels with 2x2 patches (16 and 64 tokens).
    """
    factor = resolution // 16
    if resolution % 16 or factor < 4 or factor & (factor - 1):
        raise ValueError(f"the small config needs a resolution of 64 * 2^k (64, 128, 256), got {resolution}")
    latent_channels = factor
    cfg = configs.tiny_config(au_names, resolution)
    d = 64
    cfg["unet"].update({
        "sample_size": 16,
        **configs.inpainting_channels(latent_channels),
        "block_out_channels": [32, 64, 128],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "cross_attention_dim": d,
        "attention_head_dim": 4,
        "norm_num_groups": 16,
    })
    vae_levels = factor.bit_length()   # factor 4 -> 3 levels, 8 -> 4
    cfg["vae"].update({
        "down_block_types": ["DownEncoderBlock2D"] * vae_levels,
        "up_block_types": ["UpDecoderBlock2D"] * vae_levels,
        "block_out_channels": ([24, 48] + [64] * vae_levels)[:vae_levels],
        "latent_channels": latent_channels,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "sample_size": resolution,
    })
    cfg["text_encoder"].update({
        "hidden_size": d, "intermediate_size": 2 * d, "num_hidden_layers": 2, "num_attention_heads": 4,
        "projection_dim": d,
    })
    cfg["label_branch"].update({
        "stem_channels": 32, "stem_groups": 16, "patch_channels": 16, "patch_size": 2,
        "idm_dim": 32, "num_heads": 4, "ffn_dim": 128, "head_hidden": 32,
    })
    cfg["identity_encoder"].update({
        "image_size": 64, "patch_size": 8, "embed_dim": 64, "depth": 4, "num_heads": 4,
        "feature_blocks": [0, 1, 2, 3], "pre_resize": 64,
    })
    cfg["mapping"].update({"middle_dim": 128, "exp_dim": 8})
    configs.validate(cfg)
    return cfg


def preset_config(name: str, au_names: list[str] | None, resolution: int) -> dict[str, Any]:
    if name == "tiny":
        return configs.tiny_config(au_names, resolution)
    if name == "small":
        return small_config(au_names, resolution)
    if name == "full":
        return configs.full_config(au_names, resolution)
    raise ValueError(f"unknown config {name!r}; choose one of {PRESETS}")


def _library_config(config) -> dict[str, Any]:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _text_config(text_encoder) -> dict[str, Any]:
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "max_position_embeddings", "hidden_act", "layer_norm_eps", "projection_dim",
            "bos_token_id", "eos_token_id", "pad_token_id")
    d = text_encoder.config.to_dict()
    return {k: d[k] for k in keep if k in d}


def build_from_scratch(preset: str, au_names: list[str], resolution: int, tokenizer_dir: str | Path, seed: int) -> MAUGen:
    """Random weights of ``preset`` with the tokenizer in ``tokenizer_dir`` (vocabulary size taken from it)."""
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(str(tokenizer_dir))
    vocab = tokenizer.get_vocab()
    cfg = preset_config(preset, au_names, resolution)
    cfg["text_encoder"].update({
        "vocab_size": len(vocab), "bos_token_id": vocab["<|startoftext|>"],
        "eos_token_id": vocab["<|endoftext|>"], "pad_token_id": vocab["<|endoftext|>"],
    })
    return MAUGen.from_config(cfg, seed=seed, tokenizer=tokenizer)


def build_from_base(base: str | Path, preset: str, au_names: list[str], resolution: int | None, seed: int) -> MAUGen:
    """UNet, VAE, text encoder, tokenizer and scheduler from a diffusers SD inpainting folder; the label
    branch, identity encoder and mapping new (sizes of ``preset``: "full" for SD-1.5)."""
    from mifa_pipeline.maugen.checkpoints import load_base

    parts = load_base(base)
    unet, vae, text_encoder = parts["unet"], parts["vae"], parts["text_encoder"]
    cfg = preset_config(preset if preset != "small" else "tiny", au_names, 512)
    cfg["unet"] = _library_config(unet.config)
    cfg["vae"] = _library_config(vae.config)
    cfg["text_encoder"] = _text_config(text_encoder)
    cfg["scheduler"] = {k: v for k, v in parts["scheduler"].items()}
    cfg["resolution"] = int(resolution or int(unet.config.sample_size) * configs.vae_scale_factor(cfg))
    if configs.token_dim(cfg) % cfg["label_branch"]["num_heads"]:
        cfg["label_branch"]["num_heads"] = 1
    configs.validate(cfg)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        dig = MAUGenUNet(cfg, unet=unet)
        identity_encoder = IdentityEncoder(cfg["identity_encoder"])
        mapping = IdentityMapping(identity_encoder.out_dim, configs.token_dim(cfg), cfg["mapping"])
        cue = torch.randn(1, len(cfg["au_names"]), configs.token_dim(cfg))
    text = TextSide(parts["tokenizer"], text_encoder, cfg["max_text_tokens"])
    cfg["text_encoder"] = _text_config(text_encoder)
    return MAUGen(cfg, dig, vae, text, identity_encoder, mapping, cue)


def rebuild(model: MAUGen, config: dict[str, Any]) -> MAUGen:
    """The same networks under a changed config (e.g. the VAE scaling factor found after its training)."""
    return MAUGen(copy.deepcopy(config), model.dig, model.vae, model.text, model.identity_encoder, model.mapping,
                  model.au_cue.data)


def with_vae(model: MAUGen, path: str | Path, resolution: int | None = None, seed: int = 0) -> tuple[MAUGen, list[str]]:
    """``model`` with the VAE of ``path`` (our model folder, or a diffusers ``AutoencoderKL`` folder), at
    ``resolution`` (default: the model's), and the names of the DIG weights that had to start afresh.

    Where the new VAE's latents differ in channels or the image in size, the UNet is rebuilt for them: the
    weights of its first and last convolutions that read and write latents start afresh (``seed``), every
    weight whose shape still fits (the rest of the UNet, the label branch) is kept, and so are the
    text encoder, identity encoder, mapping and AU cue. That moves a trained model to a finer VAE (the
    demo from 64 px to 128 px) without learning everything again.
    """
    from diffusers import AutoencoderKL

    path = Path(path)
    folder = path / "vae" if (path / "vae" / "config.json").is_file() else path
    from mifa_pipeline.maugen.checkpoints import library_weights

    vae = AutoencoderKL.from_pretrained(library_weights(folder), local_files_only=True, use_safetensors=True)
    config = model.config
    config["resolution"] = int(resolution or config["resolution"])
    config["vae"] = {**_library_config(vae.config), "sample_size": config["resolution"]}
    config["unet"].update({**configs.inpainting_channels(int(vae.config.latent_channels)),
                           "sample_size": config["resolution"] // configs.vae_scale_factor(config)})
    configs.validate(config)
    dig, restarted = model.dig, []
    if config["unet"] != model.config["unet"]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dig = MAUGenUNet(config)
        old, new = model.dig.state_dict(), dig.state_dict()
        restarted = [k for k, v in new.items() if k not in old or old[k].shape != v.shape]
        dig.load_state_dict({k: (new[k] if k in restarted else old[k]) for k in new})
    return MAUGen(config, dig, vae, model.text, model.identity_encoder, model.mapping, model.au_cue.data), restarted


# --------------------------------------------------------------------------- forward passes with grad
def encode_prompts(text: TextSide, prompts: list[str], identity: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``TextSide.encode`` with autograd, plus the pooled output: (last_hidden_state [B,T,D], pooled [B,D]).

    identity: [B,2,D] or None; rows whose prompt has no ``<ID>`` ignore it.
    """
    out = text.forward_spliced(prompts, identity)
    return out.last_hidden_state, out.pooler_output


def identity_features(model: MAUGen, faces: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
    """Identity-encoder features [B, 4*dim] of RGB faces in [0,1] (masks [B,1,H,W] in [0,1]), with autograd."""
    x = identity_input(faces, masks, model.config["identity_encoder"])
    return model.identity_encoder(x.to(model.identity_encoder.cls_token.device))


def judged_attributes(model: MAUGen, head: nn.Module, faces: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """The identity attributes the identity side (encoder -> mapping -> ``head``) reads from faces in [0,1],
    with its weights held fixed and in eval mode: gradients reach the faces only, so the judge cannot learn
    to agree with the images it judges (and its BatchNorm statistics never see them)."""
    enc, mapping = model.identity_encoder, model.mapping
    modes = enc.training, mapping.training
    enc.eval()
    mapping.eval()

    def fixed(module: nn.Module) -> dict[str, torch.Tensor]:
        return {**{k: v.detach() for k, v in module.named_parameters()}, **dict(module.named_buffers())}

    try:
        x = identity_input(faces, masks, model.config["identity_encoder"]).to(enc.cls_token.device)
        words = torch.func.functional_call(mapping, fixed(mapping), (torch.func.functional_call(enc, fixed(enc), (x,)),))
        return torch.func.functional_call(head, fixed(head), (words.flatten(1),))
    finally:
        enc.train(modes[0])
        mapping.train(modes[1])


def dig_forward(dig: MAUGenUNet, sample, timestep, text, au_cue, identity):
    """``MAUGenUNet.forward`` returning every level's labels: (noise, [(det, reg) per level], final tokens)."""
    ctx = torch.cat([text, au_cue], dim=1)
    with dig._capture() as taps:
        noise = dig.unet(sample, timestep, encoder_hidden_states=ctx, return_dict=False)[0]
    emb, tokens = taps["emb"], au_cue
    ident = identity.flatten(1)
    levels = []
    for level in range(len(dig.tap_levels)):
        s = dig.auxiliary_head[level](taps[level], emb, ident)
        s_pos = s + dig.position_embedding[level](s.shape[1])
        tokens = dig.au_transformer[level](s, s_pos, tokens, ctx)
        levels.append(dig.dual_prediction_head(tokens))
    return noise, levels, tokens


class MRLHeads(nn.Module):
    """Projections of the MRL alignment term into one D-dim space (training only, never in the model folder):
    pooled text, AU tokens (mean over AUs), identity pseudo-words, identity features of the target image;
    with ``n_attributes``, also a linear read-out of the identity words' attributes (their face shape)."""

    def __init__(self, dim: int, id_feature_dim: int, n_attributes: int = 0):
        super().__init__()
        self.text = nn.Linear(dim, dim)
        self.au = nn.Linear(dim, dim)
        self.identity = nn.Linear(2 * dim, dim)
        self.image = nn.Linear(id_feature_dim, dim)
        self.attributes = nn.Linear(2 * dim, n_attributes) if n_attributes else None


def save_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    tmp.replace(path)


def temp_dir() -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix="mifa-train-")
