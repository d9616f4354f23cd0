"""Result tables from a hand-written store: statuses, metrics, summary statistics, formats."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from orchestrator.plan import Plan, build_plan
from orchestrator.store import StageStore
from orchestrator.tables import (
    collect,
    format_table,
    paper_table,
    read_tables,
    tables_stale,
    write_tables,
)
from tests.orchestrator.specs import spec_of

SPEC = """
name: tables-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: [global, global+local_block]
label_fraction: [0.2, 0.5]
seed: [0, 1, 2]
stages:
  local: {block_size: 8}
"""


def dice(method: str, fraction: float, seed: int) -> float:
    """The fake test Dice written for a trial's finetune node."""
    return round(
        0.5 + (0.1 if method == "global+local_block" else 0.0) + fraction / 10 + seed / 100, 6
    )


@pytest.fixture
def swept(tmp_path: Path) -> tuple[Plan, StageStore]:
    """A store where seed 1's global failed, (glb, 0.5, seed 0)'s finetune failed and
    (global, 0.5, seed 2)'s finetune is unfinished; everything else completed."""
    spec = spec_of(tmp_path, SPEC)
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    state = {"w": torch.zeros(1)}
    for trial in plan.trials:
        for stage, key in trial.nodes.items():
            if store.is_complete(key) or store.read_error(key):
                continue
            if trial.seed == 1:
                if stage == "global":
                    store.write_error(key, "RuntimeError: CUDA out of memory")
                break
            if stage != "finetune":
                store.append_epoch(
                    key, {"epoch": 0, "loss": 2.0, "seconds": 1.5, "slices_per_s": 100.0}
                )
                store.write_result(key, state, {"loss": 1.0, "wall_s": 3.0})
                continue
            if (trial.method, trial.label_fraction, trial.seed) == ("global+local_block", 0.5, 0):
                store.write_error(key, "ValueError: loss is NaN")
            elif (trial.method, trial.label_fraction, trial.seed) == ("global", 0.5, 2):
                store.append_epoch(key, {"epoch": 0, "loss": 1.0, "seconds": 1.0})
            else:
                for epoch, loss in (
                    (0, 1.0),
                    (1, 0.9),
                    (1, 0.8),
                ):  # epoch 1 recorded twice (restart)
                    record = {
                        "epoch": epoch,
                        "loss": loss,
                        "seconds": 2.0,
                        "val_dice_mean": 0.6,
                        "gpu_s": 1.0,
                    }
                    store.append_epoch(key, record)
                value = dice(trial.method, trial.label_fraction, trial.seed)
                metrics = {
                    "test_dice_pooled_mean": value,
                    "test_dice_volume_mean": value - 0.01,
                    "test_dice_pooled_c1": value + 0.02,
                    "val_dice_pooled_mean": 0.6,
                }
                store.write_result(key, state, metrics)
    return plan, store


def test_one_row_per_trial_with_status_and_error(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    trials = collect(plan, store).trials.set_index("trial_id")
    assert len(trials) == len(plan.trials) == 12
    by_config = {(t.method, t.label_fraction, t.seed): t.trial_id for t in plan.trials}
    statuses = trials["status"].value_counts().to_dict()
    assert statuses == {"ok": 6, "skipped": 4, "failed": 1, "pending": 1}
    failed = trials.loc[by_config[("global+local_block", 0.5, 0)]]
    assert failed["status"] == "failed"
    assert "finetune" in failed["error"] and "loss is NaN" in failed["error"]
    assert math.isnan(failed["test_dice_pooled_mean"])
    skipped = trials.loc[by_config[("global", 0.2, 1)]]
    assert (
        skipped["status"] == "skipped"
        and "global" in skipped["error"]
        and "out of memory" in skipped["error"]
    )
    pending = trials.loc[by_config[("global", 0.5, 2)]]
    assert pending["status"] == "pending" and pd.isna(pending["error"])
    ok = trials.loc[by_config[("global+local_block", 0.2, 2)]]
    assert ok["test_dice_pooled_mean"] == pytest.approx(dice("global+local_block", 0.2, 2))
    assert ok["key_local"] == next(t for t in plan.trials if t.trial_id == ok.name).nodes["local"]
    assert pd.isna(trials.loc[by_config[("global", 0.2, 0)], "key_local"])
    assert ok["wall_s_global"] == 3.0  # recorded by the worker
    assert ok["wall_s_finetune"] == 4.0  # sum over epochs 0 and (last) 1
    assert ok["gpu_s_finetune"] == 2.0
    assert math.isnan(ok["gpu_s_global"])
    for column in (
        "sweep",
        "method",
        "label_fraction",
        "seed",
        "split",
        "torch_version",
        "git_commit",
    ):
        assert column in trials.columns
    assert (trials["sweep"] == "tables-test").all()
    assert "wall_s" not in trials.columns


def test_epochs_table(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    trials, epochs, summary = collect(plan, store)  # the contract's tuple form
    assert len(trials) == 12 and len(summary) > 0
    assert list(epochs.columns[:8]) == [
        "sweep",
        "key",
        "stage",
        "epoch",
        "loss",
        "val_dice_mean",
        "slices_per_s",
        "seconds",
    ]
    assert not epochs.duplicated(["key", "epoch"]).any()
    finetune = epochs[(epochs["stage"] == "finetune") & (epochs["epoch"] == 1)]
    assert (finetune["loss"] == 0.8).all()  # the last record of a re-run epoch wins


def test_summary_mean_std_n(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    summary = collect(plan, store).summary.set_index(["method", "label_fraction"])
    # (global+local_block, 0.2): seeds 0 and 2 ok
    row = summary.loc[("global+local_block", 0.2)]
    values = [dice("global+local_block", 0.2, s) for s in (0, 2)]
    assert row["test_dice_pooled_mean_mean"] == pytest.approx(sum(values) / 2)
    assert row["test_dice_pooled_mean_std"] == pytest.approx(pd.Series(values).std(ddof=1))
    assert row["test_dice_pooled_mean_n"] == 2 and row["n_trials"] == 2
    # (global+local_block, 0.5): only seed 2 ok (seed 0 failed, seed 1 skipped)
    single = summary.loc[("global+local_block", 0.5)]
    assert single["test_dice_pooled_mean_n"] == 1 and math.isnan(
        single["test_dice_pooled_mean_std"]
    )
    assert "val_dice_pooled_mean_mean" not in summary.columns


def test_parquet_round_trip_and_staleness(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    assert tables_stale(store)
    tables = collect(plan, store)
    paths = write_tables(tables, store)
    assert sorted(p.name for p in paths.values()) == [
        "epochs.parquet",
        "summary.parquet",
        "trials.parquet",
    ]
    assert not tables_stale(store)
    again = read_tables(store.root)
    pd.testing.assert_frame_equal(again.trials, tables.trials, check_dtype=False)
    pd.testing.assert_frame_equal(again.summary, tables.summary, check_dtype=False)
    assert len(again.epochs) == len(tables.epochs)
    assert not list(store.tables_dir.glob("*.tmp"))
    key = plan.trials[0].nodes["finetune"]
    store.write_error(key, "later failure")
    assert tables_stale(store)


def test_mixed_type_columns_survive_parquet(tmp_path: Path) -> None:
    text = SPEC + "grid:\n  dataset.label_remap: [[], [[1, 1], [2, 2]]]\n"
    spec = spec_of(tmp_path, text, storage="s")
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    write_tables(collect(plan, store), store)
    trials = read_tables(store.root).trials
    assert set(trials["dataset.label_remap"]) == {"[]", "[[1, 1], [2, 2]]"}


def test_paper_table_and_formats(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    table = paper_table(collect(plan, store).trials)
    assert list(table.index) == ["global", "global+local_block"]  # the paper's order
    assert list(table.columns) == ["0.2", "0.5"]
    values = [dice("global", 0.2, s) for s in (0, 2)]
    mean, std = sum(values) / 2, pd.Series(values).std(ddof=1)
    assert table.loc["global", "0.2"] == f"{mean:.3f} ± {std:.3f} (2)"
    assert table.loc["global+local_block", "0.5"] == f"{dice('global+local_block', 0.5, 2):.3f} (1)"

    text = format_table(table, "text")
    assert text.splitlines()[0].split() == ["method", "\\", "label_fraction", "0.2", "0.5"]
    assert "global + local (block)" in text and "±" in text  # rendered by display name
    assert "global+local_block" not in text
    md = format_table(table, "md").splitlines()
    assert md[0] == "| method \\ label_fraction | 0.2 | 0.5 |" and md[1] == "|---|---|---|"
    assert md[2].startswith("| global (SimCLR) |")
    latex = format_table(table, "latex")
    assert (
        latex.startswith("\\begin{tabular}{lcc}")
        and "$\\pm$" in latex
        and "global + local (block)" in latex
    )
    csv = format_table(table, "csv").splitlines()
    assert csv[0] == "method \\ label_fraction,0.2,0.5" and len(csv) == 3
    assert csv[1].startswith("global (SimCLR),")
    with pytest.raises(ValueError, match="format"):
        format_table(table, "html")


def test_paper_table_rejects_unknown_metric_and_axis(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    trials = collect(plan, store).trials
    with pytest.raises(ValueError, match="test_dice_pooled_mean"):
        paper_table(trials, metric="test_hd95")
    with pytest.raises(ValueError, match="--by 'temperature'"):
        paper_table(trials, cols="temperature")


def test_paper_table_keeps_other_axes_apart(tmp_path: Path) -> None:
    trials = pd.DataFrame(
        {
            "trial_id": ["t0", "t1", "t2", "t3"],
            "stages.local.temperature": [0.1, 0.1, 0.5, 0.5],
            "method": ["global+local_block"] * 4,
            "label_fraction": [0.1] * 4,
            "seed": [0, 1, 0, 1],
            "split": [0] * 4,
            "status": ["ok"] * 4,
            "test_dice_pooled_mean": [0.8, 0.82, 0.7, 0.72],
        }
    )
    table = paper_table(trials)
    assert list(table.index.names) == ["method", "stages.local.temperature"]
    assert list(table["0.1"]) == ["0.810 ± 0.014 (2)", "0.710 ± 0.014 (2)"]
    by_temperature = paper_table(trials, cols="stages.local.temperature")
    assert list(by_temperature.columns) == ["0.1", "0.5"]
    assert by_temperature.shape == (1, 2)


def test_trials_record_steps_convergence_and_collapse(swept: tuple[Plan, StageStore]) -> None:
    plan, store = swept
    trials = collect(plan, store).trials
    ok = trials[trials["status"] == "ok"]
    # the fake curves are flat at 0.6 (epochs 0, 1): converged; class 1 Dice > 0.05: no collapse
    assert ok["converged"].eq(True).all() and ok["collapsed"].eq(False).all()
    assert ok["val_gain_last_quarter"].eq(0.0).all()
    assert {"steps_global", "steps_local", "steps_finetune"} <= set(trials.columns)
    pending = trials[trials["status"] == "pending"]
    assert pending["converged"].isna().all()


def test_paper_table_marks_unconverged_and_collapsed_cells() -> None:
    trials = pd.DataFrame(
        {
            "method": ["random"] * 4,
            "label_fraction": [0.05, 0.05, 0.1, 0.2],
            "seed": 0,
            "split": [0, 1, 0, 0],
            "status": "ok",
            "test_dice_pooled_mean": [0.7, 0.8, 0.75, 0.8],
            "converged": [True, False, True, None],
            "collapsed": [False, False, True, False],
        }
    )
    table = paper_table(trials)
    row = table.loc["random"]
    assert row["0.05"] == "0.750 ± 0.071 (2) †"
    assert row["0.1"] == "0.750 (1) ‡"
    assert row["0.2"] == "0.800 (1)"  # undecidable convergence is not marked
    assert len(table.attrs["notes"]) == 2
    assert "$^\\dagger$" in format_table(table, "latex")


def test_paired_table_cells() -> None:
    from orchestrator.stats import paired_differences
    from orchestrator.tables import paired_table

    rows = []
    for split, (base, delta) in enumerate([(0.7, 0.01), (0.6, 0.03), (0.8, 0.05)]):
        rows.append(("random", split, base))
        rows.append(("global", split, base + delta))
    trials = pd.DataFrame(rows, columns=["method", "split", "test_dice_pooled_mean"]).assign(
        label_fraction=0.05, seed=0, status="ok"
    )
    table = paired_table(paired_differences(trials, "random"))
    assert table.loc["global", "0.05"] == "+0.030 [-0.020, +0.080] 3/3"


def test_display_names_come_from_the_method_registry() -> None:
    """Every registered method has a display name; rendered tables use it for rows and (with
    ``--by method``) columns, while the tables themselves keep the registry names."""
    from trainers.methods import METHODS, display_name

    assert all(method.display for method in METHODS.values())
    assert display_name("global+local_block") == "global + local (block)"
    assert display_name("tcsm") == "tcsm"  # not registered (an old table): shown as it is
    trials = pd.DataFrame(
        {
            "method": ["random", "global+local_block", "tcsm"],
            "label_fraction": 0.1,
            "seed": 0,
            "split": 0,
            "status": "ok",
            "test_dice_pooled_mean": [0.7, 0.8, 0.75],
        }
    )
    by_method = paper_table(trials, cols="method")
    assert list(by_method.columns) == ["random", "global+local_block", "tcsm"]
    header = format_table(by_method, "csv").splitlines()[0]
    assert header == "label_fraction \\ method,random init,global + local (block),tcsm"


def test_best_mean_per_column_is_bold_in_md_and_latex() -> None:
    """Hand-made trials: global+local_block is best at 10 %, random and global tie (as shown,
    3 decimals) at 20 %; a column with one value has no best. LaTeX uses booktabs rules."""
    rows = [
        ("random", 0.1, [0.70, 0.72]),
        ("global", 0.1, [0.74, 0.76]),
        ("global+local_block", 0.1, [0.80, 0.82]),
        ("random", 0.2, [0.8001, 0.8003]),
        ("global", 0.2, [0.8002]),
        ("global+local_block", 0.2, [0.79]),
        ("random", 0.5, [0.85]),
    ]
    trials = pd.DataFrame(
        [
            {"method": m, "label_fraction": f, "seed": s, "split": 0, "status": "ok", "d": v}
            for m, f, values in rows
            for s, v in enumerate(values)
        ]
    ).rename(columns={"d": "test_dice_pooled_mean"})
    table = paper_table(trials)
    assert list(table.index) == ["random", "global", "global+local_block"]
    assert sorted(table.attrs["best"]) == [(0, 1), (1, 1), (2, 0)]

    md = format_table(table, "md").splitlines()
    assert md[2] == "| random init | 0.710 ± 0.014 (2) | **0.800 ± 0.000 (2)** | 0.850 (1) |"
    assert md[3] == "| global (SimCLR) | 0.750 ± 0.014 (2) | **0.800 (1)** |  |"
    assert md[4] == "| global + local (block) | **0.810 ± 0.014 (2)** | 0.790 (1) |  |"

    latex = format_table(table, "latex").splitlines()
    assert latex[:2] == ["\\begin{tabular}{lccc}", "\\toprule"]
    assert latex[3] == "\\midrule" and latex[-2:] == ["\\bottomrule", "\\end{tabular}"]
    assert "\\hline" not in "\n".join(latex)
    assert latex[6] == (
        "global + local (block) & \\textbf{0.810 $\\pm$ 0.014 (2)} & 0.790 (1) &  \\\\"
    )
    assert latex[4].count("\\textbf{") == 1 and latex[5].count("\\textbf{") == 1

    assert "**" not in format_table(table, "text") and "**" not in format_table(table, "csv")
    seconds = paper_table(trials.assign(wall_s=trials["test_dice_pooled_mean"]), "wall_s")
    assert seconds.attrs["best"] == []  # "best" is only defined where higher is better (Dice)


def test_native_columns_reach_the_trials_summary_and_paper_table(
    swept: tuple[Plan, StageStore],
) -> None:
    """A finetune node's ``test_native_*`` metrics become trials columns, get summary
    statistics, and ``paper_table`` reports them: the lowest HD95 is the best cell."""
    plan, store = swept
    trial = next(t for t in plan.trials if store.is_complete(t.final_key))
    key = trial.final_key
    metrics = {
        **store.read_metrics(key),
        "test_native_dice_pooled_mean": 0.7,
        "test_native_hd95_mean": 4.5,
        "test_native_nsd_mean": 0.8,
        "native_eval_seconds": 1.0,
    }
    store.write_result(key, {"w": torch.zeros(1)}, metrics)
    trials, _, summary = collect(plan, store)
    row = trials[trials["trial_id"] == trial.trial_id].iloc[0]
    assert row["test_native_dice_pooled_mean"] == 0.7 and row["test_native_hd95_mean"] == 4.5
    assert row["test_dice_pooled_mean"] == metrics["test_dice_pooled_mean"]  # 64 x 64 kept
    assert "test_native_hd95_mean_mean" in summary.columns
    assert "native_eval_seconds_mean" not in summary.columns  # a cost, not a test metric

    rows = [("random", 0.1, [5.0, 6.0]), ("global", 0.1, [3.0, 3.5]), ("mixup", 0.1, [4.0])]
    hand = pd.DataFrame(
        [
            {"method": m, "label_fraction": f, "seed": s, "split": 0, "status": "ok", "h": v}
            for m, f, values in rows
            for s, v in enumerate(values)
        ]
    ).rename(columns={"h": "test_native_hd95_mean"})
    table = paper_table(hand, "test_native_hd95_mean")
    assert table.attrs["best"] == [(1, 0)]  # global: the lowest mean distance
    assert paper_table(
        hand.rename(columns={"test_native_hd95_mean": "test_native_nsd_mean"}),
        "test_native_nsd_mean",
    ).attrs["best"] == [(0, 0)]
