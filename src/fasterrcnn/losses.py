"""Faster R-CNN's losses (Equation 1 of the paper, as in the reference implementation).

Shape legend: M sampled items (anchors or RoIs) flattened over the batch, K object classes.

Both stages use cross-entropy over the sampled items and a smooth L1 loss on the positives'
deltas. Normalisers are those of the reference: the classification loss is the mean over the
sampled items; the localisation loss is summed over the positives and divided by the number of
sampled (non-ignored) items, which with 256 sampled anchors is the paper's
``lambda / N_reg ~ 1 / 256`` weighting of Equation 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def smooth_l1(pred: Tensor, target: Tensor, sigma: float) -> Tensor:
    """Elementwise smooth L1 with the reference's sigma: quadratic below ``1 / sigma**2``.

    ``0.5 * (sigma * x) ** 2`` if ``|x| < 1 / sigma**2`` else ``|x| - 0.5 / sigma**2``; the RPN
    uses sigma 3, the RoI head sigma 1 (the plain smooth L1 of Fast R-CNN).
    """
    return F.smooth_l1_loss(pred, target, beta=1.0 / sigma**2, reduction="none")


def focal_cross_entropy(logits: Tensor, labels: Tensor, gamma: float, alpha: float | None = None) -> Tensor:
    """Mean focal loss (Lin et al. 2017) over the items whose label is not -1.

    ``-alpha_t (1 - p_t) ** gamma log p_t`` with ``p_t`` the softmax probability of the true
    class; ``alpha`` weighs foreground (label >= 1) and ``1 - alpha`` background. gamma 0 and
    alpha None give plain cross-entropy.

    Args:
        logits: ``(M, C)``; labels: ``(M,)`` with -1 for ignored items.
    """
    valid = labels >= 0
    safe = labels.clamp(min=0)
    log_p = F.log_softmax(logits, dim=-1).gather(1, safe[:, None]).squeeze(1)  # (M,)
    loss = -((1.0 - log_p.exp()) ** gamma) * log_p if gamma else -log_p
    if alpha is not None:
        loss = loss * torch.where(safe >= 1, alpha, 1.0 - alpha)
    return torch.where(valid, loss, 0.0).sum() / valid.sum().clamp(min=1)


def classification_loss(logits: Tensor, labels: Tensor, gamma: float = 0.0, alpha: float | None = None) -> Tensor:
    """Cross-entropy (focal when ``gamma > 0`` or ``alpha`` is set) averaged over labels >= 0.

    Args:
        logits: ``(M, C)``; labels: ``(M,)`` with -1 for ignored items.
    """
    if gamma == 0.0 and alpha is None:
        valid = labels >= 0
        # Written out instead of ignore_index=-1 so an image with nothing sampled gives 0, not NaN.
        return F.cross_entropy(logits, labels.clamp(min=0), reduction="none").mul(valid).sum() / valid.sum().clamp(min=1)
    return focal_cross_entropy(logits, labels, gamma, alpha)


def localisation_loss(pred_deltas: Tensor, gt_deltas: Tensor, labels: Tensor, sigma: float) -> Tensor:
    """Smooth L1 summed over the positives (label >= 1), divided by the number of labels >= 0.

    Args:
        pred_deltas, gt_deltas: ``(M, 4)``; labels: ``(M,)``.
    """
    per_item = smooth_l1(pred_deltas, gt_deltas, sigma).sum(dim=1)  # (M,)
    return torch.where(labels >= 1, per_item, 0.0).sum() / (labels >= 0).sum().clamp(min=1)


def select_class_deltas(pred_deltas: Tensor, labels: Tensor) -> Tensor:
    """The 4 deltas of each RoI's ground-truth class: ``(M, K+1, 4), (M,) -> (M, 4)``.

    Only these enter the RoI localisation loss, so the other classes' outputs get no gradient.
    """
    index = labels.clamp(min=0)[:, None, None].expand(-1, 1, 4)
    return pred_deltas.gather(1, index).squeeze(1)
