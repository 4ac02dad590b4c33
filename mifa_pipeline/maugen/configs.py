"""Component configurations of MAUGen: the full SD-1.5 size and a tiny size for tests and CPU.

Everything the networks need is derived from one JSON-able dict (``MAUGen.config``), so a checkpoint
folder fully describes itself. The full sizes are those of the official checkpoints
(shared/reference/maugen-interface.md §1-§3); the tiny sizes keep every class and only shrink widths.
"""

from __future__ import annotations

import copy
from typing import Any

# DISFA-12, the AU set and row order of the official AU cue (reference §2, au-conventions.md).
DISFA12: list[str] = ["AU1", "AU2", "AU4", "AU5", "AU6", "AU9", "AU12", "AU15", "AU17", "AU20", "AU25", "AU26"]

# FACS names, used for the language initialisation of the AU cue (reference §2, "Language init").
FACS_NAMES: dict[str, str] = {
    "AU1": "Inner Brow Raiser", "AU2": "Outer Brow Raiser", "AU4": "Brow Lowerer", "AU5": "Upper Lid Raiser",
    "AU6": "Cheek Raiser", "AU7": "Lid Tightener", "AU9": "Nose Wrinkler", "AU10": "Upper Lip Raiser",
    "AU12": "Lip Corner Puller", "AU14": "Dimpler", "AU15": "Lip Corner Depressor", "AU17": "Chin Raiser",
    "AU20": "Lip Stretcher", "AU23": "Lip Tightener", "AU24": "Lip Pressor", "AU25": "Lips Part", "AU26": "Jaw Drop",
}

FORMAT_NAME = "mifa-maugen"
FORMAT_VERSION = 1

# diffusers UNet2DConditionModel config of SD-1.5 inpainting (reference JSON, custom_unet.unet_config).
SD15_INPAINT_UNET: dict[str, Any] = {
    "sample_size": 64,
    "in_channels": 9,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    "norm_num_groups": 32,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
}

SD15_VAE: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 512,
    "scaling_factor": 0.18215,
}

# CLIP ViT-L/14 text tower. eos_token_id is the real <|endoftext|> id so that the pooled output stays
# correct after <ID>/<ID2> are appended to the vocabulary (transformers' eos_token_id==2 legacy path
# would take the argmax id, i.e. <ID>).
SD15_TEXT: dict[str, Any] = {
    "vocab_size": 49408,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "projection_dim": 768,
    "bos_token_id": 49406,
    "eos_token_id": 49407,
    "pad_token_id": 49407,
}

# The SD-1.5 inpainting scheduler: DDIM, scaled-linear betas, "leading" spacing (reference §4.2).
SD15_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDIMScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
}

# Label branch (reference §1.3-§1.6). Widths that the official code hard-codes are config here so the
# tiny model can shrink them; the full values reproduce the official key shapes exactly.
FULL_LABEL: dict[str, Any] = {
    "stem_channels": 512,     # pointwise_conv1 output
    "stem_groups": 256,       # depthwise_conv2 groups (2 channels per group)
    "patch_channels": 256,    # pointwise_conv2 output
    "patch_size": 4,          # 4x4 patches -> 4096 features
    "idm_dim": 128,           # IDM hidden size d
    "num_heads": 8,           # AU transformer MHA heads
    "ffn_dim": 512,           # AU transformer FFN width
    "head_hidden": 384,       # dual head per-AU MLP width
    "use_idm": True,
    "use_lgfe": True,
}

# What the identity encoder reads: the whole reference (official) or only the region the model redraws.
IDENTITY_INPUTS = ("frame", "mask_region")

# MSID ViT (timm names) on 112 px faces; features after blocks 2, 5, 8, 11 (reference §3).
FULL_IDENTITY: dict[str, Any] = {
    "image_size": 112,
    "patch_size": 8,
    "embed_dim": 384,
    "depth": 12,
    "num_heads": 12,
    "mlp_ratio": 4.0,
    "feature_blocks": [2, 5, 8, 11],
    "pre_resize": 512,        # the official code first resizes the short side to 512, then squashes to 112
    # "input": "frame" (default, official: the whole reference) or "mask_region" (maugen.identity.mask_region)
}

# IMG2TEXTwithEXP(1536, 1536, 768, exp_dim=64); output width = text hidden size.
FULL_MAPPING: dict[str, Any] = {"middle_dim": 1536, "exp_dim": 64, "n_layer": 2}


def full_config(au_names: list[str] | None = None, resolution: int = 512) -> dict[str, Any]:
    """The configuration of the official MAUGen checkpoints."""
    return copy.deepcopy({
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "au_names": list(au_names or DISFA12),
        "resolution": resolution,
        "unet": SD15_INPAINT_UNET,
        "vae": SD15_VAE,
        "text_encoder": SD15_TEXT,
        "scheduler": SD15_SCHEDULER,
        "label_branch": FULL_LABEL,
        "identity_encoder": FULL_IDENTITY,
        "mapping": FULL_MAPPING,
        "max_text_tokens": 77,
    })


def tiny_config(au_names: list[str] | None = None, resolution: int = 64) -> dict[str, Any]:
    """Same classes, small widths: a 4-level UNet on 16x16 latents (VAE factor 4) at 64 px."""
    cfg = full_config(au_names, resolution)
    cfg["unet"].update({
        "sample_size": resolution // 4,
        "block_out_channels": [32, 32, 64, 64],
        "layers_per_block": 1,
        "cross_attention_dim": 32,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    })
    cfg["vae"].update({
        "down_block_types": ["DownEncoderBlock2D"] * 3,
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [8, 16, 16],
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "sample_size": resolution,
    })
    cfg["text_encoder"].update({
        "vocab_size": 516,  # written by tokenizer.write_tiny_tokenizer
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 32,
        "bos_token_id": 514,
        "eos_token_id": 515,
        "pad_token_id": 515,
    })
    cfg["label_branch"].update({
        "stem_channels": 16, "stem_groups": 8, "patch_channels": 8, "patch_size": 4,
        "idm_dim": 16, "num_heads": 2, "ffn_dim": 32, "head_hidden": 16,
    })
    cfg["identity_encoder"].update({
        "image_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 4, "num_heads": 2,
        "feature_blocks": [0, 1, 2, 3], "pre_resize": 64,
    })
    cfg["mapping"].update({"middle_dim": 64, "exp_dim": 8})
    return cfg


def token_dim(cfg: dict[str, Any]) -> int:
    """Width of every token the UNet cross-attends to (text, AU cue, identity pseudo-words)."""
    return int(cfg["unet"]["cross_attention_dim"])


def vae_scale_factor(cfg: dict[str, Any]) -> int:
    return 2 ** (len(cfg["vae"]["block_out_channels"]) - 1)


def inpainting_channels(latent_channels: int) -> dict[str, int]:
    """The UNet's in/out channels for a VAE with ``latent_channels``: it reads [noisy latent | mask |
    masked-image latent] and predicts one latent."""
    return {"in_channels": 2 * latent_channels + 1, "out_channels": latent_channels}


def validate(cfg: dict[str, Any]) -> None:
    """Fail early, with a readable message, on configs the networks cannot run."""
    if cfg.get("format") != FORMAT_NAME:
        raise ValueError(f"not a MAUGen config (format={cfg.get('format')!r}, expected {FORMAT_NAME!r})")
    if int(cfg.get("format_version", 0)) > FORMAT_VERSION:
        raise ValueError(f"MAUGen config format_version {cfg['format_version']} is newer than this code ({FORMAT_VERSION})")
    if not cfg["au_names"] or len(set(cfg["au_names"])) != len(cfg["au_names"]):
        raise ValueError(f"au_names must be a non-empty list without duplicates, got {cfg['au_names']}")
    if cfg["text_encoder"]["hidden_size"] != token_dim(cfg):
        raise ValueError("text_encoder.hidden_size must equal unet.cross_attention_dim")
    unet = cfg["unet"]
    latent = int(cfg["vae"].get("latent_channels", 4))
    expected = inpainting_channels(latent)
    if {k: unet[k] for k in expected} != expected:
        raise ValueError(f"unet in_channels/out_channels are {unet['in_channels']}/{unet['out_channels']}, expected "
                         f"{expected['in_channels']}/{expected['out_channels']} for a VAE with {latent} latent "
                         f"channels (latent | mask | masked latent)")
    if unet["up_block_types"].count("CrossAttnUpBlock2D") == 0:
        raise ValueError("the label branch needs at least one CrossAttnUpBlock2D")
    lb = cfg["label_branch"]
    if lb["stem_channels"] % lb["stem_groups"] or lb["patch_channels"] <= 0:
        raise ValueError("label_branch.stem_channels must be a multiple of stem_groups")
    if token_dim(cfg) % lb["num_heads"]:
        raise ValueError("token width must be a multiple of label_branch.num_heads")
    identity_input = cfg["identity_encoder"].get("input", "frame")
    if identity_input not in IDENTITY_INPUTS:
        raise ValueError(f"identity_encoder.input is {identity_input!r}, expected one of {IDENTITY_INPUTS}")
    factor = required_multiple(cfg)
    if cfg["resolution"] % factor:
        raise ValueError(f"resolution {cfg['resolution']} must be a multiple of {factor}")


def tap_levels(cfg: dict[str, Any]) -> list[int]:
    """Indices of the up blocks the label branch reads: every CrossAttnUpBlock2D (reference §1.2)."""
    return [i for i, t in enumerate(cfg["unet"]["up_block_types"]) if t == "CrossAttnUpBlock2D"]


def tap_channels(cfg: dict[str, Any]) -> list[int]:
    rev = list(reversed(cfg["unet"]["block_out_channels"]))
    return [rev[i] for i in tap_levels(cfg)]


def tap_downscale(cfg: dict[str, Any], up_index: int) -> int:
    """How much smaller than the latent the output of up block ``up_index`` is (all but the last upsample)."""
    n_down = len(cfg["unet"]["block_out_channels"]) - 1
    return 2 ** max(n_down - 1 - up_index, 0)


def tap_tokens(cfg: dict[str, Any], height: int, width: int) -> list[int]:
    """Patch tokens per level for an image of height x width pixels (64/256/256 at 512 px)."""
    lat_h, lat_w = height // vae_scale_factor(cfg), width // vae_scale_factor(cfg)
    p = cfg["label_branch"]["patch_size"]
    return [(lat_h // tap_downscale(cfg, i) // p) * (lat_w // tap_downscale(cfg, i) // p) for i in tap_levels(cfg)]


def required_multiple(cfg: dict[str, Any]) -> int:
    """Image sides must be multiples of this: VAE factor x max(UNet downsampling, coarsest tap x patch)."""
    n_down = len(cfg["unet"]["block_out_channels"]) - 1
    coarsest = max(tap_downscale(cfg, i) for i in tap_levels(cfg))
    return vae_scale_factor(cfg) * max(2 ** n_down, coarsest * cfg["label_branch"]["patch_size"])
