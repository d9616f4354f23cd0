"""The result figures: the test metric against the labelled fraction, two-axis ablation heatmaps,
and the paired-difference forest plot (``plot --baseline``). Only ok trials enter.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from matplotlib.ticker import NullLocator

from orchestrator.plot.style import (
    MARKERS,
    axis_label,
    axis_short,
    display_order,
    file_part,
    mean_std_n,
    metric_label,
    ok_rows,
    palette,
    runs_note,
    save_figure,
    value_text,
    varying_axes,
)
from orchestrator.stats import PAIRED_COLUMNS
from orchestrator.tables import METHOD_ORDER
from trainers.methods import display_name

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
    ok = ok_rows(trials, metric)
    if ok.empty:
        return []
    extra = varying_axes(ok)
    keys = ["method", *extra]
    orders = {k: display_order(ok[k].tolist(), k) for k in keys}
    configs = sorted(
        {tuple(row) for row in ok[keys].itertuples(index=False, name=None)},
        key=lambda c: tuple(orders[k].index(v) for k, v in zip(keys, c, strict=True)),
    )
    curves = []
    for config in configs:
        rows = ok[np.logical_and.reduce([ok[k] == v for k, v in zip(keys, config, strict=True)])]
        points = [
            (100.0 * f, *mean_std_n(rows[rows["label_fraction"] == f][metric]))
            for f in display_order(rows["label_fraction"].tolist(), "label_fraction")
        ]
        percent, mean, std, n = (np.array(column) for column in zip(*points, strict=True))
        settings = [
            f"{axis_short(a)}={value_text(v)}" for a, v in zip(extra, config[1:], strict=True)
        ]
        if len(orders["method"]) > 1 or not settings:
            settings.insert(0, display_name(config[0]))
        label = ", ".join(settings)
        curves.append(Curve(label, config, percent, mean, std, n.astype(int)))
    return curves


def plot_label_fraction(trials: pd.DataFrame, metric: str, out_dir: Path) -> list[Path]:
    """``dice_vs_label_fraction__<metric>.png`` and ``.pdf``; [] when no ok trial has the metric."""
    curves = fraction_curves(trials, metric)
    if not curves:
        return []
    percent = np.unique(np.concatenate([curve.percent for curve in curves]))
    log_x = len(percent) > 1 and percent.max() / percent.min() >= 3

    extra = len(curves[0].config) > 1
    one_method = len({curve.config[0] for curve in curves}) == 1
    figure = Figure(figsize=(6.4 + (1.2 if extra else 0.0), 4.2), layout="constrained")
    ax = figure.add_subplot()
    colours = palette(len(curves))
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
            marker=MARKERS[index % len(MARKERS)],
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
    ax.set_title(runs_note(counts, "point"), fontsize=9)
    ax.grid(True, alpha=0.3, linewidth=0.6)
    ax.legend(
        loc="upper left",
        bbox_to_anchor=(1.02, 1.0),
        frameon=False,
        fontsize=9,
        title=display_name(curves[0].config[0]) if one_method and extra else "method",
        title_fontsize=9,
        alignment="left",
    )
    return save_figure(figure, out_dir / f"dice_vs_label_fraction__{file_part(metric)}.png")


# ---- (2) two-axis heatmaps ---------------------------------------------------------------


def heatmap_pairs(ok: pd.DataFrame) -> list[tuple[str, str]]:
    """The axis pairs to draw: every pair of varying dotted grid axes; with only one such axis,
    (method, axis) when the method varies too; none otherwise."""
    varying = varying_axes(ok)
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
            f"__{file_part(a)}_{file_part(value_text(v))}" for a, v in self.context.items()
        )
        return f"heatmap__{file_part(self.rows_axis)}_x_{file_part(self.cols_axis)}{facets}.png"


def heatmap_grids(trials: pd.DataFrame, metric: str) -> list[Heatmap]:
    """One ``Heatmap`` per axis pair (``heatmap_pairs``), label fraction and value of every
    other varying axis (the method included)."""
    ok = ok_rows(trials, metric)
    if ok.empty:
        return []
    grids = []
    varying = ["method", *varying_axes(ok)] if ok["method"].nunique() > 1 else varying_axes(ok)
    for rows_axis, cols_axis in heatmap_pairs(ok):
        row_values = display_order(ok[rows_axis].tolist(), rows_axis)
        col_values = display_order(ok[cols_axis].tolist(), cols_axis)
        facets = ["label_fraction", *[a for a in varying if a not in (rows_axis, cols_axis)]]
        orders = {a: display_order(ok[a].tolist(), a) for a in facets}
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
                    cells[i, j] = mean_std_n(values)
            context = dict(zip(facets, facet, strict=True))
            methods = tuple(display_order(selected["method"].tolist(), "method"))
            grids.append(
                Heatmap(rows_axis, row_values, cols_axis, col_values, context, cells, methods)
            )
    return grids


def plot_heatmaps(trials: pd.DataFrame, metric: str, out_dir: Path) -> list[Path]:
    """Draw every ``heatmap_grids`` heatmap into ``out_dir``; returns the paths."""
    return [
        path
        for grid in heatmap_grids(trials, metric)
        for path in _draw_heatmap(grid, metric, out_dir / grid.file_name)
    ]


def _draw_heatmap(grid: Heatmap, metric: str, path: Path) -> list[Path]:
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
    label = display_name if cols_axis == "method" else value_text
    ax.set_xticks(range(n_cols), [label(v) for v in col_values], fontsize=9)
    label = display_name if rows_axis == "method" else value_text
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
        else [", ".join(map(display_name, grid.methods))]
    )
    where += [f"{100 * context['label_fraction']:g}% labelled volumes"]
    where += [
        display_name(v) if a == "method" else f"{axis_label(a)} = {value_text(v)}"
        for a, v in context.items()
        if a != "label_fraction"
    ]
    ax.set_title(f"{', '.join(where)}\n{runs_note(counts, 'cell')}", fontsize=9)
    return save_figure(figure, path)


def plot_paired(paired: pd.DataFrame, out_dir: Path) -> list[Path]:
    """``paired_differences__<metric>.png``: a forest plot per label fraction of every method's
    mean paired difference to the baseline with its 95 % CI (``orchestrator.stats``), wins/n
    written beside it, a line at zero (PNG and PDF). [] for an empty table."""
    if paired.empty:
        return []
    metric, baseline = str(paired["metric"].iloc[0]), str(paired["baseline"].iloc[0])
    fractions = display_order(list(dict.fromkeys(paired["label_fraction"])), "label_fraction")
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
                match = match[match[axis].map(value_text) == value_text(value)]
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
        ax.set_title(f"{value_text(fraction * 100)} % labelled", fontsize=10)
        ax.set_xlabel(f"Δ {metric_label(metric)}", fontsize=8)
        ax.grid(True, axis="x", alpha=0.3, linewidth=0.6)
    labels = [" ".join([display_name(r[0]), *(value_text(v) for v in r[1:])]) for r in rows]
    axes[0].set_yticks(range(len(rows)), labels, fontsize=8)
    axes[0].invert_yaxis()
    figure.suptitle(
        f"paired difference to {display_name(baseline)} (mean, 95 % CI; wins/n at right)",
        fontsize=10,
    )
    return save_figure(figure, out_dir / f"paired_differences__{file_part(metric)}.png")


def _extra_values(paired: pd.DataFrame, method: str, extra: list[str]) -> list[tuple[Any, ...]]:
    if not extra:
        return [()]
    rows = paired[paired["method"] == method][extra].map(value_text)
    return list(dict.fromkeys(map(tuple, rows.to_numpy().tolist())))
