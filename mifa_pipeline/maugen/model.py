"""``MAUGen``: the whole model (MRL text + identity, AU cue, DIG, VAE) behind the API the pipeline calls."""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import nn
from transformers import CLIPTokenizer

from . import configs
from .identity import IdentityEncoder, IdentityMapping, identity_input
from .sampler import MAUGenOutput
from .sampler import sample as _sample
from .text import TextSide, build_text_encoder, write_tiny_tokenizer
from .unet import MAUGenUNet


class MAUGen(nn.Module):
    """MAUGen networks plus the sampler. Construct with ``tiny``, ``from_config``, ``from_pretrained`` or
    ``checkpoints.import_official``; all weights are frozen (inference only).

    The identity encoder and mapping always stay in float32 (the official code runs them outside
    autocast, reference §3); everything else follows ``to(dtype=...)``.
    """

    def __init__(
        self,
        config: dict[str, Any],
        dig: MAUGenUNet,
        vae: AutoencoderKL,
        text: TextSide,
        identity_encoder: IdentityEncoder,
        mapping: IdentityMapping,
        au_cue: torch.Tensor,
    ):
        super().__init__()
        configs.validate(config)
        self._config = copy.deepcopy(config)
        self.dig, self.vae, self.text = dig, vae, text
        self.identity_encoder, self.mapping = identity_encoder, mapping
        shape = (1, len(config["au_names"]), configs.token_dim(config))
        if tuple(au_cue.shape) != shape:
            raise ValueError(f"AU cue must have shape {list(shape)}, got {list(au_cue.shape)}")
        self.au_cue = nn.Parameter(au_cue.detach().clone(), requires_grad=False)
        # Samples per model call inside ``sample`` (None: the caller's whole batch, results then depend on
        # the batch within float tolerance). 1: bitwise batch invariant on CPU, any thread count. k > 1 (last
        # chunk padded): bitwise on 1 CPU thread, expected on GPU; see README "Batch invariance".
        self.micro_batch_size: int | None = None
        self.requires_grad_(False)
        self.eval()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_config(cls, config: dict[str, Any], seed: int = 0, tokenizer: CLIPTokenizer | None = None) -> "MAUGen":
        """Random weights from ``config``, deterministic for ``seed``; the tokenizer defaults to the offline
        byte-level one of ``text.write_tiny_tokenizer`` (its ids fit any vocabulary of >= 516 rows)."""
        configs.validate(config)
        if tokenizer is None:
            with tempfile.TemporaryDirectory() as tmp:
                tokenizer = CLIPTokenizer.from_pretrained(write_tiny_tokenizer(tmp))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            dig = MAUGenUNet(config)
            vae = AutoencoderKL(**config["vae"])
            text = TextSide(tokenizer, build_text_encoder(config["text_encoder"]), config["max_text_tokens"])
            identity_encoder = IdentityEncoder(config["identity_encoder"])
            mapping = IdentityMapping(identity_encoder.out_dim, configs.token_dim(config), config["mapping"])
            au_cue = torch.randn(1, len(config["au_names"]), configs.token_dim(config))
        return cls(config, dig, vae, text, identity_encoder, mapping, au_cue)

    @classmethod
    def tiny(cls, seed: int = 0, resolution: int = 64, au_names: list[str] | None = None) -> "MAUGen":
        """The tiny configuration with random weights: fully offline, bitwise deterministic for ``seed``."""
        return cls.from_config(configs.tiny_config(au_names, resolution), seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> "MAUGen":
        """Load our folder format (see ``checkpoints.py``)."""
        from .checkpoints import load_folder

        return load_folder(path).to(device=device, dtype=dtype)

    def save_pretrained(self, path: str | Path) -> None:
        from .checkpoints import save_folder

        save_folder(self, path)

    # ----------------------------------------------------------------- properties
    @property
    def config(self) -> dict[str, Any]:
        return copy.deepcopy(self._config)

    @property
    def au_names(self) -> list[str]:
        return list(self._config["au_names"])

    @property
    def resolution(self) -> int:
        return int(self._config["resolution"])

    @property
    def token_dim(self) -> int:
        return configs.token_dim(self._config)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        return dict(self._config["scheduler"])

    @property
    def device(self) -> torch.device:
        return self.au_cue.device

    @property
    def dtype(self) -> torch.dtype:
        return self.au_cue.dtype

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> "MAUGen":
        """Move everything to ``device``; cast all but the identity networks to ``dtype``. Returns self."""
        for module in (self.dig, self.vae, self.text.text_encoder):
            # plain nn.Module.to: diffusers' override only adds a "keep in float32" notice for other loaders
            nn.Module.to(module, device=device, dtype=dtype)
        nn.Module.to(self.identity_encoder, device=device)
        nn.Module.to(self.mapping, device=device)
        self.au_cue.data = self.au_cue.data.to(device=device, dtype=dtype or self.dtype)
        return self

    def enable_speedups(self, channels_last: bool = True, compile: bool = False,
                        compile_backend: str = "inductor") -> "MAUGen":
        """GPU options: channels_last memory format for the conv nets; ``torch.compile`` of the diffusers UNet
        and the VAE decoder (in place, so state-dict keys are unchanged; the label-branch taps still fire).
        Numerics change within float tolerance (tests/model/test_maugen_precision.py); off by default.
        Compiling happens on the first call (minutes on a GPU at 512 px, ~1 min for the tiny model on a CPU)."""
        if channels_last:
            self.dig.unet.to(memory_format=torch.channels_last)
            self.vae.to(memory_format=torch.channels_last)
        if compile:
            self.dig.unet.compile(fullgraph=False, dynamic=False, backend=compile_backend)
            self.vae.decoder.compile(fullgraph=False, dynamic=False, backend=compile_backend)
        return self

    # ----------------------------------------------------------------- inference
    @torch.no_grad()
    def encode_identity(self, faces: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """RGB faces [B,3,H,W] in [0,1] (any size) -> identity pseudo-words [B,2,D] (id_first, id_last).

        ``masks`` [B,1,H,W] (1 = region to generate): required when the encoder reads the mask region
        (``identity_encoder.input: mask_region``), ignored otherwise."""
        x = identity_input(faces, masks, self._config["identity_encoder"])
        x = x.to(device=self.identity_encoder.cls_token.device, dtype=self.identity_encoder.cls_token.dtype)
        return self.mapping(self.identity_encoder(x)).to(dtype=self.dtype)

    @torch.no_grad()
    def init_au_cue_from_text(self, texts: list[str] | None = None) -> None:
        """Language init (reference §2): row i = pooled CLIP embedding of AU i's FACS name (e.g. "Inner Brow
        Raiser"; unknown AUs use their label). Training-time only; a loaded cue is overwritten."""
        texts = texts or [configs.FACS_NAMES.get(au, au) for au in self.au_names]
        if len(texts) != len(self.au_names):
            raise ValueError(f"need {len(self.au_names)} texts, got {len(texts)}")
        self.au_cue.data = self.text.pooled(list(texts))[None].to(self.au_cue.dtype)

    def sample(
        self,
        prompts: list[str],
        masked_images: torch.Tensor,
        masks: torch.Tensor,
        identity_embeds: torch.Tensor | None,
        generators: list[torch.Generator],
        num_inference_steps: int = 30,
        guidance_scale: float = 7.5,
        negative_prompt: str = "",
        scheduler: str = "ddim",
    ) -> MAUGenOutput:
        """Generate images and AU labels; see ``sampler.sample``."""
        return _sample(self, prompts, masked_images, masks, identity_embeds, generators,
                       num_inference_steps, guidance_scale, negative_prompt, scheduler)

    def parameter_counts(self) -> dict[str, int]:
        label = sum(p.numel() for n, p in self.dig.named_parameters() if not n.startswith("unet."))
        return {
            "unet": sum(p.numel() for p in self.dig.unet.parameters()),
            "label_branch": label,
            "vae": sum(p.numel() for p in self.vae.parameters()),
            "text_encoder": sum(p.numel() for p in self.text.text_encoder.parameters()),
            "identity_encoder": sum(p.numel() for p in self.identity_encoder.parameters()),
            "mapping": sum(p.numel() for p in self.mapping.parameters()),
            "au_cue": self.au_cue.numel(),
        }
