"""Dice scores of predicted label maps (METHOD.md, "evaluate").

For a foreground class k with predicted pixels P_k and ground-truth pixels G_k:

    Dice_k = 2 |P_k ∩ G_k| / (|P_k| + |G_k|)

and Dice_k is NaN when the class is absent from both (0 / 0): there is nothing to score, and
callers average with ``nanmean``. Background (class 0) is never scored.

``evaluate_volumes`` reports two aggregates over a set of volumes, which differ whenever volumes
differ in size or quality:

- **pooled** (``dice_pooled_c{k}``, ``dice_pooled_mean``): intersections and sizes summed over
  every slice of every volume before dividing, i.e. the whole set scored as one image. This is
  the number the reference code reports; large volumes weigh more.
- **per volume** (``dice_volume_c{k}``, ``dice_volume_mean``): Dice computed per 3D volume (its
  slices reassembled by volume id), then averaged over volumes with NaN (class absent from
  both prediction and truth in that volume) skipped. This is the usual convention in the
  medical-imaging literature; every volume weighs the same.

Each ``*_mean`` is the mean over foreground classes of the per-class numbers (NaN skipped).

Both aggregates come from one table of counts per volume, ``volume_confusion`` ((V, C, C):
pixels of volume v with truth t and prediction p), which adds up over any split of the slices;
``dice_scores`` turns it into the metrics. A caller that predicts batch by batch (the stages'
evaluation) sums the tables of its batches and never holds all predictions at once;
``evaluate_volumes`` is the same two steps over label maps already in memory.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ArrayLike = Tensor | np.ndarray


def _as_labels(name: str, value: ArrayLike) -> Tensor:
    tensor = torch.as_tensor(value)
    if tensor.is_floating_point() or tensor.is_complex() or tensor.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer labels, got dtype {tensor.dtype}")
    return tensor.long()


def _check_num_classes(num_classes: int) -> None:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")


def _check_values(name: str, labels: Tensor, num_classes: int) -> None:
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{name} has labels in [{int(labels.min())}, {int(labels.max())}], "
            f"outside [0, {num_classes - 1}] for num_classes={num_classes}"
        )


def _confusion(
    pred: Tensor, target: Tensor, group: Tensor, groups: int, num_classes: int
) -> Tensor:
    """(groups, C, C) int64 counts: [v, t, p] = pixels of group v with truth t and prediction p."""
    c = num_classes
    flat = (group * c + target) * c + pred
    return torch.bincount(flat.reshape(-1), minlength=groups * c * c).view(groups, c, c)


def volume_confusion(
    pred: Tensor, target: Tensor, group: Tensor, groups: int, num_classes: int
) -> Tensor:
    """Per-volume confusion counts of a batch of label slices: (groups, C, C) int64 on
    ``pred``'s device, entry [v, t, p] = pixels of slices with ``group`` v, truth t, prediction p.

    Args:
        pred, target: (B, H, W) integer label slices on one device, values in [0, num_classes).
        group: (B,) integer index of each slice's volume in [0, groups).
        groups: number of volumes of the whole evaluation (tables of batches add up).
        num_classes: classes including background.
    """
    _check_num_classes(num_classes)
    if pred.ndim != 3 or pred.shape != target.shape or group.shape != pred.shape[:1]:
        raise ValueError(
            f"pred, target must be (B, H, W) and group (B,), got {tuple(pred.shape)}, "
            f"{tuple(target.shape)} and {tuple(group.shape)}"
        )
    _check_values("pred", pred, num_classes)
    _check_values("target", target, num_classes)
    if group.numel() and (group.min() < 0 or group.max() >= groups):
        raise ValueError(f"group has values outside [0, {groups - 1}] for groups={groups}")
    return _confusion(pred.long(), target.long(), group.long().view(-1, 1, 1), groups, num_classes)


def _dice_from_confusion(confusion: Tensor) -> Tensor:
    """(..., C, C) counts -> (..., C - 1) float64 foreground Dice; NaN where 0 / 0."""
    counts = confusion.double()
    intersection = counts.diagonal(dim1=-2, dim2=-1)
    sizes = counts.sum(dim=-1) + counts.sum(dim=-2)  # |G_k| (rows) + |P_k| (columns)
    return (2 * intersection / sizes)[..., 1:]


def dice_per_class(pred: ArrayLike, target: ArrayLike, num_classes: int) -> Tensor:
    """Foreground Dice of label maps of any equal shape: (num_classes - 1,) float64.

    Entry k - 1 is ``2 |P_k ∩ G_k| / (|P_k| + |G_k|)`` for class k = 1 .. num_classes - 1,
    NaN when class k is in neither map. Labels must be integers in [0, num_classes).
    """
    _check_num_classes(num_classes)
    pred_t, target_t = _as_labels("pred", pred), _as_labels("target", target)
    if pred_t.shape != target_t.shape:
        raise ValueError(
            f"pred and target must have the same shape, got {tuple(pred_t.shape)} and "
            f"{tuple(target_t.shape)}"
        )
    target_t = target_t.to(pred_t.device)
    _check_values("pred", pred_t, num_classes)
    _check_values("target", target_t, num_classes)
    zero = torch.zeros((), dtype=torch.long, device=pred_t.device)
    return _dice_from_confusion(_confusion(pred_t, target_t, zero, 1, num_classes)[0])


def evaluate_volumes(
    pred: ArrayLike, target: ArrayLike, volume: ArrayLike, num_classes: int
) -> dict[str, float]:
    """Pooled and per-volume Dice of slice predictions (see the module docstring).

    Args:
        pred, target: (S, H, W) integer label slices, numpy or torch.
        volume: (S,) integer volume id of each slice; slices sharing an id form one volume.
        num_classes: classes including background.

    Returns:
        ``dice_pooled_c{k}`` and ``dice_volume_c{k}`` for k = 1 .. num_classes - 1,
        ``dice_pooled_mean``, ``dice_volume_mean`` and ``n_volumes`` (number of distinct ids).
    """
    _check_num_classes(num_classes)
    pred_t, target_t = _as_labels("pred", pred), _as_labels("target", target)
    volume_t = _as_labels("volume", volume)
    if pred_t.ndim != 3 or pred_t.shape != target_t.shape:
        raise ValueError(
            f"pred and target must both have shape (S, H, W), got {tuple(pred_t.shape)} and "
            f"{tuple(target_t.shape)}"
        )
    if volume_t.shape != pred_t.shape[:1]:
        raise ValueError(
            f"volume must have shape (S,) = ({pred_t.shape[0]},) to match pred {tuple(pred_t.shape)}, "
            f"got {tuple(volume_t.shape)}"
        )
    if pred_t.shape[0] == 0:
        raise ValueError("evaluate_volumes needs at least one slice, got S = 0")
    device = pred_t.device
    target_t, volume_t = target_t.to(device), volume_t.to(device)
    _check_values("pred", pred_t, num_classes)
    _check_values("target", target_t, num_classes)

    ids, group = torch.unique(volume_t, return_inverse=True)
    return dice_scores(_confusion(pred_t, target_t, group.view(-1, 1, 1), len(ids), num_classes))


def dice_scores(confusion: Tensor) -> dict[str, float]:
    """The metrics of ``evaluate_volumes`` from per-volume confusion counts (V, C, C)
    (``volume_confusion``, summed over every slice evaluated; V >= 1 volumes, C >= 2 classes):
    ``dice_pooled_c{k}``, ``dice_pooled_mean``, ``dice_volume_c{k}``, ``dice_volume_mean`` and
    ``n_volumes`` = V."""
    if confusion.ndim != 3 or confusion.shape[1] != confusion.shape[2] or confusion.shape[1] < 2:
        raise ValueError(
            f"confusion must have shape (V, C, C), C >= 2, got {tuple(confusion.shape)}"
        )
    if confusion.shape[0] == 0:
        raise ValueError("dice_scores needs the counts of at least one volume, got V = 0")
    num_classes = confusion.shape[1]
    pooled = _dice_from_confusion(confusion.sum(dim=0))  # (C - 1,)
    per_volume = _dice_from_confusion(confusion).nanmean(dim=0)  # (V, C - 1) -> (C - 1,)

    metrics: dict[str, float] = {}
    for k in range(1, num_classes):
        metrics[f"dice_pooled_c{k}"] = float(pooled[k - 1])
    metrics["dice_pooled_mean"] = float(pooled.nanmean())
    for k in range(1, num_classes):
        metrics[f"dice_volume_c{k}"] = float(per_volume[k - 1])
    metrics["dice_volume_mean"] = float(per_volume.nanmean())
    metrics["n_volumes"] = confusion.shape[0]
    return metrics
