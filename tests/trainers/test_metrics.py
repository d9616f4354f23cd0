"""Dice per class and pooled vs per-volume aggregation, against hand-computed tables."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainers.metrics import dice_per_class, evaluate_volumes

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
