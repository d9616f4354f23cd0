"""Per-epoch training curves: every stage node's loss, the fine-tuning nodes' validation Dice;
a node's line is coloured by the methods whose trials use it (nodes are shared between trials).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from orchestrator.plot.style import display_order, palette, save_figure
from orchestrator.tables import METHOD_ORDER
from trainers.methods import display_name
from trainers.registry import STAGE_KINDS, stage_names


def _node_methods(trials: pd.DataFrame) -> dict[str, list[str]]:
    """Stage node key -> the methods (paper order) of the trials that use it."""
    users: dict[str, set[str]] = {}
    for stage in stage_names():
        column = f"key_{stage}"
        if column not in trials.columns:
            continue
        for key, method in zip(trials[column], trials["method"], strict=True):
            if isinstance(key, str):
                users.setdefault(key, set()).add(method)
    return {key: display_order(list(methods), "method") for key, methods in users.items()}


def _users_label(methods: list[str]) -> str:
    if not methods:
        return "(no trial)"
    if len(methods) > 3:
        return f"shared by {len(methods)} methods"
    return ", ".join(display_name(m) for m in methods)


@dataclass(frozen=True)
class _UserColours:
    """One colour per distinct set of methods using a node (legend label -> colour)."""

    of_key: dict[str, str]  # node key -> label
    labels: list[str]  # in legend order
    colours: dict[str, tuple[float, float, float]]

    def colour(self, key: str) -> tuple[float, float, float]:
        return self.colours[self.of_key[key]]

    def legend(self, drawn: Drawn) -> tuple[list[Line2D], list[str]]:
        """Handles and labels in the style each group was drawn in (a line, a line with
        markers, or markers alone for groups of lone points); when a group was averaged, two
        grey entries explain thin and thick lines."""
        handles = [
            _handle(self.colours[t], t in drawn.lines, t in drawn.markers, 2.0, 5.0)
            for t in self.labels
        ]
        labels = list(self.labels)
        if drawn.averaged:
            lines = any(t in drawn.lines for t in drawn.averaged)
            markers = any(t in drawn.markers for t in drawn.averaged)
            handles += [
                _handle("0.45", lines, markers, 0.8, 3.0, alpha=0.5),
                _handle("0.45", lines, markers, 2.4, 6.0),
            ]
            labels += ["one node", f"mean over nodes (groups of > {_AVERAGE_ABOVE})"]
        return handles, labels


def _handle(
    colour: Any, line: bool, marker: bool, width: float, size: float, alpha: float = 1.0
) -> Line2D:
    """A legend entry: a line, a line with a marker, or (no line) a marker alone."""
    return Line2D(
        [],
        [],
        color=colour,
        alpha=alpha,
        linewidth=width,
        linestyle="-" if line else "none",
        marker="o" if marker or not line else None,
        markersize=size,
    )


@dataclass
class Drawn:
    """How each colour group (legend label) was drawn, gathered over a figure's panels:
    ``lines`` had a curve of two or more points, ``markers`` had one drawn with markers (two
    points or fewer), ``averaged`` also got a mean curve."""

    lines: set[str] = field(default_factory=set)
    markers: set[str] = field(default_factory=set)
    averaged: set[str] = field(default_factory=set)


_AVERAGE_ABOVE = 3  # a colour group with more nodes than this also gets its mean curve


def _draw_curves(
    ax: Any, records: pd.DataFrame, column: str, colours: _UserColours, drawn: Drawn
) -> None:
    """``column`` of every node in ``records`` (columns key, epoch, ``column``, and ``steps``
    where recorded) on ``ax`` against optimiser steps (epochs for nodes recorded before steps
    were), coloured by users; what was drawn is added to ``drawn`` (for the legend).

    Curves of two points or fewer get markers (a node validated once is one marker); when all
    points share one x value the axis runs from 0 to a little past it, not a sliver around it.
    A group of more than ``_AVERAGE_ABOVE`` nodes is drawn as thin translucent lines plus a
    thick mean line (the nodes' curves interpolated onto the union of their x values, averaged
    where all of them are defined)."""
    x = "steps" if "steps" in records.columns and records["steps"].notna().all() else "epoch"
    groups: dict[str, list[str]] = {}
    for key in dict.fromkeys(records["key"]):
        groups.setdefault(colours.of_key[key], []).append(key)
    for label in colours.labels:
        keys = groups.get(label, [])
        many = len(keys) > _AVERAGE_ABOVE
        curves = []
        for key in keys:
            curve = records[records["key"] == key].sort_values(x)
            curves.append(curve)
            _plot_curve(ax, curve[x], curve[column], colours.colours[label], label, drawn, many)
        if many:
            grid = np.unique(np.concatenate([c[x].to_numpy(dtype=float) for c in curves]))
            low = max(float(c[x].min()) for c in curves)
            high = min(float(c[x].max()) for c in curves)
            grid = grid[(grid >= low) & (grid <= high)]
            if grid.size:
                stacked = [
                    np.interp(grid, c[x].to_numpy(dtype=float), c[column].to_numpy(dtype=float))
                    for c in curves
                ]
                mean = np.mean(stacked, axis=0)
                _plot_curve(ax, grid, mean, colours.colours[label], label, drawn, mean=True)
                drawn.averaged.add(label)
    ax.set_xlabel("optimiser steps" if x == "steps" else "epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    distinct = np.unique(records[x].to_numpy(dtype=float))
    if distinct.size == 1:
        only = float(distinct[0])
        ax.set_xlim(min(0.0, only - 1.0), max(1.25 * only, only + 1.0))
    ax.grid(True, alpha=0.3, linewidth=0.6)


def _plot_curve(
    ax: Any,
    x: Any,
    y: Any,
    colour: Any,
    label: str,
    drawn: Drawn,
    faint: bool = False,
    mean: bool = False,
) -> None:
    """One node's curve (``faint`` in an averaged group) or a group's ``mean``; markers when it
    has two points or fewer."""
    points = len(x)
    marked = points <= 2
    width, size = (2.4, 6.0) if mean else (0.8, 3.0) if faint else (1.5, 3.0 if points > 1 else 5.0)
    ax.plot(
        x,
        y,
        color=colour,
        alpha=1.0 if mean else 0.3 if faint else 0.9,
        linewidth=width,
        marker="o" if marked else None,
        markersize=size,
    )
    if points > 1:
        drawn.lines.add(label)
    if marked:
        drawn.markers.add(label)


def _user_colours(keys: pd.Series, users: dict[str, list[str]]) -> _UserColours:
    """Colours for ``keys`` by their users; legend ordered as the paper orders methods."""
    rank = {m: i for i, m in enumerate(METHOD_ORDER)}
    groups = {key: users.get(key, []) for key in dict.fromkeys(keys)}
    of_key = {key: _users_label(methods) for key, methods in groups.items()}
    order = sorted(
        {of_key[k]: tuple(rank.get(m, len(rank)) for m in groups[k]) for k in groups}.items(),
        key=lambda item: (item[1], item[0]),
    )
    labels = [label for label, _ in order]
    return _UserColours(of_key, labels, dict(zip(labels, palette(len(labels)), strict=True)))


def plot_loss_curves(epochs: pd.DataFrame, trials: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``loss_curves.png`` and ``.pdf`` (``loss_figure``); [] without any recorded epoch."""
    figure = loss_figure(epochs, trials)
    return [] if figure is None else save_figure(figure, out_dir / "loss_curves.png")


def loss_figure(epochs: pd.DataFrame, trials: pd.DataFrame) -> Figure | None:
    """Each stage node's per-epoch loss, one panel per stage; lines coloured by the methods
    whose trials use the node. None without any recorded epoch."""
    if epochs.empty or "loss" not in epochs.columns:
        return None
    records = epochs.assign(loss=pd.to_numeric(epochs["loss"], errors="coerce"))
    records = records[np.isfinite(records["loss"]) & records["epoch"].notna()]
    stages = [s for s in stage_names() if (records["stage"] == s).any()]
    if not stages:
        return None
    colours = _user_colours(records["key"], _node_methods(trials))

    figure = Figure(figsize=(3.9 * len(stages) + 0.4, 3.6), layout="constrained")
    axes = figure.subplots(1, len(stages), squeeze=False)[0]
    drawn = Drawn()
    for ax, stage in zip(axes, stages, strict=True):
        nodes = records[records["stage"] == stage]
        _draw_curves(ax, nodes, "loss", colours, drawn)
        title, loss = STAGE_KINDS[stage].title, STAGE_KINDS[stage].loss_label
        count = nodes["key"].nunique()
        ax.set_title(f"{title} ({count} node{'s' if count != 1 else ''})", fontsize=10)
        ax.set_ylabel(f"{loss} (training)")
    figure.suptitle("training loss per epoch of every stage node", fontsize=11)
    handles, labels = colours.legend(drawn)
    figure.legend(
        handles,
        labels,
        loc="outside lower center",
        ncol=min(len(labels), 4),
        frameon=False,
        fontsize=9,
        title="nodes used by",
        title_fontsize=9,
    )
    return figure


def plot_val_dice_curves(epochs: pd.DataFrame, trials: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``val_dice_curves.png`` and ``.pdf`` (``val_dice_figure``); [] when no fine-tuning epoch
    recorded a validation."""
    figure = val_dice_figure(epochs, trials)
    return [] if figure is None else save_figure(figure, out_dir / "val_dice_curves.png")


def val_dice_figure(epochs: pd.DataFrame, trials: pd.DataFrame) -> Figure | None:
    """Each fine-tuning node's validation Dice (per-volume mean) over training, coloured by
    method: one panel for the mean of the classes and, where recorded, one per class
    (``val_dice_c<k>``). None when no fine-tuning epoch recorded a validation."""
    if epochs.empty or "val_dice_mean" not in epochs.columns:
        return None
    finetune = epochs[epochs["stage"] == "finetune"]
    classes = sorted(
        (c for c in finetune.columns if re.fullmatch(r"val_dice_c\d+", c)),
        key=lambda c: int(c.removeprefix("val_dice_c")),
    )
    panels = [("val_dice_mean", "mean of classes")]
    panels += [(c, f"class {c.removeprefix('val_dice_c')}") for c in classes]
    records = finetune.assign(**{c: pd.to_numeric(finetune[c], errors="coerce") for c, _ in panels})
    records = records[np.isfinite(records["val_dice_mean"]) & records["epoch"].notna()]
    if records.empty:
        return None
    colours = _user_colours(records["key"], _node_methods(trials))
    figure = Figure(figsize=(3.6 * len(panels) + 2.0, 3.8), layout="constrained")
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    drawn = Drawn()
    for ax, (column, title) in zip(axes, panels, strict=True):
        _draw_curves(ax, records[np.isfinite(records[column])], column, colours, drawn)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("validation Dice (per-volume mean)")
    count = records["key"].nunique()
    figure.suptitle(f"fine-tuning: validation Dice over training ({count} nodes)", fontsize=11)
    axes[-1].legend(
        *colours.legend(drawn),
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        fontsize=9,
        title="method",
        title_fontsize=9,
        alignment="left",
    )
    return figure
