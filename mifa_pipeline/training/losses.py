"""Training losses: the focal losses of the official code (reference §6), the MRL alignment term, and the
expression weights that weigh up the pixels an AU moved.

``weight`` (optional, broadcast to the loss elements, e.g. [B,1] per row) turns the mean into a weighted
mean, so rows without labels can be left out of a batch's label losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def weighted_mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    """Mean of ``values`` weighted by ``weight`` (broadcast to them; None: the plain mean)."""
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype).expand_as(values)
    return (values * w).sum() / w.sum().clamp(min=1.0)


def focal_mse(pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """FocalMSELoss: with e = (p - y)^2, mean[(1 - exp(-e))^gamma * e]. gamma = 0 is the plain MSE."""
    e = (pred.float() - target.float()) ** 2
    return weighted_mean(e if gamma == 0 else (1.0 - torch.exp(-e)) ** gamma * e, weight)


def multilabel_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """MultiLabelFocalLoss: b = BCE-with-logits per element, p_t = exp(-b), mean[alpha (1 - p_t)^gamma b]."""
    b = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return weighted_mean(alpha * (b if gamma == 0 else (1.0 - torch.exp(-b)) ** gamma * b), weight)


def info_nce(a: torch.Tensor, b: torch.Tensor, positives: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric multi-positive InfoNCE between rows of ``a`` and ``b`` (both [N, d], L2-normalised here).

    ``positives`` [N, N] bool: which pairs count as matches (the diagonal always does), so duplicates in
    a batch (the same identity, the same AU combination) are not pushed apart.
    """
    a, b = F.normalize(a.float(), dim=-1), F.normalize(b.float(), dim=-1)
    logits = a @ b.t() / temperature
    pos = positives.float().clone()
    pos.fill_diagonal_(1.0)
    loss_ab = -((pos / pos.sum(1, keepdim=True)) * F.log_softmax(logits, dim=1)).sum(1).mean()
    loss_ba = -((pos.t() / pos.t().sum(1, keepdim=True)) * F.log_softmax(logits.t(), dim=1)).sum(1).mean()
    return 0.5 * (loss_ab + loss_ba)


def expression_weights(images: torch.Tensor, references: torch.Tensor, strength: float, size: int | None = None,
                       saturate: float = 0.3, reach: int = 5) -> torch.Tensor:
    """Per-pixel loss weights ``1 + strength * moved`` where the face differs from its neutral reference.

    An AU moves a few pixels (a lip corner, the lower lids, the chin); an unweighted reconstruction or
    diffusion loss is dominated by hair, skin and background, and a small model learns to leave those few
    pixels out (measured on the phase-6 demo VAE: after its round trip, the teacher's own AU5, AU9, AU17,
    AU20 and AU25 sweeps read Spearman <= 0.04, AU6 0.30). ``moved`` is |image - reference| summed over
    RGB ([-1, 1] images), widened by a ``reach`` x ``reach`` max filter and saturating at 1 from
    ``saturate``; ``size`` pools the map (max) to a latent grid. Returns [B, 1, H, W] (or [B, 1, size, size]); ``strength`` 0 gives all ones.
    """
    moved = (images.float() - references.float()).abs().sum(1, keepdim=True)
    moved = F.max_pool2d(moved, reach, 1, reach // 2)
    if size is not None and size != moved.shape[-1]:
        moved = F.adaptive_max_pool2d(moved, size)
    return 1.0 + strength * (moved / saturate).clamp(max=1.0)
