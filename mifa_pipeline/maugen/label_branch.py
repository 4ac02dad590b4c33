"""The DIG label branch: features tapped from the UNet up blocks -> 12 AU tokens -> occurrence/intensity.

Parameter names and shapes follow the official checkpoint (shared/reference/maugen-interface.md §1.3-§1.7)
so that its state dict loads strictly. Two numerical quirks the trained weights depend on are reproduced
on purpose (IDM 1/sqrt(L) scale, IDM raw reshape); the official batch-1 identity defect is not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_pe(n: int, dim: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """pe[n, 2k] = sin(n / 10000^(2k/dim)), pe[n, 2k+1] = cos(same) (reference §1.7), shape [1, n, dim]."""
    pos = torch.arange(n, dtype=torch.float64, device=device)[:, None]
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64, device=device) * (-math.log(10000.0) / dim))
    pe = torch.zeros(n, dim, dtype=torch.float64, device=device)
    pe[:, 0::2] = torch.sin(pos * div)
    pe[:, 1::2] = torch.cos(pos * div)
    return pe[None].to(dtype)


class SinusoidalPE(nn.Module):
    """Fixed 1-D PE over the flattened patch grid; the buffer ``pe`` is part of the official state dict.

    The stored length matches the configured resolution; other feature sizes get the same formula computed
    on the fly (the official code only worked for 64x64 latents, reference §7 item 5).
    """

    def __init__(self, n: int, dim: int):
        super().__init__()
        self.register_buffer("pe", sinusoidal_pe(n, dim), persistent=True)

    def forward(self, n: int) -> torch.Tensor:
        if n == self.pe.shape[1]:
            return self.pe
        return sinusoidal_pe(n, self.pe.shape[2], device=self.pe.device, dtype=self.pe.dtype)


class IDM(nn.Module):
    """Identity Decoupling Module (reference §1.4): removes the identity direction from UNet features.

    ``identity`` is [B_id, 2*D] with B_id == 1 (broadcast) or B_id == batch; the official code only worked
    with B_id == 1 (reference §7 item 1).
    """

    def __init__(self, channels: int, identity_dim: int, hidden: int):
        super().__init__()
        self.mlp = nn.Linear(identity_dim, hidden)
        self.linear_projection = nn.Linear(identity_dim, channels)
        self.W_Q = nn.Linear(channels, hidden)
        self.W_K = nn.Linear(channels, hidden)
        self.W_V = nn.Linear(channels, hidden)
        self.W_O = nn.Linear(hidden, channels)

    def forward(self, z: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        b, c, h, w = z.shape
        length = h * w
        x = F.layer_norm(z.flatten(2).transpose(1, 2), (c,), eps=1e-5)       # [B, L, C]
        q, k, v = self.W_Q(x), self.W_K(x), self.W_V(x)                         # [B, L, d]
        u = self.mlp(identity)[:, None, :]                                      # [B_id, 1, d]
        gate = torch.sigmoid((k * u).sum(-1, keepdim=True))                     # [B, L, 1], per key
        # Gated logits (q.k_j / sqrt(L)) * g_j == q.(g_j k_j) / sqrt(L): SDPA with gated keys.
        # Quirk kept on purpose: the scale is 1/sqrt(L), not 1/sqrt(d) (reference §1.4 step 4).
        att = F.scaled_dot_product_attention(q[:, None], (k * gate)[:, None], v[:, None], scale=1.0 / math.sqrt(length))
        a = self.W_O(att[:, 0])                                                 # [B, L, C]
        p = self.linear_projection(identity)[:, None, :]                        # [B_id, 1, C]
        s = torch.sigmoid((a * p).sum(-1, keepdim=True))                        # [B, L, 1]
        f = F.layer_norm(a - s * p, (length, c), eps=1e-5)                      # whole (L, C) slab per sample
        # Quirk kept on purpose: raw reshape [B, L, C] -> [B, C, H, W], no transpose (reference §1.4 step 8).
        return f.reshape(b, c, h, w)


class AuxiliaryHead(nn.Module):
    """Feature extractor of one level (reference §1.3): time injection, IDM, conv stem, 4x4 patch tokens."""

    def __init__(self, channels: int, time_dim: int, token_dim: int, identity_dim: int, cfg: dict):
        super().__init__()
        stem, groups, out, p = cfg["stem_channels"], cfg["stem_groups"], cfg["patch_channels"], cfg["patch_size"]
        self.patch_size = p
        self.time_emb_proj = nn.Linear(time_dim, channels)
        self.depthwise_conv1 = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.pointwise_conv1 = nn.Conv2d(channels, stem, 1)
        self.depthwise_conv2 = nn.Conv2d(stem, stem, 3, padding=1, groups=groups)
        self.pointwise_conv2 = nn.Conv2d(stem, out, 1)
        self.patch_embedding = nn.Linear(out * p * p, token_dim)
        self.idm = IDM(channels, identity_dim, cfg["idm_dim"]) if cfg["use_idm"] else None

    def forward(self, h: torch.Tensor, emb: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        if self.idm is not None:
            h = self.idm(h, identity)  # replaces h, no skip (reference §1.3 step 2)
        h = self.pointwise_conv1(self.depthwise_conv1(h))
        h = F.gelu(F.instance_norm(h, eps=1e-5))
        h = self.pointwise_conv2(self.depthwise_conv2(h))
        h = F.gelu(F.instance_norm(h, eps=1e-5))
        return self.patch_embedding(patchify(h, self.patch_size))


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Non-overlapping p x p patches, row-major: ``b c (h p1) (w p2) -> b (h w) (c p1 p2)`` (reference §1.3)."""
    b, c, hh, ww = x.shape
    x = x.reshape(b, c, hh // p, p, ww // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (hh // p) * (ww // p), c * p * p)


def _mha(dim: int, heads: int) -> nn.ModuleList:
    return nn.ModuleList([nn.MultiheadAttention(dim, heads, batch_first=True)])


def _ffn(dim: int, hidden: int) -> nn.ModuleList:
    return nn.ModuleList([nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, dim))])


def _ln(dim: int) -> nn.ModuleList:
    return nn.ModuleList([nn.LayerNorm(dim, eps=1e-5)])


def _attend(mha: nn.MultiheadAttention, q: torch.Tensor, kv: torch.Tensor, v: torch.Tensor | None = None) -> torch.Tensor:
    return mha(q, kv, kv if v is None else v, need_weights=False)[0]


class AUTransformerLayer(nn.Module):
    """One encoder/decoder layer; the AU tokens are the decoder queries (reference §1.5).

    Sub-modules sit at index 0 of one-element ModuleLists to match the official key names.
    """

    def __init__(self, dim: int, heads: int, ffn: int, use_lgfe: bool):
        super().__init__()
        # Registration order = the official state-dict order.
        self.use_lgfe = use_lgfe
        self.norm_layers_dec_1, self.norm_layers_dec_2 = _ln(dim), _ln(dim)
        if use_lgfe:
            self.norm_layers_dec_3 = _ln(dim)
        self.norm_layers_enc_1, self.norm_layers_enc_2 = _ln(dim), _ln(dim)
        self.feedforward_layers_dec, self.feedforward_layers_enc = _ffn(dim, ffn), _ffn(dim, ffn)
        self.attention_layers_enc = _mha(dim, heads)
        self.attention_layers_1 = _mha(dim, heads)   # decoder self-attention
        self.attention_layers_2 = _mha(dim, heads)   # decoder cross-attention to the patch tokens
        if use_lgfe:
            self.attention_layers_text = _mha(dim, heads)

    def forward(self, s: torch.Tensor, s_pos: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        # Encoder: the query carries no PE, keys and values do.
        s = self.norm_layers_enc_1[0](_attend(self.attention_layers_enc[0], s, s_pos) + s)
        s = self.norm_layers_enc_2[0](self.feedforward_layers_enc[0](s) + s)
        # Decoder.
        t = self.norm_layers_dec_1[0](_attend(self.attention_layers_1[0], t, t) + t)
        t = self.norm_layers_dec_2[0](_attend(self.attention_layers_2[0], t, s) + t)
        f = self.feedforward_layers_dec[0](t)
        if not self.use_lgfe:
            return f  # no residual, no norm (reference §1.5)
        t = self.norm_layers_dec_3[0](f + t)
        return _attend(self.attention_layers_text[0], t, ctx)  # LGFE output as it stands


class DualPredictionHead(nn.Module):
    """Per-AU MLPs shared by all levels (reference §1.6): occurrence logit and intensity/5 in [0, 1]."""

    def __init__(self, num_labels: int, dim: int, hidden: int):
        super().__init__()

        def mlp() -> nn.Sequential:
            return nn.Sequential(nn.Linear(dim, hidden), nn.LeakyReLU(0.01), nn.Linear(hidden, 1))

        self.token_fc_layers_det = nn.ModuleList([mlp() for _ in range(num_labels)])
        self.token_fc_layers_reg = nn.ModuleList([mlp() for _ in range(num_labels)])

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        det = torch.cat([m(tokens[:, i]) for i, m in enumerate(self.token_fc_layers_det)], dim=1)
        reg = torch.cat([m(tokens[:, i]) for i, m in enumerate(self.token_fc_layers_reg)], dim=1)
        return det, sigmoid_rows(reg)


def sigmoid_rows(x: torch.Tensor) -> torch.Tensor:
    """Sigmoid whose bits for a row do not depend on the row's position in the batch.

    CPU elementwise kernels run SIMD code on blocks of 2 vectors and scalar code on the tail of the
    tensor, and the two sigmoid implementations differ in the last bit; on a small [B, A] tensor the tail
    belongs to the last rows. One op per row gives every row the same code path (GPU kernels compute every
    element the same way already).
    """
    if x.device.type != "cpu":
        return torch.sigmoid(x)
    return torch.stack([torch.sigmoid(row) for row in x])
