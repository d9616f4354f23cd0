"""Figures of a finished sweep, each a PNG and a vector PDF (``semicon-sweep plot``).

From the sweep's result tables (``orchestrator.tables``; the external table of
``orchestrator.evaluate`` for ``ext_*`` metrics):

1. ``dice_vs_label_fraction__<metric>.png``: the metric against the labelled fraction, one line
   per method (and per value of any other grid axis that varies), each point the mean over
   seeds and splits with error bars of one sample standard deviation (ddof = 1; none for a
   single run). The x axis is the percentage of training volumes that carry labels, on a log
   scale when the fractions span a factor of 3 or more (5 / 10 / 20 % sit evenly spaced).
2. ``heatmap__<A>_x_<B>__label_fraction_<f>[__<axis>_<value>...].png``: for a two-axis ablation
   (two grid axes besides seed, split and label fraction with more than one value each, e.g.
   ``stages.local.temperature`` x ``stages.local.block_size``), the mean metric of every cell,
   annotated with mean and std, one figure per label fraction (and per value of any further
   varying axis).
3. ``loss_curves.png``: per-epoch training loss of every stage node, one panel per stage,
   coloured by the methods that use the node; ``val_dice_curves.png``: the fine-tuning nodes'
   per-epoch validation Dice, when recorded.

Only ok trials enter (1) and (2). The modules follow the figures: ``style`` (display names,
table helpers, colours, writing a figure), ``results`` ((1), (2) and the paired-difference forest
plot of ``--baseline``), ``curves`` ((3)); this module draws them all (``plot_sweep``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from orchestrator.plot.curves import plot_loss_curves, plot_val_dice_curves
from orchestrator.plot.results import plot_heatmaps, plot_label_fraction, plot_paired
from orchestrator.plot.style import ok_rows, varying_axes
from orchestrator.stats import paired_differences


class PlotError(ValueError):
    """Nothing to plot, or an unknown metric; the message names the table or column."""


def plot_sweep(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    metric: str = "test_dice_pooled_mean",
    baseline: str | None = None,
) -> list[Path]:
    """Write every figure the tables support into ``out_dir``, each as PNG and as vector PDF
    next to it; returns their paths (each figure's PNG, then its PDF).

    With ``baseline``, also the paired differences of every method to it (``plot_paired``);
    ``ValueError`` when the baseline has no finished trial.

    Raises ``PlotError`` when there is nothing to plot (no ok trial with a value of ``metric``
    and no recorded epoch) or when ``metric`` is not a column of ``trials`` though trials
    finished.
    """
    out = Path(out_dir)
    has_epochs = not epochs.empty and "loss" in epochs.columns and epochs["loss"].notna().any()
    finished = "status" in trials.columns and (trials["status"] == "ok").any()
    if not finished and not has_epochs:
        counts = trials["status"].value_counts().to_dict() if "status" in trials.columns else {}
        state = ", ".join(f"{k} {v}" for k, v in counts.items()) or "no trials"
        raise PlotError(f"no results to plot yet ({len(trials)} trials: {state})")
    if finished and metric not in trials.columns:
        available = ", ".join(c for c in trials.columns if c.startswith(("test_", "val_", "ext_")))
        raise PlotError(
            f"--metric {metric!r}: not a column of the table (available: {available or 'none'})"
        )
    paths = plot_label_fraction(trials, metric, out) + plot_heatmaps(trials, metric, out)
    if baseline is not None:
        axes = varying_axes(ok_rows(trials, metric))
        paths += plot_paired(paired_differences(trials, baseline, metric=metric, axes=axes), out)
    paths += plot_loss_curves(epochs, trials, out) + plot_val_dice_curves(epochs, trials, out)
    if not paths:
        raise PlotError(f"--metric {metric!r}: no finished trial has a value to plot")
    return paths
