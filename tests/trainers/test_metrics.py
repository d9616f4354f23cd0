"""Dice per class and pooled vs per-volume aggregation, against hand-computed tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.trainers.dice_reference import random_case, reference_scores
from trainers.metrics import dice_per_class, dice_scores, evaluate_volumes, volume_confusion

NAN = float("nan")

# (pred, target, num_classes, expected Dice of classes 1..C-1), worked by hand
DICE_CASES = [
    # perfect
    ([[1, 2], [0, 0]], [[1, 2], [0, 0]], 3, [1.0, 1.0]),
    # class 1: P={0,1}, G={0}: 2*1/(2+1); class 2: P={}, G={3}: 0
    ([[1, 1], [0, 0]], [[1, 0], [0, 2]], 3, [2 / 3, 0.0]),
    # class 2 absent from both -> NaN
    ([[1, 0], [0, 0]], [[1, 1], [0, 0]], 3, [2 / 3, NAN]),
    # disjoint
    ([[0, 1], [0, 0]], [[1, 0], [0, 0]], 2, [0.0]),
    # 4 classes, class 3 predicted where truth has none: 0
    ([[1, 2, 3, 0]], [[1, 2, 0, 0]], 4, [1.0, 1.0, 0.0]),
    # all background
    ([[0, 0]], [[0, 0]], 3, [NAN, NAN]),
]


@pytest.mark.parametrize(("pred", "target", "num_classes", "expected"), DICE_CASES)
def test_dice_per_class_table(
    pred: list[list[int]], target: list[list[int]], num_classes: int, expected: list[float]
) -> None:
    got = dice_per_class(torch.tensor(pred), torch.tensor(target), num_classes)
    assert got.shape == (num_classes - 1,)
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), equal_nan=True)


def test_dice_accepts_numpy_and_small_int_dtypes() -> None:
    pred = np.array([[1, 1], [0, 2]], dtype=np.uint8)
    target = np.array([[1, 0], [0, 2]], dtype=np.int32)
    torch.testing.assert_close(
        dice_per_class(pred, target, 3), torch.tensor([2 / 3, 1.0], dtype=torch.float64)
    )


def test_dice_matches_a_naive_loop_on_random_maps() -> None:
    gen = torch.Generator().manual_seed(0)
    pred = torch.randint(0, 4, (3, 9, 7), generator=gen)
    target = torch.randint(0, 4, (3, 9, 7), generator=gen)
    got = dice_per_class(pred, target, 4)
    for k in range(1, 4):
        p, t = pred == k, target == k
        assert math.isclose(
            float(got[k - 1]), 2 * (p & t).sum().item() / (p.sum() + t.sum()).item()
        )


@pytest.mark.parametrize(
    ("pred", "target", "num_classes", "match"),
    [
        (
            torch.zeros(2, 3, dtype=torch.long),
            torch.zeros(3, 2, dtype=torch.long),
            3,
            r"\(2, 3\) and \(3, 2\)",
        ),
        (torch.zeros(2, 2), torch.zeros(2, 2, dtype=torch.long), 3, "integer"),
        (torch.full((2, 2), 3), torch.zeros(2, 2, dtype=torch.long), 3, "outside"),
        (torch.zeros(2, 2, dtype=torch.long), torch.full((2, 2), -1), 3, "outside"),
        (
            torch.zeros(2, 2, dtype=torch.long),
            torch.zeros(2, 2, dtype=torch.long),
            1,
            "num_classes",
        ),
    ],
)
def test_dice_bad_inputs(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        dice_per_class(pred, target, num_classes)


def crafted() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two volumes, 1x4 slices, classes {0, 1, 2}; slices interleaved to test regrouping.

    Volume 7 (slices 0, 2): large and perfect on class 1 (6 px), class 2 absent from both.
    Volume 3 (slice 1): class 1: P=2 px, G=1 px, overlap 1 -> 2/3; class 2: P=1, G=1, overlap 1 -> 1.
    Pooled class 1: inter 6+1 = 7, |P|+|G| = 12 + 3 = 15 -> 14/15. Class 2: 2/2 -> 1.
    Per volume class 1: mean(1, 2/3) = 5/6; class 2: NaN skipped -> 1.
    """
    pred = np.array([[[1, 1, 1, 0]], [[1, 1, 2, 0]], [[1, 1, 1, 0]]])
    target = np.array([[[1, 1, 1, 0]], [[1, 0, 2, 0]], [[1, 1, 1, 0]]])
    volume = np.array([7, 3, 7])
    return pred, target, volume


def test_pooled_and_per_volume_differ_on_crafted_example() -> None:
    metrics = evaluate_volumes(*crafted(), num_classes=3)
    expected = {
        "dice_pooled_c1": 14 / 15,
        "dice_pooled_c2": 1.0,
        "dice_pooled_mean": (14 / 15 + 1.0) / 2,
        "dice_volume_c1": 5 / 6,
        "dice_volume_c2": 1.0,
        "dice_volume_mean": (5 / 6 + 1.0) / 2,
        "n_volumes": 2,
    }
    assert metrics.keys() == expected.keys()
    for key, value in expected.items():
        assert math.isclose(metrics[key], value), key
    assert metrics["dice_pooled_c1"] != metrics["dice_volume_c1"]


def test_evaluate_volumes_torch_equals_numpy_and_slice_order_is_irrelevant() -> None:
    pred, target, volume = crafted()
    order = np.array([2, 0, 1])
    from_numpy = evaluate_volumes(pred, target, volume, 3)
    from_torch = evaluate_volumes(
        torch.from_numpy(pred[order]),
        torch.from_numpy(target[order]),
        torch.from_numpy(volume[order]),
        3,
    )
    assert from_numpy == from_torch


def test_evaluate_volumes_single_volume_equals_dice_per_class() -> None:
    pred, target, _ = crafted()
    metrics = evaluate_volumes(pred, target, np.zeros(3, dtype=np.int64), 3)
    dice = dice_per_class(pred, target, 3)
    assert metrics["n_volumes"] == 1
    for k in (1, 2):
        assert math.isclose(metrics[f"dice_pooled_c{k}"], float(dice[k - 1]))
        assert math.isclose(metrics[f"dice_volume_c{k}"], float(dice[k - 1]))


def test_evaluate_volumes_class_absent_everywhere_is_nan_and_means_skip_it() -> None:
    pred = np.array([[[1, 0]], [[1, 1]]])
    target = np.array([[[1, 0]], [[1, 0]]])
    metrics = evaluate_volumes(pred, target, np.array([0, 1]), 3)
    assert math.isnan(metrics["dice_pooled_c2"]) and math.isnan(metrics["dice_volume_c2"])
    assert math.isclose(metrics["dice_pooled_c1"], 2 * 2 / (3 + 2))
    assert math.isclose(metrics["dice_volume_c1"], (1.0 + 2 / 3) / 2)
    assert math.isclose(metrics["dice_pooled_mean"], metrics["dice_pooled_c1"])
    assert math.isclose(metrics["dice_volume_mean"], metrics["dice_volume_c1"])


@pytest.mark.parametrize(
    ("shapes", "match"),
    [
        (((2, 4, 4), (2, 4, 5), (2,)), r"\(2, 4, 4\) and \(2, 4, 5\)"),
        (((2, 4, 4), (2, 4, 4), (3,)), r"volume must have shape \(S,\) = \(2,\)"),
        (((4, 4), (4, 4), (4,)), r"\(S, H, W\)"),
        (((0, 4, 4), (0, 4, 4), (0,)), "at least one slice"),
    ],
)
def test_evaluate_volumes_bad_shapes(shapes: tuple[tuple[int, ...], ...], match: str) -> None:
    pred, target, volume = (np.zeros(s, dtype=np.int64) for s in shapes)
    with pytest.raises(ValueError, match=match):
        evaluate_volumes(pred, target, volume, 3)


# ---------------------------------------------------------------------------------------------
# against the plain per-volume loop (tests/trainers/dice_reference.py)


def assert_same_scores(got: dict[str, float], expected: dict[str, float]) -> None:
    """Equal keys; every value equal within 1e-12 (NaN where the reference has NaN)."""
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12, rel=0), key


@pytest.mark.parametrize("seed", range(4))
def test_evaluate_volumes_equals_the_reference_loop(seed: int) -> None:
    pred, target, volume = random_case(seed)
    expected = reference_scores(pred, target, volume, 4)
    # the case covers what it claims: a NaN volume, a zero volume, a class absent everywhere
    assert math.isnan(expected["dice_pooled_c3"]) and math.isnan(expected["dice_volume_c3"])
    rows = volume == 3
    assert not ((pred[rows] == 1).any() or (target[rows] == 1).any())
    assert_same_scores(evaluate_volumes(pred, target, volume, 4), expected)


@pytest.mark.parametrize("seed", range(4))
def test_confusion_of_batches_adds_up_to_the_reference(seed: int) -> None:
    """What the stages' streamed evaluation does: per-batch tables at random cut points,
    summed, then ``dice_scores``: equal to the loop over volumes."""
    pred, target, volume = random_case(seed)
    ids, group = np.unique(volume, return_inverse=True)
    rng = np.random.default_rng(seed)
    cuts = [0, *sorted(rng.choice(np.arange(1, len(volume)), size=5, replace=False)), len(volume)]
    total = torch.zeros((len(ids), 4, 4), dtype=torch.int64)
    for lo, hi in zip(cuts[:-1], cuts[1:], strict=True):
        total += volume_confusion(
            torch.from_numpy(pred[lo:hi]),
            torch.from_numpy(target[lo:hi]),
            torch.from_numpy(group[lo:hi]),
            len(ids),
            4,
        )
    assert int(total.sum()) == pred.size
    assert_same_scores(dice_scores(total), reference_scores(pred, target, volume, 4))


def test_volume_confusion_and_dice_scores_bad_inputs() -> None:
    labels = torch.zeros((2, 3, 3), dtype=torch.long)
    with pytest.raises(ValueError, match="outside"):
        volume_confusion(labels, labels, torch.tensor([0, 2]), 2, 3)
    with pytest.raises(ValueError, match="outside"):
        volume_confusion(labels + 3, labels, torch.tensor([0, 1]), 2, 3)
    with pytest.raises(ValueError, match=r"\(B, H, W\)"):
        volume_confusion(labels, labels, torch.tensor([0]), 2, 3)
    with pytest.raises(ValueError, match="V = 0"):
        dice_scores(torch.zeros((0, 3, 3), dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(V, C, C\)"):
        dice_scores(torch.zeros((2, 3, 2), dtype=torch.long))
