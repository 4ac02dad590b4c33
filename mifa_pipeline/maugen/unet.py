"""DIG: the SD-1.5 inpainting UNet with the AU cue in every cross-attention, plus the label branch.

The image branch is diffusers' own ``UNet2DConditionModel.forward``, run unchanged on the 89-token
context (text + AU cue, reference §1.1). The label branch needs the time embedding and the outputs of
the cross-attention up blocks; forward hooks capture them, so no line of the diffusers forward is copied.
State-dict keys are ``unet.<diffusers key>`` plus the official label-branch keys (reference §1, JSON).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from . import configs
from .label_branch import AUTransformerLayer, AuxiliaryHead, DualPredictionHead, SinusoidalPE

# Options of UNet2DConditionModel that would change what `time_embedding`'s output means; the hook-based
# tap reads `emb` there, so refuse configs where the diffusers forward adds anything on top of it.
_UNSUPPORTED = ("class_embed_type", "addition_embed_type", "time_embedding_act_fn", "num_class_embeds")


class MAUGenUNet(nn.Module):
    """``CustomUNet`` of the official code, as a plain module with the same children and key names."""

    def __init__(self, cfg: dict[str, Any], unet: UNet2DConditionModel | None = None):
        """``unet``: an already loaded diffusers UNet (its config must be ``cfg["unet"]``); built from config if None."""
        super().__init__()
        ucfg = dict(cfg["unet"])
        for name in _UNSUPPORTED:
            if ucfg.get(name) is not None:
                raise ValueError(f"unet.{name} is not supported by the MAUGen label branch")
        self.unet = unet if unet is not None else UNet2DConditionModel(**ucfg)
        lb = cfg["label_branch"]
        dim = configs.token_dim(cfg)
        time_dim = self.unet.time_embedding.linear_2.out_features
        self.tap_levels = configs.tap_levels(cfg)
        channels = configs.tap_channels(cfg)
        tokens = configs.tap_tokens(cfg, cfg["resolution"], cfg["resolution"])
        self.position_embedding = nn.ModuleList([SinusoidalPE(n, dim) for n in tokens])
        self.auxiliary_head = nn.ModuleList([AuxiliaryHead(c, time_dim, dim, 2 * dim, lb) for c in channels])
        self.au_transformer = nn.ModuleList(
            [AUTransformerLayer(dim, lb["num_heads"], lb["ffn_dim"], lb["use_lgfe"]) for _ in channels]
        )
        self.dual_prediction_head = DualPredictionHead(len(cfg["au_names"]), dim, lb["head_hidden"])
        self._taps: dict[str, Any] | None = None
        self.unet.time_embedding.register_forward_hook(self._tap_hook("emb"))
        for level, index in enumerate(self.tap_levels):
            self.unet.up_blocks[index].register_forward_hook(self._tap_hook(level))

    @property
    def config(self):
        """Same object as ``unet.config`` (the official ``CustomUNet.config`` aliases it too)."""
        return self.unet.config

    def _tap_hook(self, key):
        def hook(module, args, output):
            if self._taps is not None:
                self._taps[key] = output
        return hook

    @contextmanager
    def _capture(self):
        self._taps = {}
        try:
            yield self._taps
        finally:
            self._taps = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        au_cue: torch.Tensor,
        identity: torch.Tensor,
        label_rows: slice | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Noise prediction for the whole batch; AU labels only for ``label_rows`` (default: all rows).

        text [B,77,D]; au_cue [B,A,D]; identity [B_id,2,D] for the label rows (B_id 1 broadcasts).
        Returns (noise_pred [B,...], logits_det [b,A], reg [b,A] in [0,1], au_tokens [b,A,D]).
        Restricting the label branch to the conditional half under CFG halves its cost; the label branch
        never feeds back into the image branch (reference §1.2), so the image is unaffected.
        """
        ctx = torch.cat([text, au_cue], dim=1)  # AU cue injection: 77 + A tokens everywhere (reference §1.1)
        with self._capture() as taps:
            noise = self.unet(sample, timestep, encoder_hidden_states=ctx, return_dict=False)[0]
        rows = label_rows if label_rows is not None else slice(None)
        emb, ctx_l, tokens = taps["emb"][rows], ctx[rows], au_cue[rows]
        ident = identity.flatten(1)  # concat(id_first, id_last) -> [B_id, 2D] (reference §3)
        for level in range(len(self.tap_levels)):
            s = self.auxiliary_head[level](taps[level][rows], emb, ident)
            s_pos = s + self.position_embedding[level](s.shape[1])
            tokens = self.au_transformer[level](s, s_pos, tokens, ctx_l)
        det, reg = self.dual_prediction_head(tokens)
        return noise, det, reg, tokens
