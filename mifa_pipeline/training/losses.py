"""Training losses: the focal losses of the official code (reference §6) and the MRL alignment term.

``weight`` (optional, broadcast to the loss elements, e.g. [B,1] per row) turns the mean into a weighted
mean, so rows without labels can be left out of a batch's label losses.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _mean(values: torch.Tensor, weight: torch.Tensor | None) -> torch.Tensor:
    if weight is None:
        return values.mean()
    w = weight.to(values.dtype).expand_as(values)
    return (values * w).sum() / w.sum().clamp(min=1.0)


def focal_mse(pred: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, weight: torch.Tensor | None = None) -> torch.Tensor:
    """FocalMSELoss: with e = (p - y)^2, mean[(1 - exp(-e))^gamma * e]. gamma = 0 is the plain MSE."""
    e = (pred.float() - target.float()) ** 2
    return _mean(e if gamma == 0 else (1.0 - torch.exp(-e)) ** gamma * e, weight)


def multilabel_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """MultiLabelFocalLoss: b = BCE-with-logits per element, p_t = exp(-b), mean[alpha (1 - p_t)^gamma b]."""
    b = F.binary_cross_entropy_with_logits(logits.float(), target.float(), reduction="none")
    return _mean(alpha * (b if gamma == 0 else (1.0 - torch.exp(-b)) ** gamma * b), weight)


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
