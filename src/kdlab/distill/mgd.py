"""MGD, masked generative distillation (Yang et al., ECCV 2022), on one student/teacher feature pair.

The student feature, already mapped to the teacher's channels and size by the pair's 1×1 adapter, is masked
at random: each spatial position of each sample is dropped (all channels set to 0) with probability
`mask_ratio` (λ, 0.65 by default). A generator conv3×3 → ReLU → conv3×3 (teacher channels in and out) then
has to regenerate the teacher's whole feature from what is left:

    loss = 1 / (N · C · H · W) · sum (G(M ⊙ A(s)) − t)²        M[n, 1, h, w] ~ Bernoulli(1 − λ)

a mean over every element, as our feature MSE (the published code sums and then scales by a small weight,
2e-5, instead). The generator trains with the student, lives beside the adapters (saved in last.pth, not in
best_model.pth) and is only used for this loss. The masks come from a generator seeded by (training seed,
global step, rank, pair), never from the global RNG, so a resumed run draws the same masks as an
uninterrupted one and the draw does not shift any other random stream.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["MGDGenerator", "mask_rng", "random_keep_mask"]

DEFAULT_MASK_RATIO = 0.65
_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constants that spread nearby (seed, step) pairs apart
_MIX2 = 0xBF58476D1CE4E5B9


class MGDGenerator(nn.Module):
    """conv3×3 → ReLU → conv3×3 on the teacher's channels (the paper's generation block)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.channels = channels
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.block(x)


def mask_rng(seed: int, step: int, stream: int, device: torch.device) -> torch.Generator:
    """A generator on `device` seeded from (seed, step, stream) only: the same triple, the same masks."""
    mixed = (seed * _MIX + step * _MIX2 + stream * 0x94D049BB133111EB) % (2**63 - 1)
    rng = torch.Generator(device=device)
    rng.manual_seed(mixed)
    return rng


def random_keep_mask(feature: Tensor, mask_ratio: float, rng: torch.Generator) -> Tensor:
    """`[N, 1, H, W]` of 1 (kept) and 0 (masked, probability `mask_ratio`), in the feature's dtype and device."""
    if not 0.0 <= mask_ratio < 1.0:
        raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
    n, _, h, w = feature.shape
    draw = torch.rand((n, 1, h, w), generator=rng, device=feature.device)
    return (draw >= mask_ratio).to(feature.dtype)
