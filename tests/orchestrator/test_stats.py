"""Convergence, collapse and paired differences against hand-computed cases."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from orchestrator.stats import (
    better_direction,
    collapsed,
    converged,
    paired_differences,
    paired_summary,
    t_quantile_975,
)


def test_t_quantiles_match_the_table_and_approach_the_normal() -> None:
    assert t_quantile_975(1) == 12.706
    assert t_quantile_975(2) == 4.303
    assert t_quantile_975(30) == 2.042
    # beyond the table: t_{0.975, 40} = 2.0211, t_{0.975, 120} = 1.9799 (printed tables)
    assert t_quantile_975(40) == pytest.approx(2.0211, abs=5e-4)
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=5e-4)
    with pytest.raises(ValueError, match="df"):
        t_quantile_975(0)


def test_paired_summary_by_hand() -> None:
    # deltas 0.01, 0.03, 0.05: mean 0.03, sd 0.02, half-width 4.303 * 0.02 / sqrt(3) = 0.049687
    out = paired_summary([0.01, 0.03, 0.05])
    assert out["n"] == 3 and out["wins"] == 3
    assert out["delta_mean"] == pytest.approx(0.03)
    assert out["delta_std"] == pytest.approx(0.02)
    assert out["ci95_low"] == pytest.approx(0.03 - 0.049687, abs=1e-6)
    assert out["ci95_high"] == pytest.approx(0.03 + 0.049687, abs=1e-6)
    single = paired_summary([-0.2])
    assert (
        single["wins"] == 0 and math.isnan(single["ci95_low"]) and math.isnan(single["delta_std"])
    )
    ties = paired_summary([0.0, 0.0])
    assert ties["wins"] == 0 and ties["ci95_low"] == ties["ci95_high"] == 0.0


def _trials() -> pd.DataFrame:
    rows = []
    base = {(0, 0): 0.70, (0, 1): 0.60, (0, 2): 0.80}
    delta = {(0, 0): 0.01, (0, 1): 0.03, (0, 2): 0.05}
    for (seed, split), value in base.items():
        rows.append(("random", 0.05, seed, split, "ok", value))
        rows.append(("global", 0.05, seed, split, "ok", value + delta[seed, split]))
        rows.append(("mixup", 0.05, seed, split, "ok", value - 0.1))
    rows.append(("global", 0.05, 0, 3, "ok", 0.99))  # no baseline run on split 3: unpaired
    rows.append(("mixup", 0.1, 0, 0, "failed", math.nan))
    return pd.DataFrame(
        rows, columns=["method", "label_fraction", "seed", "split", "status", "test_dice"]
    )


def test_paired_differences_pair_on_seed_and_split() -> None:
    paired = paired_differences(_trials(), "random", metric="test_dice")
    by_method = paired.set_index("method")
    assert list(paired["method"]) == ["global", "mixup"]
    glob = by_method.loc["global"]
    assert glob["n"] == 3 and glob["wins"] == 3 and glob["baseline"] == "random"
    assert glob["delta_mean"] == pytest.approx(0.03)
    assert glob["ci95_low"] == pytest.approx(0.03 - 0.049687, abs=1e-6)
    mixup = by_method.loc["mixup"]
    assert mixup["delta_mean"] == pytest.approx(-0.1) and mixup["wins"] == 0
    assert mixup["delta_std"] == pytest.approx(0.0, abs=1e-12)


def test_paired_differences_name_a_missing_baseline_or_metric() -> None:
    with pytest.raises(ValueError, match="--baseline 'mean_teacher'"):
        paired_differences(_trials(), "mean_teacher", metric="test_dice")
    with pytest.raises(ValueError, match="metric 'nope'"):
        paired_differences(_trials(), "random", metric="nope")


def test_paired_differences_pair_within_other_axes() -> None:
    trials = _trials()
    trials["stages.local.temperature"] = 0.1
    other = trials.assign(**{"stages.local.temperature": 0.5})
    other.loc[other["method"] == "global", "test_dice"] += 0.1
    both = pd.concat([trials, other], ignore_index=True)
    paired = paired_differences(
        both, "random", metric="test_dice", axes=["stages.local.temperature"]
    )
    glob = paired[paired["method"] == "global"].set_index("stages.local.temperature")
    assert glob.loc[0.1, "n"] == 3 and glob.loc[0.5, "n"] == 3
    assert glob.loc[0.5, "delta_mean"] == pytest.approx(0.13)


def _curve(points: list[tuple[int, float]]) -> list[dict[str, float]]:
    return [{"epoch": i + 1, "steps": s, "val_dice_mean": v} for i, (s, v) in enumerate(points)]


@pytest.mark.parametrize(
    ("points", "expected", "gain"),
    [
        # plateau: best before step 600 is 0.77, best after 0.775: +0.005 < 0.01
        ([(200, 0.5), (400, 0.77), (600, 0.74), (800, 0.775)], True, 0.005),
        # still rising: 0.70 -> 0.78 in the last quarter
        ([(200, 0.4), (400, 0.6), (600, 0.70), (800, 0.78)], False, 0.08),
        # a drop at the end is not "still improving"
        ([(200, 0.7), (400, 0.8), (800, 0.6)], True, -0.2),
    ],
)
def test_converged_compares_best_before_and_after_the_last_quarter(
    points: list[tuple[int, float]], expected: bool, gain: float
) -> None:
    result, measured = converged(_curve(points))
    assert result is expected
    assert measured == pytest.approx(gain)


def test_converged_is_undecidable_without_points_on_both_sides() -> None:
    assert converged(_curve([(800, 0.7)]))[0] is None
    # training records without validation in the last quarter
    records = _curve([(100, 0.5), (200, 0.6)]) + [{"epoch": 3, "steps": 800, "loss": 1.0}]
    assert converged(records)[0] is None
    assert converged([])[0] is None


def test_converged_falls_back_to_epochs_for_old_records() -> None:
    # x = epoch: the last quarter of 4 epochs is (3, 4]; 0.505 - 0.5 < 0.01
    records = [{"epoch": e, "val_dice_mean": v} for e, v in ((1, 0.3), (2, 0.5), (4, 0.505))]
    assert converged(records) == (True, pytest.approx(0.005))


def test_collapsed_looks_at_every_class() -> None:
    assert collapsed({"test_dice_pooled_c1": 0.8, "test_dice_pooled_c2": 0.04}) is True
    assert collapsed({"test_dice_pooled_c1": 0.8, "test_dice_pooled_c2": 0.06}) is False
    assert collapsed({"test_dice_pooled_mean": 0.8}) is None


def test_a_lower_hd95_wins() -> None:
    """For HD95 (lower is better) a pair wins when the method's distance is smaller."""
    trials = pd.DataFrame(
        [
            {"method": m, "label_fraction": 0.1, "seed": s, "split": 0, "status": "ok", "h": v}
            for m, values in (("random", [5.0, 6.0, 4.0]), ("global", [4.0, 5.5, 4.5]))
            for s, v in enumerate(values)
        ]
    ).rename(columns={"h": "test_native_hd95_mean"})
    row = paired_differences(trials, "random", metric="test_native_hd95_mean").iloc[0]
    assert row["wins"] == 2 and row["delta_mean"] == pytest.approx(-1 / 3)  # -1, -0.5, +0.5
    assert better_direction("test_native_hd95_c1") == "lower"
    assert better_direction("test_native_nsd_mean") == "higher"
    assert better_direction("wall_s") is None
