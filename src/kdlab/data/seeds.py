"""Seed mixing for data draws: one place for the integers that drive shuffling and augmentation.

Every seed here is a pure function of its arguments (no global RNG), so data order and augmentation
are the same after a resume and for any number of workers or ranks.
"""

from __future__ import annotations

import numpy as np


def draw_seed(base_seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for one draw, mixed from (base seed, epoch, position) by numpy's SeedSequence.

    Used by the epoch sampler (order and per-sample augmentation) and by the trainer (per-step RNG).
    `base_seed` is taken modulo 2**32.
    """
    state = np.random.SeedSequence([base_seed & 0xFFFFFFFF, epoch, position]).generate_state(2, np.uint64)
    return int(state[0] >> 1)


def mixed_index_seed(index: int) -> int:
    """The augmentation seed of a segmentation item fetched by bare index: `draw_seed(0, 0, index)`."""
    return draw_seed(0, 0, index)


def knuth_index_seed(index: int) -> int:
    """The augmentation seed of a classification item fetched by bare index: Knuth's multiplicative hash
    of the index, modulo 2**31 (a different function from `mixed_index_seed`, kept for its exact values)."""
    return int(index) * 2654435761 % (2**31)
