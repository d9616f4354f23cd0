"""Whether a run may be read as a result, and paired comparisons against a baseline.

Two questions a results table must answer before anyone compares methods with it:

1. **Did the run converge?** ``converged(records)`` reads a fine-tuning node's validation curve
   (its per-epoch records, x = optimiser steps, or epochs for runs recorded before steps were):
   a run is *converged* when the best validation Dice reached in the last quarter of training
   exceeds the best reached before it by less than ``tolerance`` (0.01): the last quarter found
   no real improvement, so more of the same training would not change the conclusion. Taking
   the best on each side (rather than two single points) keeps one noisy validation from
   deciding. Undecidable (None) with no validation point on either side of the quarter mark.
   ``collapsed``: some foreground class has test Dice below ``COLLAPSE_DICE`` (0.05): the model
   never learned to segment it, whatever its mean says.
2. **Does a method beat the baseline?** ``paired_differences`` pairs every run of a method with
   the baseline's run on the same (seed, split) and the same values of any other grid axis, and
   reports the mean paired difference, its 95 % confidence interval (Student t, n - 1 degrees of
   freedom, over the paired differences) and wins / n. Pairing removes the split-to-split
   variation that dominates unpaired means (one split's test volumes can be 0.05 harder for
   every method alike).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

COLLAPSE_DICE = 0.05
CONVERGENCE_TAIL = 0.25
CONVERGENCE_TOLERANCE = 0.01
CURVE_METRIC = "val_dice_mean"
PAIRED_COLUMNS = (
    "method",
    "label_fraction",
    "baseline",
    "metric",
    "n",
    "delta_mean",
    "delta_std",
    "ci95_low",
    "ci95_high",
    "wins",
)
PAIR_KEYS = ("seed", "split")

# two-sided 95 % quantiles t_{0.975, df} of Student's t for df = 1 .. 30
_T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
    2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
    2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def t_quantile_975(df: int) -> float:
    """t_{0.975, df}: exact to 3 decimals for df <= 30, Cornish-Fisher expansion beyond."""
    if df < 1:
        raise ValueError(f"df: must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def converged(
    records: Iterable[Mapping[str, Any]],
    metric: str = CURVE_METRIC,
    tail: float = CONVERGENCE_TAIL,
    tolerance: float = CONVERGENCE_TOLERANCE,
) -> tuple[bool | None, float]:
    """``(converged, gain)`` of one node's validation curve (see the module docstring).

    ``gain`` = best ``metric`` in the last ``tail`` of training minus the best before it (NaN
    when undecidable). The x axis is ``steps`` when every validated record has it, else
    ``epoch``; the end of training is the last record's x.
    """
    rows = [r for r in records if _finite(r.get("epoch"))]
    if not rows:
        return None, math.nan
    x_key = "steps" if all(_finite(r.get("steps")) for r in rows) else "epoch"
    end = max(float(r[x_key]) for r in rows)
    start = end * (1.0 - tail)
    curve = [(float(r[x_key]), float(r[metric])) for r in rows if _finite(r.get(metric))]
    before = [v for x, v in curve if x <= start]
    after = [v for x, v in curve if x > start]
    if not before or not after:
        return None, math.nan
    gain = max(after) - max(before)
    return gain < tolerance, gain


def collapsed(row: Mapping[str, Any], prefix: str = "test_dice_pooled_c") -> bool | None:
    """Whether any per-class column ``<prefix><k>`` of a trials row is below ``COLLAPSE_DICE``
    (None when the row has no such value)."""
    values = [float(v) for k, v in row.items() if k.startswith(prefix) and _finite(v)]
    return min(values) < COLLAPSE_DICE if values else None


def better_direction(metric: str) -> str | None:
    """ "higher" for Dice and surface Dice (``*dice*``, ``*_nsd_*``), "lower" for a Hausdorff
    distance (``*_hd95_c{k}``, ``*_hd95_mean``), None for anything else."""
    if "dice" in metric or "_nsd_" in metric:
        return "higher"
    if "_hd95_" in metric and not metric.endswith("_undefined"):
        return "lower"
    return None


def paired_differences(
    trials: pd.DataFrame,
    baseline: str,
    metric: str = "test_dice_pooled_mean",
    axes: Sequence[str] = (),
) -> pd.DataFrame:
    """Mean paired difference of ``metric`` between every method and ``baseline``.

    ok trials only. A method's run is paired with the baseline's run of the same label
    fraction, ``PAIR_KEYS`` and ``axes`` (other grid axes on which the baseline also varies);
    unpaired runs are left out. One row per (method, label fraction[, axes]) with
    ``PAIRED_COLUMNS``: ``delta_*`` = method - baseline, ``ci95_*`` its 95 % t interval (NaN for
    n < 2), ``wins`` = pairs where the method is strictly better (a larger value, or a smaller
    one where ``better_direction(metric)`` is "lower": HD95). Raises ``ValueError`` naming
    the baseline or metric when it is absent.
    """
    if metric not in trials.columns:
        raise ValueError(f"metric {metric!r}: not in the trials table")
    ok = trials[trials["status"] == "ok"] if "status" in trials.columns else trials
    if baseline not in set(ok["method"]):
        methods = ", ".join(sorted(set(ok["method"]))) or "none finished"
        raise ValueError(f"--baseline {baseline!r}: no finished trial of it (methods: {methods})")
    keys = ["label_fraction", *PAIR_KEYS, *axes]
    values = ok.assign(value=pd.to_numeric(ok[metric], errors="coerce")).dropna(subset=["value"])
    base = values[values["method"] == baseline][[*keys, "value"]].rename(columns={"value": "base"})
    rows = []
    for (method, *group), runs in values.groupby(
        ["method", "label_fraction", *axes], sort=False, dropna=False
    ):
        if method == baseline:
            continue
        pairs = runs[[*keys, "value"]].merge(base, on=keys, how="inner")
        deltas = (pairs["value"] - pairs["base"]).tolist()
        if not deltas:
            continue
        rows.append(
            {
                "method": method,
                **dict(zip(["label_fraction", *axes], group, strict=True)),
                "baseline": baseline,
                "metric": metric,
                **paired_summary(deltas, lower=better_direction(metric) == "lower"),
            }
        )
    columns = [*PAIRED_COLUMNS[:2], *axes, *PAIRED_COLUMNS[2:]]
    return pd.DataFrame(rows, columns=columns)


def paired_summary(deltas: Sequence[float], lower: bool = False) -> dict[str, Any]:
    """``n``, ``delta_mean``, ``delta_std`` (ddof 1), ``ci95_low``/``ci95_high`` (mean -/+
    t_{0.975, n-1} * std / sqrt(n); NaN for n < 2) and ``wins`` (deltas > 0; with ``lower``,
    deltas < 0) of paired differences."""
    n = len(deltas)
    mean = sum(deltas) / n
    std = math.sqrt(sum((d - mean) ** 2 for d in deltas) / (n - 1)) if n > 1 else math.nan
    half = t_quantile_975(n - 1) * std / math.sqrt(n) if n > 1 else math.nan
    return {
        "n": n,
        "delta_mean": mean,
        "delta_std": std,
        "ci95_low": mean - half,
        "ci95_high": mean + half,
        "wins": sum(d < 0 if lower else d > 0 for d in deltas),
    }


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
