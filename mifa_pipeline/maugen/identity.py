"""MRL identity side: MSID ViT identity encoder, the IMG2TEXTwithEXP mapping, face preprocessing.

The ViT is a small re-implementation with timm's ``VisionTransformer`` parameter names (timm is not a
dependency), so the official ``msid.pt`` / ``mapping.pt`` state dicts load strictly (reference §3, §5).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class PatchEmbed(nn.Module):
    def __init__(self, patch: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(3, dim, patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class IdentityEncoder(nn.Module):
    """MSID: CLS token after selected blocks -> BatchNorm1d (eval) -> LayerNorm, concatenated [B, 4*dim].

    timm's final ``norm`` exists only so the official state dict loads; the feature path never uses it.
    """

    def __init__(self, cfg: dict[str, Any]):
        super().__init__()
        dim, size, patch = cfg["embed_dim"], cfg["image_size"], cfg["patch_size"]
        self.image_size = size
        self.pre_resize = cfg.get("pre_resize")
        self.feature_blocks = list(cfg["feature_blocks"])
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, (size // patch) ** 2 + 1, dim) * 0.02)
        self.patch_embed = PatchEmbed(patch, dim)
        self.blocks = nn.ModuleList([Block(dim, cfg["num_heads"], cfg["mlp_ratio"]) for _ in range(cfg["depth"])])
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.norms = nn.ModuleDict({
            f"layer_{i}": nn.Sequential(nn.BatchNorm1d(dim), nn.LayerNorm(dim, eps=1e-5)) for i in self.feature_blocks
        })

    @property
    def out_dim(self) -> int:
        return self.cls_token.shape[-1] * len(self.feature_blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: preprocessed faces [B, 3, S, S] in [-1, 1]."""
        x = self.patch_embed(x)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        feats = []
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.feature_blocks:
                feats.append(self.norms[f"layer_{i}"](x[:, 0]))
            if i == self.feature_blocks[-1]:
                break
        return torch.cat(feats, dim=1)


class I2TMlp(nn.Module):
    """One branch of IMG2TEXTwithEXP: (Linear, Dropout, LeakyReLU 0.2) x n_layer, then fc_out."""

    def __init__(self, in_dim: int, middle: int, out_dim: int, n_layer: int, dropout: float = 0.1):
        super().__init__()
        dims = [in_dim] + [middle] * n_layer
        self.layers = nn.ModuleList([
            nn.Sequential(nn.Linear(dims[i], dims[i + 1]), nn.Dropout(dropout), nn.LeakyReLU(0.2)) for i in range(n_layer)
        ])
        self.fc_out = nn.Linear(middle, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.fc_out(x)


class IdentityMapping(nn.Module):
    """IMG2TEXTwithEXP: identity vector + the learned null expression -> (id_first, id_last) pseudo-words.

    At inference there is never an expression input, so ``null_exp`` is always used (reference §3).
    """

    def __init__(self, in_dim: int, out_dim: int, cfg: dict[str, Any]):
        super().__init__()
        self.null_exp = nn.Parameter(torch.zeros(cfg["exp_dim"]))
        args = (in_dim + cfg["exp_dim"], cfg["middle_dim"], out_dim, cfg["n_layer"])
        self.i2t_first = I2TMlp(*args)
        self.i2t_last = I2TMlp(*args)

    def forward(self, idvec: torch.Tensor) -> torch.Tensor:
        x = torch.cat([idvec, self.null_exp.to(idvec.dtype).expand(idvec.shape[0], -1)], dim=1)
        return torch.stack([self.i2t_first(x), self.i2t_last(x)], dim=1)  # [B, 2, D]


def mask_region(faces: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Each face cut down to the region the model redraws: its mask's bounding square, grey outside the mask.

    Why: the inpainting canvas already shows everything outside the mask (hair, clothes, background), so
    the identity words only have to say what is inside it. An encoder shown the whole frame tells
    identities apart by background and clothing colours and learns nothing of the face: the first demo
    model's ``<ID>`` words separated held-out identities perfectly, yet predicted none of the teacher's eye,
    brow, nose or mouth geometry (linear probe R^2 <= 0.07). faces [B,3,H,W] in [0,1]; masks [B,1,H,W] in
    [0,1], 1 = region to generate. Returns [B,3,S,S] with S the largest bounding square of the batch.
    """
    if masks.ndim != 4 or masks.shape[1] != 1 or masks.shape[0] != faces.shape[0] or masks.shape[-2:] != faces.shape[-2:]:
        raise ValueError(f"masks must be [B,1,H,W] matching faces {tuple(faces.shape)}, got {tuple(masks.shape)}")
    inside = (masks > 0.5).to(faces.dtype)
    grey = faces * inside + 0.5 * (1 - inside)
    crops = []
    for image, m in zip(grey, inside):
        ys, xs = torch.nonzero(m[0], as_tuple=True)
        if len(ys) == 0:
            raise ValueError("an identity mask is empty: nothing to describe")
        top, bottom, left, right = int(ys.min()), int(ys.max()) + 1, int(xs.min()), int(xs.max()) + 1
        side = max(bottom - top, right - left)
        top, left = (top + bottom - side) // 2, (left + right - side) // 2  # centred; may leave the image
        padded = F.pad(image, (side, side, side, side), value=0.5)
        crops.append(padded[:, top + side:top + 2 * side, left + side:left + 2 * side])
    size = max(c.shape[-1] for c in crops)
    return torch.stack([c if c.shape[-1] == size else
                        F.interpolate(c[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]
                        for c in crops])


def identity_input(faces: torch.Tensor, masks: torch.Tensor | None, cfg: dict[str, Any]) -> torch.Tensor:
    """What the identity encoder reads under its config: ``input`` "frame" (official) or "mask_region"."""
    mode = cfg.get("input", "frame")
    if mode == "mask_region":
        if masks is None:
            raise ValueError("this model's identity encoder reads the mask region (identity_encoder.input = "
                             "'mask_region'): pass the inpainting masks with the faces")
        faces = mask_region(faces.float(), masks.float().to(faces.device))
    return preprocess_faces(faces, cfg["image_size"], cfg.get("pre_resize"))


def preprocess_faces(faces: torch.Tensor, size: int, pre_resize: int | None) -> torch.Tensor:
    """RGB faces [B,3,H,W] in [0,1] (any size) -> [B,3,size,size] in [-1,1] for the identity encoder.

    Official path (reference §3): short side -> 512 (PIL bilinear), normalise, then bilinear to 112 without
    antialias, which squashes non-square faces. Here faces are first center-cropped to a square (no aspect
    distortion), then resized to ``pre_resize`` with antialias (as PIL does), then to ``size`` exactly as
    the official code does; for square inputs this is the official computation.
    """
    if faces.ndim != 4 or faces.shape[1] != 3:
        raise ValueError(f"faces must be [B,3,H,W] RGB, got shape {tuple(faces.shape)}")
    x = faces.float()
    h, w = x.shape[-2:]
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    x = x[:, :, top:top + side, left:left + side]
    if pre_resize and side != pre_resize:
        x = F.interpolate(x, size=(pre_resize, pre_resize), mode="bilinear", align_corners=False, antialias=True)
    x = (x - 0.5) / 0.5
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)
