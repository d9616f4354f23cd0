"""The paper-style table: a metric's ``"mean ± std (n)"`` over seeds and splits, methods in the
paper's order, cells marked when a run did not converge or collapsed, each column's best mean
marked (highest Dice / surface Dice, lowest HD95: ``better_direction``); the paired
differences to a baseline likewise; either rendered as text, Markdown, LaTeX or CSV."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

import pandas as pd

from orchestrator.stats import PAIRED_COLUMNS, better_direction
from orchestrator.tables.build import _hashable, _sort_key
from trainers.methods import display_name

TABLE_FORMATS = ("text", "md", "latex", "csv")  # format_table's (the CLI's --format choices)
# the paper's order (Table 1), then the baselines it lacks and our additions
METHOD_ORDER = (
    "random",
    "global",
    "global+local_self",
    "local_stride",
    "local_block",
    "global+local_stride",
    "global+local_block",
    "mixup",
    "mean_teacher",
    "local_full",
    "global+local_full",
)
# cell marks of paper_table: mark -> (trials column, the value that earns it)
CELL_MARKS = {"†": ("converged", False), "‡": ("collapsed", True)}
CELL_NOTES = {
    "†": "† holds a run whose validation Dice still rose in its last quarter (not converged)",
    "‡": "‡ holds a run with a class whose test Dice is below 0.05 (collapsed)",
}


def paper_table(
    trials: pd.DataFrame,
    metric: str = "test_dice_pooled_mean",
    rows: str | Sequence[str] = "method",
    cols: str = "label_fraction",
) -> pd.DataFrame:
    """A table of ``"mean ± std (n)"`` strings over the ok trials, as in the paper.

    Rows are ``rows`` (methods in the paper's order) plus every other grid axis that varies
    among the ok trials (never seed or split, which are what the mean is taken over), so no
    two different configurations are pooled into one cell. Columns are the values of ``cols``
    (``cols="method"``: rows by label fraction instead). Cells with one trial read ``"mean (1)"``; missing cells are empty. An empty frame when no
    trial is ok yet.
    """
    finished = "status" in trials.columns and (trials["status"] == "ok").any()
    if metric not in trials.columns and not finished:
        return pd.DataFrame()  # no trial has finished: no metric column yet, nothing to show
    if metric not in trials.columns:
        available = ", ".join(c for c in trials.columns if c.startswith(("test_", "val_")))
        raise ValueError(f"metric {metric!r}: not in the trials table (available: {available})")
    if cols not in trials.columns:
        raise ValueError(
            f"--by {cols!r}: not a column of the trials table (axes: {', '.join(_axes(trials))})"
        )
    row_keys = [rows] if isinstance(rows, str) else list(rows)
    # --by method: the methods become the columns and the label fractions the rows
    row_keys = [k for k in row_keys if k != cols] or ["label_fraction"]
    for key in row_keys:
        if key not in trials.columns:
            raise ValueError(f"rows {key!r}: not a column of the trials table")
    ok = trials[trials["status"] == "ok"]
    extra = [
        axis
        for axis in _axes(trials)
        if axis not in (*row_keys, cols, "seed", "split")
        and ok[axis].map(_hashable).nunique(dropna=False) > 1
    ]
    row_keys += extra
    if ok.empty:
        return pd.DataFrame()
    ok = ok.assign(**{k: ok[k].map(_hashable) for k in [*row_keys, cols]})
    values = pd.to_numeric(ok[metric], errors="coerce")
    groups = [ok[k] for k in [*row_keys, cols]]
    stats = values.groupby(groups, dropna=False).agg(["mean", "std", "count"])
    # a cell holding an unconverged or collapsed run is marked, so nobody reads it as a result
    flags = {
        mark: ok[column]
        .map(lambda v, bad=bad: v is bad or v == bad)
        .groupby(groups, dropna=False)
        .any()
        for mark, (column, bad) in CELL_MARKS.items()
        if column in ok.columns
    }
    cells = stats.apply(lambda s: _cell(s["mean"], s["std"], int(s["count"])), axis=1)
    for mark, flagged in flags.items():
        cells = cells.where(~flagged.reindex(cells.index, fill_value=False), cells + " " + mark)
    table = cells.unstack(cols).fillna("")
    table = table.reindex(columns=sorted(table.columns, key=lambda c: _row_key(c, [cols])))
    table = table.reindex(index=sorted(table.index, key=lambda idx: _row_key(idx, row_keys)))
    means = stats["mean"].unstack(cols).reindex(index=table.index, columns=table.columns)
    table.columns = [_label(c) for c in table.columns]
    table.columns.name = cols
    table.attrs["notes"] = [CELL_NOTES[m] for m, f in flags.items() if f.any()]
    better = better_direction(metric)
    table.attrs["best"] = _best_cells(means, lower=better == "lower") if better else []
    return table


def _best_cells(means: pd.DataFrame, lower: bool = False) -> list[tuple[int, int]]:
    """(row, column) positions of the highest (``lower``: lowest) mean of each column, as shown
    (3 decimals), so cells that read the same are all best; none in a column with one value."""
    best = []
    for j, column in enumerate(means.columns):
        shown = means[column].round(3).to_numpy()
        if (~pd.isna(shown)).sum() < 2:
            continue
        top = pd.Series(shown).min() if lower else pd.Series(shown).max()
        best += [(i, j) for i, value in enumerate(shown) if value == top]
    return best


def paired_table(paired: pd.DataFrame, cols: str = "label_fraction") -> pd.DataFrame:
    """``paired_differences`` as a table of ``"+0.012 [-0.004, +0.028] 2/3"`` cells (mean paired
    difference [95 % CI] wins/n), methods as rows in the paper's order, ``cols`` as columns."""
    if paired.empty:
        return pd.DataFrame()
    row_keys = [c for c in paired.columns if c not in (*PAIRED_COLUMNS[2:], cols)]
    frame = paired.assign(**{k: paired[k].map(_hashable) for k in [*row_keys, cols]})
    cells = frame.apply(_paired_cell, axis=1)
    cells.index = pd.MultiIndex.from_frame(frame[[*row_keys, cols]])
    table = cells.unstack(cols).fillna("")
    table = table.reindex(columns=sorted(table.columns, key=_sort_key))
    table = table.reindex(index=sorted(table.index, key=lambda idx: _row_key(idx, row_keys)))
    table.columns = [_label(c) for c in table.columns]
    table.columns.name = cols
    return table


def _paired_cell(row: pd.Series) -> str:
    text = f"{row['delta_mean']:+.3f}"
    if math.isfinite(row["ci95_low"]):
        text += f" [{row['ci95_low']:+.3f}, {row['ci95_high']:+.3f}]"
    return f"{text} {int(row['wins'])}/{int(row['n'])}"


def format_table(table: pd.DataFrame, fmt: str = "text") -> str:
    """Render a ``paper_table`` as plain text, Markdown, LaTeX (a booktabs tabular: needs
    ``\\usepackage{booktabs}``) or CSV. The cells of ``table.attrs["best"]`` (each column's best
    mean) are bold in Markdown (``**...**``) and LaTeX (``\\textbf{...}``).

    Methods (the ``method`` row level, or the columns with ``--by method``) are shown by their
    display names (``trainers.methods.display_name``); the table itself keeps registry names.
    """
    if fmt not in TABLE_FORMATS:
        raise ValueError(f"format {fmt!r}: must be one of {', '.join(TABLE_FORMATS)}")
    index_names = [n if n is not None else "" for n in table.index.names]
    header = [*index_names, *[_shown(c, table.columns.name) for c in table.columns]]
    if table.columns.name and header:
        header[len(index_names) - 1] = f"{header[len(index_names) - 1]} \\ {table.columns.name}"
    body = []
    for idx, values in table.iterrows():
        idx_values = idx if isinstance(idx, tuple) else (idx,)
        labels = [_shown(v, n) for v, n in zip(idx_values, index_names, strict=True)]
        body.append(labels + [str(v) for v in values])
    if fmt == "csv":
        buffer = io.StringIO()
        pd.DataFrame(body, columns=header).to_csv(buffer, index=False)
        return buffer.getvalue()
    best = {(i, len(index_names) + j) for i, j in table.attrs.get("best", [])}
    if fmt == "md":
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
        lines += [
            "| " + " | ".join(f"**{c}**" if (i, k) in best else c for k, c in enumerate(row)) + " |"
            for i, row in enumerate(body)
        ]
        return "\n".join(lines) + "\n"
    if fmt == "latex":  # booktabs rules (\\usepackage{booktabs})
        spec = "l" * len(index_names) + "c" * len(table.columns)
        lines = [f"\\begin{{tabular}}{{{spec}}}", "\\toprule"]
        lines.append(" & ".join(_latex(h) for h in header) + " \\\\")
        lines.append("\\midrule")
        lines += [
            " & ".join(
                f"\\textbf{{{_latex(c)}}}" if (i, k) in best else _latex(c)
                for k, c in enumerate(row)
            )
            + " \\\\"
            for i, row in enumerate(body)
        ]
        lines += ["\\bottomrule", "\\end{tabular}"]
        return "\n".join(lines) + "\n"
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in body
    ]
    return "\n".join(lines) + "\n"


def comment_prefix(fmt: str) -> str:
    """How a line of prose starts below a table of format ``fmt`` (a comment in LaTeX / CSV)."""
    return {"latex": "% ", "csv": "# "}.get(fmt, "")


def render_table(table: pd.DataFrame, fmt: str = "text") -> str:
    """``format_table`` followed by the table's notes (what its cell marks mean), as the CLI
    prints it (``launch``, ``tabulate``, ``evaluate``)."""
    notes = table.attrs.get("notes", [])
    lead = "\n" if notes and fmt in ("text", "md") else ""
    prefix = comment_prefix(fmt)
    return format_table(table, fmt) + lead + "".join(f"{prefix}{note}\n" for note in notes)


def _axes(trials: pd.DataFrame) -> list[str]:
    """Grid-axis-like columns of a trials table: dotted paths and the named axes."""
    named = ["method", "label_fraction", "seed", "split"]
    return [c for c in trials.columns if "." in c] + [c for c in named if c in trials.columns]


def _cell(mean: float, std: float, count: int) -> str:
    if count == 0 or math.isnan(mean):
        return ""
    if count == 1 or math.isnan(std):
        return f"{mean:.3f} ({count})"
    return f"{mean:.3f} ± {std:.3f} ({count})"


def _row_key(idx: Any, row_keys: Sequence[str]) -> tuple[Any, ...]:
    values = idx if isinstance(idx, tuple) else (idx,)
    out = []
    for key, value in zip(row_keys, values, strict=True):
        if key == "method":
            rank = METHOD_ORDER.index(value) if value in METHOD_ORDER else len(METHOD_ORDER)
            out.append((rank, _sort_key(value)))
        else:
            out.append((0, _sort_key(value)))
    return tuple(out)


def _label(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _shown(value: Any, axis: str | None) -> str:
    """A row or column label as rendered: a method's display name, any other value as text."""
    return display_name(value) if axis == "method" and isinstance(value, str) else _label(value)


_LATEX = {
    "\\": r"\textbackslash{}",
    "&": r"\&",
    "%": r"\%",
    "$": r"\$",
    "#": r"\#",
    "_": r"\_",
    "{": r"\{",
    "}": r"\}",
}


def _latex(text: str) -> str:
    escaped = "".join(_LATEX.get(ch, ch) for ch in text)
    return escaped.replace("±", r"$\pm$").replace("†", r"$^\dagger$").replace("‡", r"$^\ddagger$")
