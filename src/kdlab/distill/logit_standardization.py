"""Logit standardisation for the KD KL terms (Sun et al., CVPR 2024, "Logit Standardization in Knowledge
Distillation").

Before the temperature softmax of a KL term, student and teacher logits are each standardised per sample over
the **class** dimension:

    z~[n, :, pixel] = (z[n, :, pixel] − mean_c z[n, :, pixel]) / sqrt(var_c z[n, :, pixel] + eps²)

with the population variance (1/C, the paper's definition), in float32. The eps inside the square root keeps
the gradient finite where all classes tie (var = 0, where sqrt has an infinite slope). The student then only has to
match the shape of the teacher's logits, not their scale, which a smaller model may not reach. For mask logits
`[N, C, H, W]` the class dimension is dim 1: standardising over the last dimension (the width, as a classifier
recipe that uses `dim=-1` would) mixes pixels and gives another value.

With C = 2 classes a standardised logit pair is always (−1, +1) (or (0, 0) for a tie): only the teacher's
decision survives, not its confidence, and the gradient grows as 1 / |z1 − z0| near a tie. So the KD tasks
apply the switch to heads of 3 or more classes only: the people model's 3-class logits, not its 2-class
bg/fg and target heads (`KDTaskBase.kl_logits`, docs/distillation-methods.md).
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["standardize_logits"]

import torch

EPS = 1e-6


def standardize_logits(logits: Tensor, dim: int = 1, eps: float = EPS) -> Tensor:
    """`(z − mean) / sqrt(var + eps²)` over `dim` (the class dim, 1 for `[N, C, ...]`), population variance,
    in float32."""
    if logits.ndim < 2:
        raise ValueError(f"standardize_logits: expected [N, C, ...] logits, got shape {tuple(logits.shape)}")
    z = logits.float()
    centred = z - z.mean(dim=dim, keepdim=True)
    var = (centred * centred).mean(dim=dim, keepdim=True)
    return centred / torch.sqrt(var + eps * eps)
