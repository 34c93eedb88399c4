"""The seed-mixing functions keep the exact values of the code they replaced (data order and
augmentation of every existing run depend on them)."""

from __future__ import annotations

import pytest

from kdlab.data.seeds import draw_seed, knuth_index_seed, mixed_index_seed

# Computed with the previous `kdlab.data.coco.sample_seed` before it moved here.
DRAW_SEEDS = [
    ((0, 0, 0), 7896617691693857887),
    ((0, 0, 1), 4324601099084218337),
    ((42, 3, 17), 7404989181548116855),
    ((-1, 2, 5), 6738944834940634046),
    ((2**40 + 7, 1, 0), 3317731564112288844),
    ((7, 5, 0xFFFFFFFF), 5780320844036629707),
    ((123, 0, 0x7FFF), 850624929223543775),
]


@pytest.mark.parametrize(("args", "expected"), DRAW_SEEDS)
def test_draw_seed_keeps_its_values(args: tuple[int, int, int], expected: int) -> None:
    assert draw_seed(*args) == expected
    assert 0 <= expected < 2**63


def test_mixed_index_seed_keeps_the_values_of_the_coco_index_seed() -> None:
    # Previous kdlab.data.coco.index_seed(0, 1, 2, 999).
    assert [mixed_index_seed(i) for i in (0, 1, 2, 999)] == [
        7896617691693857887,
        4324601099084218337,
        5228546342681945855,
        7843450171328156851,
    ]


def test_knuth_index_seed_keeps_the_values_of_the_classification_index_seed() -> None:
    # Previous kdlab.data.classification.index_seed(0, 1, 2, 999, 10**6).
    assert [knuth_index_seed(i) for i in (0, 1, 2, 999, 10**6)] == [
        0,
        506952113,
        1013904226,
        1786503607,
        2090667584,
    ]


def test_the_two_index_seeds_are_different_functions() -> None:
    assert mixed_index_seed(1) != knuth_index_seed(1)
