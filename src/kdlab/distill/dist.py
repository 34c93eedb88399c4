"""DIST (Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher") on ROI mask logits.

DIST matches relations instead of values: the Pearson correlation between the student's and the teacher's
probabilities, which ignores a shift and a scale of either side. For mask logits `[N, C, *spatial]` the pixels
of each ROI are the samples. With p = softmax(z / T) over the classes (dim 1), in float32:

    inter = 1 / (N · P) · sum_{n, pixel} Pearson_c(p_s[n, :, pixel], p_t[n, :, pixel])    (across the C classes)
    intra = 1 / (N · C) · sum_{n, c}     Pearson_pixel(p_s[n, c, :], p_t[n, c, :])       (across the P pixels)
    loss  = beta · (1 − inter) + gamma · (1 − intra)

where P = H·W. Each correlation is in [−1, 1], so the loss is in [0, 2·(beta + gamma)] whatever the mask
resolution, the number of ROIs or the temperature. The published code also multiplies each term by T²; we do
not (the loss does not grow with T; `distillation.dist_weight` sets its scale).

Pearson(a, b) = sum(a' b') / sqrt(sum(a'²) · sum(b'²) + eps²) with a' = a − mean(a): the eps inside the square
root keeps the value and its gradient finite when one side is constant over the axis (a ROI whose probability
of a class is flat), where the correlation is taken as 0. So the loss is 0 when the student equals the teacher
only where neither is constant along an axis. N = 0 ROIs returns a graph-connected 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dist_loss", "pearson"]

EPS = 1e-8


def pearson(a: Tensor, b: Tensor, dim: int, eps: float = EPS) -> Tensor:
    """Pearson correlation of `a` and `b` along `dim` (the dim is reduced), in float32; 0 where either is
    constant along it (see the module docstring for the eps)."""
    a = a.float()
    b = b.float()
    a = a - a.mean(dim=dim, keepdim=True)
    b = b - b.mean(dim=dim, keepdim=True)
    dot = (a * b).sum(dim=dim)
    return dot / torch.sqrt((a * a).sum(dim=dim) * (b * b).sum(dim=dim) + eps * eps)


def dist_loss(
    student_logits: Tensor, teacher_logits: Tensor, temperature: float, beta: float = 1.0, gamma: float = 1.0
) -> Tensor:
    """`beta · (1 − inter-class correlation) + gamma · (1 − intra-class correlation)`; see the module docstring.

    Both inputs are logits `[N, C, *spatial]` with C >= 2 and at least 2 pixels; the teacher side should be
    detached. Returns a 0-dim float32 tensor.
    """
    if not temperature > 0:  # also rejects NaN
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if student_logits.ndim < 3 or student_logits.shape[1] < 2:
        raise ValueError(
            f"dist_loss: expected mask logits [N, C>=2, H, W], got shape {tuple(student_logits.shape)}"
        )
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"dist_loss: student and teacher shapes differ: {tuple(student_logits.shape)} vs "
            f"{tuple(teacher_logits.shape)}"
        )
    n, c = student_logits.shape[:2]
    p_s = F.softmax(student_logits.float().flatten(2) / temperature, dim=1)  # [N, C, P]
    p_t = F.softmax(teacher_logits.float().flatten(2) / temperature, dim=1)
    pixels = p_s.shape[2]
    if pixels < 2:
        raise ValueError("dist_loss: the intra-class term needs at least 2 pixels per ROI")
    inter = pearson(p_s, p_t, dim=1).sum() / max(n * pixels, 1)
    intra = pearson(p_s, p_t, dim=2).sum() / max(n * c, 1)
    if n == 0:  # empty means: the loss is 0 (not beta + gamma), still connected to the student's graph
        return (inter + intra) * 0.0
    return beta * (1.0 - inter) + gamma * (1.0 - intra)
