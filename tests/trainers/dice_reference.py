"""The Dice metrics written the plain way, as the tests' reference: a Python loop over volumes and
classes, numpy sums, no confusion table. Kept out of the package on purpose.

Definitions (trainers/metrics.py): Dice_k = 2 |P_k ∩ G_k| / (|P_k| + |G_k|), NaN when class k is
in neither prediction nor truth (of the volume, or of the whole set for pooled); per-volume
numbers averaged over volumes with NaN skipped; each mean over classes with NaN skipped (NaN
when all are NaN).
"""

from __future__ import annotations

import math

import numpy as np


def _dice(pred: np.ndarray, target: np.ndarray, k: int) -> float:
    p, t = pred == k, target == k
    size = int(p.sum()) + int(t.sum())
    return math.nan if size == 0 else 2 * int((p & t).sum()) / size


def _nanmean(values: list[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def reference_scores(
    pred: np.ndarray, target: np.ndarray, volume: np.ndarray, num_classes: int
) -> dict[str, float]:
    """pred, target (S, H, W) integer labels; volume (S,) ids. The keys of ``evaluate_volumes``."""
    pred, target, volume = np.asarray(pred), np.asarray(target), np.asarray(volume)
    classes = range(1, num_classes)
    pooled = {k: _dice(pred, target, k) for k in classes}
    per_volume: dict[int, list[float]] = {k: [] for k in classes}
    for v in sorted(set(volume.tolist())):
        rows = volume == v
        for k in classes:
            per_volume[k].append(_dice(pred[rows], target[rows], k))
    volume_mean = {k: _nanmean(per_volume[k]) for k in classes}
    out: dict[str, float] = {f"dice_pooled_c{k}": pooled[k] for k in classes}
    out["dice_pooled_mean"] = _nanmean(list(pooled.values()))
    out.update({f"dice_volume_c{k}": volume_mean[k] for k in classes})
    out["dice_volume_mean"] = _nanmean(list(volume_mean.values()))
    out["n_volumes"] = len(set(volume.tolist()))
    return out


def random_case(
    seed: int, slices: int = 60, side: int = 8, num_classes: int = 4
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random predictions against random truth on ``slices`` slices of 7 volumes with scattered
    ids, slices of a volume not contiguous; volume 3 lacks class 1 in both prediction and truth
    (its Dice is NaN), volume 10 lacks class 2 in the truth only (Dice 0), and the last class
    is absent from every map (NaN everywhere, skipped by the means)."""
    rng = np.random.default_rng(seed)
    ids = np.array([3, 10, 11, 42, 7, 0, 99])
    volume = rng.choice(ids, size=slices)
    volume[: len(ids)] = ids  # every id present
    rng.shuffle(volume)
    present = num_classes - 1  # the last class never appears
    pred = rng.integers(0, present, size=(slices, side, side))
    target = rng.integers(0, present, size=(slices, side, side))
    pred[volume == 3] = np.where(pred[volume == 3] == 1, 0, pred[volume == 3])
    target[volume == 3] = np.where(target[volume == 3] == 1, 0, target[volume == 3])
    target[volume == 10] = np.where(target[volume == 10] == 2, 0, target[volume == 10])
    return pred, target, volume
