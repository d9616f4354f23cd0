"""Figures of a finished sweep, as PNG files a paper can use (``semicon-sweep plot``).

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

Only ok trials enter (1) and (2). Figures are drawn on ``matplotlib.figure.Figure`` objects
with the Agg canvas (no pyplot, no global state) and written atomically.

Display names live in one place: ``METHOD_NAMES`` (registry name -> the paper's wording) and
``AXIS_NAMES`` (grid axis -> axis label).
"""

from __future__ import annotations

import io
import itertools
import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator, NullLocator

from orchestrator.stats import PAIRED_COLUMNS, paired_differences
from orchestrator.store import atomic_write
from orchestrator.tables import METHOD_ORDER
from trainers.registry import STAGE_KINDS, stage_names

DPI = 200
# registry name -> the paper's name for the method (Table 1 of Hu et al.) or ours
METHOD_NAMES: dict[str, str] = {
    "random": "random init",
    "global": "global (SimCLR)",
    "global+local_self": "global+local(self)",
    "local_stride": "local(stride)",
    "local_block": "local(block)",
    "local_full": "local(full)",
    "global+local_stride": "global+local(stride)",
    "global+local_block": "global+local(block)",
    "global+local_full": "global+local(full)",
    "mixup": "Mixup",
    "mean_teacher": "Mean Teacher",
}
# grid axis -> (axis label, short name for legends)
AXIS_NAMES: dict[str, tuple[str, str]] = {
    "method": ("method", "method"),
    "label_fraction": ("labelled training volumes (%)", "labels"),
    "stages.local.temperature": ("local loss temperature τ", "τ"),
    "stages.local.block_size": ("block size (pixels)", "block"),
    "stages.local.stride": ("stride (pixels)", "stride"),
    "stages.local.form": ("local loss form", "form"),
    "stages.global.temperature": ("global loss temperature τ", "τ_global"),
    "stages.global.batch_size": ("global batch size (slices)", "batch"),
    "stages.finetune.lr": ("fine-tuning learning rate", "lr"),
    "dataset.image_size": ("image size (pixels)", "size"),
}
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


class PlotError(ValueError):
    """Nothing to plot, or an unknown metric; the message names the table or column."""


# ---- names -------------------------------------------------------------------------------


def method_name(method: str) -> str:
    """The paper's name of a registered method (the registry name when it has none)."""
    return METHOD_NAMES.get(method, method)


def axis_label(axis: str) -> str:
    """Axis label of a grid axis: ``stages.local.block_size`` -> ``block size (pixels)``."""
    if axis in AXIS_NAMES:
        return AXIS_NAMES[axis][0]
    parts = axis.split(".")
    section = parts[-2] if len(parts) > 1 else ""
    return f"{section} {parts[-1].replace('_', ' ')}".strip()


def _axis_short(axis: str) -> str:
    return AXIS_NAMES[axis][1] if axis in AXIS_NAMES else axis.split(".")[-1]


def metric_label(metric: str, wrap: bool = False) -> str:
    """``test_dice_pooled_mean`` -> ``test Dice (pooled over volumes, mean of classes)``; with
    ``wrap`` the parenthesis goes on a second line (for short colour bars)."""
    where = {"test": "test", "val": "validation", "ext": "external test"}
    match = re.fullmatch(r"(test|val|ext)_dice_(pooled|volume)_(mean|c(\d+))", metric)
    if match is None:
        return metric
    source, aggregate, what, klass = match.groups()
    pooled = "pooled over volumes" if aggregate == "pooled" else "mean over volumes"
    classes = "mean of classes" if what == "mean" else f"class {klass}"
    return f"{where[source]} Dice{chr(10) if wrap else ' '}({pooled}, {classes})"


def _value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _file_part(text: str) -> str:
    """A file-name-safe rendering of an axis name or value."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "-", text).strip("-") or "none"


# ---- table helpers -------------------------------------------------------------------------


def _ok_rows(trials: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Ok trials with a finite value of ``metric`` (as float), or an empty frame."""
    if metric not in trials.columns or "status" not in trials.columns:
        return trials.iloc[0:0]
    values = pd.to_numeric(trials[metric], errors="coerce")
    ok = trials[(trials["status"] == "ok") & np.isfinite(values)].copy()
    ok[metric] = values[ok.index].astype(float)
    return ok


def _varying_axes(ok: pd.DataFrame) -> list[str]:
    """Dotted grid-axis columns with more than one value among ``ok``, in table order."""
    return [c for c in ok.columns if "." in c and ok[c].astype(str).nunique() > 1]


def _order(values: Sequence[Any], axis: str) -> list[Any]:
    """Distinct values in display order: methods as in the paper, numbers ascending."""
    distinct = list(dict.fromkeys(values))
    if axis == "method":
        return sorted(
            distinct,
            key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m),
        )
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in distinct)
    return sorted(distinct) if numeric else sorted(distinct, key=str)


def _stats(values: pd.Series) -> tuple[float, float, int]:
    """(mean, sample std (NaN for one value), n)."""
    n = int(values.count())
    std = float(values.std(ddof=1)) if n > 1 else math.nan
    return float(values.mean()), std, n


def _runs_note(counts: np.ndarray, unit: str) -> str:
    """What a value is the mean of: ``mean ± std over seeds and splits (n = 2–4 runs per cell)``."""
    low, high = int(counts.min()), int(counts.max())
    if high == 1:
        return f"one run per {unit} (no std)"
    runs = f"{low}" if low == high else f"{low}–{high}"
    return f"mean ± std over seeds and splits (n = {runs} runs per {unit})"


def _save(figure: Figure, path: Path) -> Path:
    """Render ``figure`` as PNG and write it atomically to ``path``."""
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08)
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def _colours(count: int) -> list[tuple[float, float, float]]:
    from matplotlib import colormaps

    palette = colormaps["tab10" if count <= 10 else "tab20"]
    return [to_rgb(palette(i % palette.N)) for i in range(count)]


# ---- (1) Dice vs label fraction -----------------------------------------------------------


@dataclass(frozen=True)
class Curve:
    """One line of the label-fraction figure: a method (plus values of other varying axes).

    ``percent`` (P,) labelled fractions in %, ascending; ``mean``, ``std`` (sample std, NaN for
    one run) and ``n`` (P,) of the metric over the ok trials (seeds, splits) at each fraction.
    """

    label: str
    config: tuple[Any, ...]
    percent: np.ndarray
    mean: np.ndarray
    std: np.ndarray
    n: np.ndarray


def fraction_curves(trials: pd.DataFrame, metric: str) -> list[Curve]:
    """The label-fraction figure's lines: one per method and value combination of the other
    varying dotted grid axes, in the paper's method order; [] when no ok trial has ``metric``.

    Labels name the method (the paper's name) and the other axes' values (``τ=0.1, block=8``);
    the method is left out when all curves share it (the legend's title then names it).
    """
    ok = _ok_rows(trials, metric)
    if ok.empty:
        return []
    extra = _varying_axes(ok)
    keys = ["method", *extra]
    orders = {k: _order(ok[k].tolist(), k) for k in keys}
    configs = sorted(
        {tuple(row) for row in ok[keys].itertuples(index=False, name=None)},
        key=lambda c: tuple(orders[k].index(v) for k, v in zip(keys, c, strict=True)),
    )
    curves = []
    for config in configs:
        rows = ok[np.logical_and.reduce([ok[k] == v for k, v in zip(keys, config, strict=True)])]
        points = [
            (100.0 * f, *_stats(rows[rows["label_fraction"] == f][metric]))
            for f in _order(rows["label_fraction"].tolist(), "label_fraction")
        ]
        percent, mean, std, n = (np.array(column) for column in zip(*points, strict=True))
        settings = [f"{_axis_short(a)}={_value(v)}" for a, v in zip(extra, config[1:], strict=True)]
        if len(orders["method"]) > 1 or not settings:
            settings.insert(0, method_name(config[0]))
        label = ", ".join(settings)
        curves.append(Curve(label, config, percent, mean, std, n.astype(int)))
    return curves


def plot_label_fraction(trials: pd.DataFrame, metric: str, out_dir: Path) -> Path | None:
    """``dice_vs_label_fraction__<metric>.png``; None when no ok trial has the metric."""
    curves = fraction_curves(trials, metric)
    if not curves:
        return None
    percent = np.unique(np.concatenate([curve.percent for curve in curves]))
    log_x = len(percent) > 1 and percent.max() / percent.min() >= 3

    extra = len(curves[0].config) > 1
    one_method = len({curve.config[0] for curve in curves}) == 1
    figure = Figure(figsize=(6.4 + (1.2 if extra else 0.0), 4.2), layout="constrained")
    ax = figure.add_subplot()
    colours = _colours(len(curves))
    for index, curve in enumerate(curves):
        shift = index - (len(curves) - 1) / 2  # dodge overlapping error bars sideways
        x = curve.percent
        x = x * 1.018**shift if log_x else x + shift * 0.006 * max(percent.max(), 1.0)
        ax.errorbar(
            x,
            curve.mean,
            yerr=np.where(np.isfinite(curve.std), curve.std, 0.0),
            label=curve.label,
            color=colours[index],
            marker=_MARKERS[index % len(_MARKERS)],
            markersize=5,
            linewidth=1.6,
            capsize=3,
            elinewidth=1.0,
        )
    counts = np.concatenate([curve.n for curve in curves])
    if log_x:
        ax.set_xscale("log")
        ax.set_xlim(percent.min() / 1.3, percent.max() * 1.3)
    else:
        span = percent.max() - percent.min() or percent.max()
        ax.set_xlim(percent.min() - 0.12 * span, percent.max() + 0.12 * span)
    ax.set_xticks(percent, [f"{p:g}%" for p in percent])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("labelled training volumes (% of the training split)")
    ax.set_ylabel(metric_label(metric))
    ax.set_title(_runs_note(counts, "point"), fontsize=9)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        fontsize=9,
        title=method_name(curves[0].config[0]) if one_method and extra else "method",
        title_fontsize=9,
        alignment="left",
    )
    return _save(figure, out_dir / f"dice_vs_label_fraction__{_file_part(metric)}.png")


# ---- (2) two-axis heatmaps ---------------------------------------------------------------


def heatmap_pairs(ok: pd.DataFrame) -> list[tuple[str, str]]:
    """The axis pairs to draw: every pair of varying dotted grid axes; with only one such axis,
    (method, axis) when the method varies too; none otherwise."""
    varying = _varying_axes(ok)
    if len(varying) >= 2:
        return list(itertools.combinations(varying, 2))
    if len(varying) == 1 and ok["method"].nunique() > 1:
        return [("method", varying[0])]
    return []


@dataclass(frozen=True)
class Heatmap:
    """One heatmap: ``cells`` (rows, cols, 3) of (mean, sample std, n) of the metric over the
    ok trials with ``rows_axis = row_values[i]``, ``cols_axis = col_values[j]`` and the
    ``context`` values (label fraction and any other varying axis); NaN where no run."""

    rows_axis: str
    row_values: list[Any]
    cols_axis: str
    col_values: list[Any]
    context: dict[str, Any]
    cells: np.ndarray
    methods: tuple[str, ...] = ()  # the methods of the cells' trials (for the title)

    @property
    def file_name(self) -> str:
        """``heatmap__<rows>_x_<cols>__label_fraction_<f>[__<axis>_<value>...].png``."""
        facets = "".join(
            f"__{_file_part(a)}_{_file_part(_value(v))}" for a, v in self.context.items()
        )
        return f"heatmap__{_file_part(self.rows_axis)}_x_{_file_part(self.cols_axis)}{facets}.png"


def heatmap_grids(trials: pd.DataFrame, metric: str) -> list[Heatmap]:
    """One ``Heatmap`` per axis pair (``heatmap_pairs``), label fraction and value of every
    other varying axis (the method included)."""
    ok = _ok_rows(trials, metric)
    if ok.empty:
        return []
    grids = []
    varying = ["method", *_varying_axes(ok)] if ok["method"].nunique() > 1 else _varying_axes(ok)
    for rows_axis, cols_axis in heatmap_pairs(ok):
        row_values = _order(ok[rows_axis].tolist(), rows_axis)
        col_values = _order(ok[cols_axis].tolist(), cols_axis)
        facets = ["label_fraction", *[a for a in varying if a not in (rows_axis, cols_axis)]]
        orders = {a: _order(ok[a].tolist(), a) for a in facets}
        for facet in sorted(
            {tuple(f) for f in ok[facets].itertuples(index=False, name=None)},
            key=lambda f: tuple(orders[a].index(v) for a, v in zip(facets, f, strict=True)),
        ):
            selected = ok[
                np.logical_and.reduce([ok[a] == v for a, v in zip(facets, facet, strict=True)])
            ]
            cells = np.full((len(row_values), len(col_values), 3), np.nan)
            for (i, r), (j, c) in itertools.product(enumerate(row_values), enumerate(col_values)):
                values = selected[(selected[rows_axis] == r) & (selected[cols_axis] == c)][metric]
                if len(values):
                    cells[i, j] = _stats(values)
            context = dict(zip(facets, facet, strict=True))
            methods = tuple(_order(selected["method"].tolist(), "method"))
            grids.append(
                Heatmap(rows_axis, row_values, cols_axis, col_values, context, cells, methods)
            )
    return grids


def plot_heatmaps(trials: pd.DataFrame, metric: str, out_dir: Path) -> list[Path]:
    """Draw every ``heatmap_grids`` heatmap into ``out_dir``; returns the paths."""
    return [
        _draw_heatmap(grid, metric, out_dir / grid.file_name)
        for grid in heatmap_grids(trials, metric)
    ]


def _draw_heatmap(grid: Heatmap, metric: str, path: Path) -> Path:
    """``grid`` as an annotated heatmap: mean and std in every cell, a labelled colour bar."""
    cells, context = grid.cells, grid.context
    rows_axis, row_values, cols_axis, col_values = (
        grid.rows_axis,
        grid.row_values,
        grid.cols_axis,
        grid.col_values,
    )
    means = np.ma.masked_invalid(cells[..., 0])
    n_rows, n_cols = means.shape
    figure = Figure(
        figsize=(max(5.0, 1.05 * n_cols + 2.6), max(3.4, 0.72 * n_rows + 1.9)),
        layout="constrained",
    )
    ax = figure.add_subplot()
    from matplotlib import colormaps

    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    image = ax.imshow(means, cmap=cmap, aspect="auto", origin="upper")
    colourbar = figure.colorbar(image, ax=ax, shrink=0.9)
    colourbar.set_label(metric_label(metric, wrap=True), fontsize=9)
    colourbar.ax.tick_params(labelsize=8)
    size = 9 if max(n_rows, n_cols) <= 5 else 7
    for i, j in itertools.product(range(n_rows), range(n_cols)):
        mean, std, n = cells[i, j]
        if not np.isfinite(mean):
            ax.text(j, i, "no result", ha="center", va="center", fontsize=size - 1, color="0.3")
            continue
        text = f"{mean:.3f}" + (f"\n± {std:.3f}" if np.isfinite(std) else "")
        red, green, blue = to_rgb(image.cmap(image.norm(mean)))
        luminance = 0.299 * red + 0.587 * green + 0.114 * blue
        ax.text(
            j,
            i,
            text,
            ha="center",
            va="center",
            fontsize=size,
            color="black" if luminance > 0.5 else "white",
            linespacing=1.15,
        )
    label = method_name if cols_axis == "method" else _value
    ax.set_xticks(range(n_cols), [label(v) for v in col_values], fontsize=9)
    label = method_name if rows_axis == "method" else _value
    ax.set_yticks(range(n_rows), [label(v) for v in row_values], fontsize=9)
    if cols_axis == "method":
        ax.tick_params(axis="x", labelrotation=20)
    ax.set_xlabel(axis_label(cols_axis))
    ax.set_ylabel(axis_label(rows_axis))
    ax.tick_params(length=0)
    counts = cells[..., 2][np.isfinite(cells[..., 0])].astype(int)
    where = (
        []
        if "method" in (rows_axis, cols_axis, *context)
        else [", ".join(map(method_name, grid.methods))]
    )
    where += [f"{100 * context['label_fraction']:g}% labelled volumes"]
    where += [
        method_name(v) if a == "method" else f"{axis_label(a)} = {_value(v)}"
        for a, v in context.items()
        if a != "label_fraction"
    ]
    ax.set_title(f"{', '.join(where)}\n{_runs_note(counts, 'cell')}", fontsize=9)
    return _save(figure, path)


# ---- (3) per-epoch curves ----------------------------------------------------------------


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
    return {key: _order(list(methods), "method") for key, methods in users.items()}


def _users_label(methods: list[str]) -> str:
    if not methods:
        return "(no trial)"
    if len(methods) > 3:
        return f"shared by {len(methods)} methods"
    return ", ".join(method_name(m) for m in methods)


@dataclass(frozen=True)
class _UserColours:
    """One colour per distinct set of methods using a node (legend label -> colour)."""

    of_key: dict[str, str]  # node key -> label
    labels: list[str]  # in legend order
    colours: dict[str, tuple[float, float, float]]

    def colour(self, key: str) -> tuple[float, float, float]:
        return self.colours[self.of_key[key]]

    def legend(self, averaged: bool = False) -> tuple[list[Line2D], list[str]]:
        """Handles and labels; with ``averaged``, two grey entries explain thin and thick lines."""
        handles = [Line2D([], [], color=self.colours[t], linewidth=2) for t in self.labels]
        labels = list(self.labels)
        if averaged:
            handles += [
                Line2D([], [], color="0.45", linewidth=0.8, alpha=0.5),
                Line2D([], [], color="0.45", linewidth=2.4),
            ]
            labels += ["one node", f"mean over nodes (groups of > {_AVERAGE_ABOVE})"]
        return handles, labels


_AVERAGE_ABOVE = 3  # a colour group with more nodes than this also gets its mean curve


def _draw_curves(ax: Any, records: pd.DataFrame, column: str, colours: _UserColours) -> bool:
    """``column`` of every node in ``records`` (columns key, epoch, ``column``, and ``steps``
    where recorded) on ``ax`` against optimiser steps (epochs for nodes recorded before steps
    were), coloured by users. A group of more than ``_AVERAGE_ABOVE`` nodes is drawn as thin
    translucent lines plus a thick mean line (the nodes' curves interpolated onto the union of
    their x values, averaged where all of them are defined); returns whether any group was."""
    x = "steps" if "steps" in records.columns and records["steps"].notna().all() else "epoch"
    groups: dict[str, list[str]] = {}
    for key in dict.fromkeys(records["key"]):
        groups.setdefault(colours.of_key[key], []).append(key)
    averaged = False
    for label in colours.labels:
        keys = groups.get(label, [])
        many = len(keys) > _AVERAGE_ABOVE
        curves = []
        for key in keys:
            curve = records[records["key"] == key].sort_values(x)
            curves.append(curve)
            ax.plot(
                curve[x],
                curve[column],
                color=colours.colours[label],
                alpha=0.3 if many else 0.9,
                linewidth=0.8 if many else 1.5,
                marker="o" if len(curve) <= 2 else None,
                markersize=3,
            )
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
                ax.plot(grid, np.mean(stacked, axis=0), color=colours.colours[label], linewidth=2.4)
                averaged = True
    ax.set_xlabel("optimiser steps" if x == "steps" else "epoch")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3, linewidth=0.6)
    return averaged


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
    return _UserColours(of_key, labels, dict(zip(labels, _colours(len(labels)), strict=True)))


def plot_loss_curves(epochs: pd.DataFrame, trials: pd.DataFrame, out_dir: Path) -> Path | None:
    """``loss_curves.png``: each stage node's per-epoch loss, one panel per stage; lines
    coloured by the methods whose trials use the node. None without any recorded epoch."""
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
    averaged = False
    for ax, stage in zip(axes, stages, strict=True):
        nodes = records[records["stage"] == stage]
        averaged |= _draw_curves(ax, nodes, "loss", colours)
        title, loss = STAGE_KINDS[stage].title, STAGE_KINDS[stage].loss_label
        count = nodes["key"].nunique()
        ax.set_title(f"{title} ({count} node{'s' if count != 1 else ''})", fontsize=10)
        ax.set_ylabel(f"{loss} (training)")
    figure.suptitle("training loss per epoch of every stage node", fontsize=11)
    handles, labels = colours.legend(averaged)
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
    return _save(figure, out_dir / "loss_curves.png")


def plot_val_dice_curves(epochs: pd.DataFrame, trials: pd.DataFrame, out_dir: Path) -> Path | None:
    """``val_dice_curves.png``: each fine-tuning node's validation Dice (per-volume mean) over
    training, coloured by method: one panel for the mean of the classes and, where recorded,
    one per class (``val_dice_c<k>``). None when no fine-tuning epoch recorded a validation."""
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
    averaged = False
    for ax, (column, title) in zip(axes, panels, strict=True):
        averaged |= _draw_curves(ax, records[np.isfinite(records[column])], column, colours)
        ax.set_title(title, fontsize=10)
    axes[0].set_ylabel("validation Dice (per-volume mean)")
    count = records["key"].nunique()
    figure.suptitle(f"fine-tuning: validation Dice over training ({count} nodes)", fontsize=11)
    axes[-1].legend(
        *colours.legend(averaged),
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        fontsize=9,
        title="method",
        title_fontsize=9,
        alignment="left",
    )
    return _save(figure, out_dir / "val_dice_curves.png")


def plot_paired(paired: pd.DataFrame, out_dir: Path) -> Path | None:
    """``paired_differences__<metric>.png``: a forest plot per label fraction of every method's
    mean paired difference to the baseline with its 95 % CI (``orchestrator.stats``), wins/n
    written beside it, a line at zero. None for an empty table."""
    if paired.empty:
        return None
    metric, baseline = str(paired["metric"].iloc[0]), str(paired["baseline"].iloc[0])
    fractions = _order(list(dict.fromkeys(paired["label_fraction"])), "label_fraction")
    extra = [c for c in paired.columns if c not in PAIRED_COLUMNS]
    methods = sorted(
        dict.fromkeys(paired["method"]),
        key=lambda m: (METHOD_ORDER.index(m) if m in METHOD_ORDER else len(METHOD_ORDER), m),
    )
    rows = [(m, *rest) for m in methods for rest in _extra_values(paired, m, extra)]
    figure = Figure(
        figsize=(3.2 * len(fractions) + 2.6, 0.42 * len(rows) + 1.6), layout="constrained"
    )
    axes = figure.subplots(1, len(fractions), squeeze=False, sharey=True)[0]
    for ax, fraction in zip(axes, fractions, strict=True):
        cell = paired[paired["label_fraction"] == fraction]
        for y, row in enumerate(rows):
            match = cell[cell["method"] == row[0]]
            for axis, value in zip(extra, row[1:], strict=True):
                match = match[match[axis].map(_value) == _value(value)]
            if match.empty:
                continue
            r = match.iloc[0]
            has_ci = math.isfinite(r["ci95_low"])
            xerr = [[r["delta_mean"] - r["ci95_low"]], [r["ci95_high"] - r["delta_mean"]]]
            ax.errorbar(
                r["delta_mean"], y, xerr=xerr if has_ci else None, fmt="o", color="C0",
                capsize=3, markersize=4,
            )  # fmt: skip
            ax.annotate(
                f"{int(r['wins'])}/{int(r['n'])}", (1.0, y), xycoords=("axes fraction", "data"),
                xytext=(2, 0), textcoords="offset points", va="center", fontsize=7,
            )  # fmt: skip
        ax.axvline(0.0, color="0.3", linewidth=0.8)
        ax.set_title(f"{_value(fraction * 100)} % labelled", fontsize=10)
        ax.set_xlabel(f"Δ {metric_label(metric)}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3, linewidth=0.6)
    labels = [" ".join([method_name(r[0]), *(_value(v) for v in r[1:])]) for r in rows]
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(
        f"paired difference to {method_name(baseline)} (mean, 95 % CI; wins/n at right)",
        fontsize=10,
    )
    return _save(figure, out_dir / f"paired_differences__{_file_part(metric)}.png")


def _extra_values(paired: pd.DataFrame, method: str, extra: list[str]) -> list[tuple[Any, ...]]:
    if not extra:
        return [()]
    rows = paired[paired["method"] == method][extra].map(_value)
    return list(dict.fromkeys(map(tuple, rows.to_numpy().tolist())))


# ---- all ---------------------------------------------------------------------------------


def plot_sweep(
    trials: pd.DataFrame,
    epochs: pd.DataFrame,
    out_dir: str | os.PathLike[str],
    metric: str = "test_dice_pooled_mean",
    baseline: str | None = None,
) -> list[Path]:
    """Write every figure the tables support into ``out_dir``; returns their paths.

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
    paths = []
    if (figure := plot_label_fraction(trials, metric, out)) is not None:
        paths.append(figure)
    paths += plot_heatmaps(trials, metric, out)
    if baseline is not None:
        axes = _varying_axes(_ok_rows(trials, metric))
        paired = paired_differences(trials, baseline, metric=metric, axes=axes)
        if (figure := plot_paired(paired, out)) is not None:
            paths.append(figure)
    for draw in (plot_loss_curves, plot_val_dice_curves):
        if (figure := draw(epochs, trials, out)) is not None:
            paths.append(figure)
    if not paths:
        raise PlotError(f"--metric {metric!r}: no finished trial has a value to plot")
    return paths
