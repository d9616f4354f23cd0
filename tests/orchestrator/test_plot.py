"""``semicon-sweep plot`` on hand-written finished sweeps: the numbers behind each figure, the
PNG files written, display names, and exit 2 on a folder with nothing to plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import Plan, Trial, build_plan
from orchestrator.plot import PlotError, plot_sweep
from orchestrator.plot.curves import val_dice_figure
from orchestrator.plot.results import fraction_curves, heatmap_grids
from orchestrator.plot.style import axis_label, metric_label
from orchestrator.store import StageStore
from orchestrator.tables import collect
from tests.orchestrator.specs import spec_of
from trainers.methods import display_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

FRACTION_SPEC = """
name: plot-fractions
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: [random, global, global+local_block]
label_fraction: [0.05, 0.1, 0.2]
seed: [0, 1, 2]
stages:
  local: {block_size: 8}
"""

ABLATION_SPEC = """
name: plot-ablation
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: global+local_block
seed: [0, 1]
grid:
  stages.local.temperature: [0.05, 0.1, 0.5]
  stages.local.block_size: [4, 8, 16]
  label_fraction: [0.1, 0.2]
"""

BONUS = {"random": 0.0, "global": 0.03, "global+local_block": 0.07}


def fraction_dice(trial: Trial) -> float:
    """A plausible fake test Dice: rises with labels, better for contrastive methods."""
    return (
        0.62
        + BONUS[trial.method]
        + math.log2(trial.label_fraction / 0.05) * 0.05
        + (trial.seed - 1) * 0.012
    )


def ablation_dice(trial: Trial) -> float:
    """Peaks at temperature 0.1 and block size 8; rises with labels; seed noise."""
    temperature = trial.params["stages.local.temperature"]
    block = trial.params["stages.local.block_size"]
    return (
        0.80
        - 0.02 * abs(math.log10(temperature / 0.1))
        - 0.01 * abs(math.log2(block / 8))
        + 0.3 * (trial.label_fraction - 0.1)
        + 0.005 * trial.seed
    )


def finished_sweep(
    tmp_path: Path, spec_text: str, dice: Callable[[Trial], float], name: str = "storage"
) -> tuple[Plan, StageStore]:
    """Every node complete, with a few epochs each; each finetune node gets ``dice``."""
    spec = spec_of(tmp_path, spec_text, f"{name}.yaml", storage=name)
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    state = {"w": torch.zeros(1)}
    for trial in plan.trials:
        for stage, key in trial.nodes.items():
            if store.is_complete(key):
                continue
            rng = np.random.default_rng(int(key[:8], 16))  # each node its own curve
            start = {"global": 6.0, "local": 3.0, "finetune": 1.2}[stage] * (1 + 0.1 * rng.random())
            decay = 0.72 + 0.12 * rng.random()
            for epoch in range(1, 6):
                loss = start * decay**epoch * (1 + 0.02 * rng.standard_normal())
                record = {"epoch": epoch, "loss": loss, "seconds": 1.0}
                if stage == "finetune":
                    record["val_dice_mean"] = dice(trial) * (1 - 0.5 * 0.6**epoch) + 0.01 * (
                        rng.standard_normal()
                    )
                store.append_epoch(key, record)
            metrics = {"loss": start * decay**5}
            if stage == "finetune":
                value = dice(trial)
                metrics.update(test_dice_pooled_mean=value, test_dice_volume_mean=value - 0.02)
            store.write_result(key, state, metrics)
    return plan, store


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert len(data) > 1000 and data.startswith(PNG_SIGNATURE), path


def assert_pdf(path: Path) -> None:
    """A PDF whose figure is vector: text as embedded TrueType fonts, no raster image of the
    whole figure (a heatmap's cells would be one small image; the curves have none)."""
    data = path.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF"), path
    assert b"/FontFile2" in data and b"/Subtype /Image" not in data, path


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def fractions(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, StageStore]:
    """3 methods x 3 label fractions x 3 seeds, all finished (tests only read it or plot
    into their own folders)."""
    return finished_sweep(tmp_path_factory.mktemp("fractions"), FRACTION_SPEC, fraction_dice)


@pytest.fixture(scope="module")
def ablation(tmp_path_factory: pytest.TempPathFactory) -> tuple[Plan, StageStore]:
    """temperature x block size x label fraction x 2 seeds of global+local_block, finished."""
    return finished_sweep(tmp_path_factory.mktemp("ablation"), ABLATION_SPEC, ablation_dice)


def test_names_live_in_one_place() -> None:
    assert display_name("random") == "random init"
    assert display_name("global") == "global (SimCLR)"
    assert display_name("global+local_block") == "global + local (block)"
    assert display_name("not_registered") == "not_registered"
    assert axis_label("stages.local.block_size") == "block size (pixels)"
    assert axis_label("stages.finetune.epochs") == "finetune epochs"
    assert metric_label("test_dice_pooled_mean") == (
        "test Dice (pooled over volumes, mean of classes)"
    )
    assert metric_label("ext_dice_volume_c2") == "external test Dice (mean over volumes, class 2)"
    assert metric_label("test_native_hd95_mean") == (
        "test HD95, mm, native grid (mean over volumes, mean of classes)"
    )
    assert metric_label("test_native_dice_pooled_c1") == (
        "test Dice, native grid (pooled over volumes, class 1)"
    )
    assert metric_label("test_native_hd95_undefined") == "test_native_hd95_undefined"


def test_fraction_curves_are_mean_and_std_over_seeds(fractions: tuple[Plan, StageStore]) -> None:
    plan, store = fractions
    trials = collect(plan, store).trials
    curves = fraction_curves(trials, "test_dice_pooled_mean")
    assert [c.label for c in curves] == ["random init", "global (SimCLR)", "global + local (block)"]
    for curve in curves:
        np.testing.assert_allclose(curve.percent, [5, 10, 20])
        assert curve.n.tolist() == [3, 3, 3]
        for point, fraction in enumerate((0.05, 0.1, 0.2)):
            values = [
                fraction_dice(t)
                for t in plan.trials
                if t.method == curve.config[0] and t.label_fraction == fraction
            ]
            assert curve.mean[point] == pytest.approx(np.mean(values))
            assert curve.std[point] == pytest.approx(np.std(values, ddof=1))


def test_plot_label_fraction_sweep(
    runner: CliRunner, fractions: tuple[Plan, StageStore], tmp_path: Path
) -> None:
    plan, store = fractions
    result = runner.invoke(app, ["plot", str(store.root)])
    assert result.exit_code == 0, result.stderr
    plots = store.root / "plots"
    stems = ["dice_vs_label_fraction__test_dice_pooled_mean", "loss_curves", "val_dice_curves"]
    names = [f"{stem}.{kind}" for stem in stems for kind in ("png", "pdf")]
    assert sorted(p.name for p in plots.iterdir()) == sorted(names)  # no heatmap: one axis varies
    assert result.stdout.split() == [str(plots / n) for n in names]  # in the order written
    for stem in stems:
        assert_png(plots / f"{stem}.png")
        assert_pdf(plots / f"{stem}.pdf")
    assert (store.root / "tables" / "trials.parquet").is_file()  # collected on the way

    other = tmp_path / "figures"
    result = runner.invoke(
        app, ["plot", str(store.root), "--metric", "test_dice_volume_mean", "--out", str(other)]
    )
    assert result.exit_code == 0, result.stderr
    assert_png(other / "dice_vs_label_fraction__test_dice_volume_mean.png")


def test_heatmap_cells_of_a_two_axis_ablation(ablation: tuple[Plan, StageStore]) -> None:
    plan, store = ablation
    grids = heatmap_grids(collect(plan, store).trials, "test_dice_pooled_mean")
    assert [g.file_name for g in grids] == [
        "heatmap__stages.local.temperature_x_stages.local.block_size__label_fraction_0.1.png",
        "heatmap__stages.local.temperature_x_stages.local.block_size__label_fraction_0.2.png",
    ]
    grid = grids[1]
    assert grid.row_values == [0.05, 0.1, 0.5] and grid.col_values == [4, 8, 16]
    values = [
        ablation_dice(t)
        for t in plan.trials
        if t.params["stages.local.temperature"] == 0.5
        and t.params["stages.local.block_size"] == 4
        and t.label_fraction == 0.2
    ]
    mean, std, n = grid.cells[2, 0]
    assert n == 2 and mean == pytest.approx(np.mean(values))
    assert std == pytest.approx(np.std(values, ddof=1))
    assert np.nanargmax(grid.cells[..., 0]) == 1 * 3 + 1  # the peak: temperature 0.1, block 8


def test_plot_writes_heatmaps_for_an_ablation(
    runner: CliRunner, ablation: tuple[Plan, StageStore]
) -> None:
    plan, store = ablation
    result = runner.invoke(app, ["plot", str(store.root)])
    assert result.exit_code == 0, result.stderr
    written = [Path(line) for line in result.stdout.split()]
    heatmaps = sorted(p.name for p in written if p.name.startswith("heatmap__"))
    stem = "heatmap__stages.local.temperature_x_stages.local.block_size__label_fraction_"
    assert heatmaps == [f"{stem}{f}.{kind}" for f in ("0.1", "0.2") for kind in ("pdf", "png")]
    assert [p.suffix for p in written] == [".png", ".pdf"] * (len(written) // 2)
    for png, pdf in zip(written[::2], written[1::2], strict=True):
        assert png.parent == store.root / "plots" and pdf == png.with_suffix(".pdf")
        assert_png(png)
        assert pdf.read_bytes().startswith(b"%PDF-")


def test_failed_trials_stay_out_of_the_figures(fractions: tuple[Plan, StageStore]) -> None:
    plan, store = fractions
    trials = collect(plan, store).trials
    broken = trials.copy()
    target = (broken["method"] == "global") & (broken["label_fraction"] == 0.1)
    broken.loc[target & (broken["seed"] == 0), "status"] = "failed"
    broken.loc[target & (broken["seed"] == 0), "test_dice_pooled_mean"] = 0.0
    curve = next(
        c for c in fraction_curves(broken, "test_dice_pooled_mean") if c.config == ("global",)
    )
    assert curve.n.tolist() == [3, 2, 3]
    kept = [
        fraction_dice(t)
        for t in plan.trials
        if t.method == "global" and t.label_fraction == 0.1 and t.seed
    ]
    assert curve.mean[1] == pytest.approx(np.mean(kept))


def one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("semicon-sweep: error: "), stderr
    return lines[0]


def test_plot_exits_2_without_a_sweep_or_results(runner: CliRunner, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["plot", str(empty)])
    assert result.exit_code == 2
    assert "no sweep.json" in one_error_line(result.stderr)
    assert list(empty.iterdir()) == []

    spec = spec_of(tmp_path, FRACTION_SPEC, storage="launched")
    StageStore(spec.storage).claim_sweep(spec, plan=build_plan(spec))  # launched, nothing done
    result = runner.invoke(app, ["plot", spec.storage])
    assert result.exit_code == 2
    assert "no results to plot yet (27 trials: pending 27)" in one_error_line(result.stderr)
    assert [p.name for p in Path(spec.storage).iterdir()] == ["sweep.json"]  # nothing written


def test_plot_rejects_an_unknown_metric(
    runner: CliRunner, fractions: tuple[Plan, StageStore]
) -> None:
    plan, store = fractions
    result = runner.invoke(app, ["plot", str(store.root), "--metric", "test_hd95"])
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "--metric 'test_hd95'" in line and "test_dice_pooled_mean" in line
    result = runner.invoke(app, ["plot", str(store.root), "--metric", "ext_dice_pooled_mean"])
    assert result.exit_code == 2
    assert "external.parquet" in one_error_line(result.stderr)


def test_plot_sweep_without_finished_trials_raises() -> None:
    trials = pd.DataFrame({"trial_id": ["t0"], "method": ["random"], "status": ["failed"]})
    epochs = pd.DataFrame(columns=["key", "stage", "epoch", "loss"])
    with pytest.raises(PlotError, match="no results to plot yet"):
        plot_sweep(trials, epochs, "unused")


def test_a_node_validated_once_is_a_marker_on_a_sensible_axis() -> None:
    """One fine-tuning node, one validation record (step 40): a visible marker, an x axis from
    0 past 40 rather than a sliver around it, and a legend entry that is a marker, not a line."""
    epochs = pd.DataFrame(
        {
            "sweep": ["s", "s"],
            "key": ["k1", "k1"],
            "stage": ["finetune", "finetune"],
            "epoch": [4, 5],
            "steps": [32, 40],
            "loss": [0.6, 0.5],
            "val_dice_mean": [math.nan, 0.61],  # validated on the last epoch only
        }
    )
    trials = pd.DataFrame(
        {"trial_id": ["t0"], "method": ["random"], "status": ["ok"], "key_finetune": ["k1"]}
    )
    figure = val_dice_figure(epochs, trials)
    assert figure is not None
    ax = figure.axes[0]
    (line,) = ax.get_lines()
    assert line.get_xdata().tolist() == [40] and line.get_ydata().tolist() == [0.61]
    assert line.get_marker() == "o" and line.get_markersize() >= 4
    low, high = ax.get_xlim()
    assert low <= 0 and 45 <= high <= 60
    assert ax.get_xlabel() == "optimiser steps"
    assert ax.get_ylim()[0] < 0.61 < ax.get_ylim()[1]
    (handle,) = ax.get_legend().legend_handles
    assert handle.get_marker() == "o" and handle.get_linestyle() == "None"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["random init"]


def test_curves_with_many_points_keep_lines_in_the_legend() -> None:
    epochs = pd.DataFrame(
        {
            "key": ["k1"] * 3,
            "stage": ["finetune"] * 3,
            "epoch": [1, 2, 3],
            "steps": [8, 16, 24],
            "loss": [0.7, 0.6, 0.5],
            "val_dice_mean": [0.4, 0.5, 0.6],
        }
    )
    trials = pd.DataFrame(
        {"trial_id": ["t0"], "method": ["random"], "status": ["ok"], "key_finetune": ["k1"]}
    )
    ax = val_dice_figure(epochs, trials).axes[0]
    (line,) = ax.get_lines()
    assert line.get_marker() in (None, "None", "")
    assert ax.get_xlim()[0] > 0  # autoscaled around 8..24, not stretched to 0
    (handle,) = ax.get_legend().legend_handles
    assert handle.get_linestyle() == "-" and handle.get_marker() in (None, "None", "")
