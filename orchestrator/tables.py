"""Results as tables: collected from the stage store, written as parquet, formatted like the paper.

Schema (stable column names; a later ``tabulate`` can always re-read an old sweep):

``trials``: one row per trial, failed and unfinished ones included.
    ``sweep``, ``trial_id``; one column per grid axis that is a dotted path (e.g.
    ``stages.local.temperature``); ``method``, ``label_fraction``, ``seed``, ``split``;
    ``status``: ``ok`` (every stage complete), ``failed`` (the trial's last stage failed),
    ``skipped`` (an earlier stage it builds on failed, so its last stage never ran) or
    ``pending`` (not finished, no failure recorded); ``error`` (the failure's message, naming
    the stage and node key; None when ok/pending); ``key_global``, ``key_local``,
    ``key_finetune`` (None where the method has no such stage); every final metric of the
    finetune node (``test_dice_pooled_mean``, ``test_dice_volume_mean``, per class
    ``test_dice_pooled_c1`` ..., ``val_*``); ``wall_s_<stage>`` and ``gpu_s_<stage>`` for each
    stage (``wall_s``/``gpu_s`` of the node's ``metrics.json`` when the worker recorded them,
    else the sum of the epochs' ``seconds``/``gpu_s``; NaN when unknown); ``torch_version``,
    ``ray_version``, ``numpy_version``, ``git_commit`` (recorded in ``sweep.json`` at launch);
    ``steps_<stage>`` (optimiser steps the stage ran); ``converged`` (the fine-tuning node's
    validation curve no longer improved in its last quarter, ``orchestrator.stats.converged``;
    None when undecidable), ``val_gain_last_quarter`` (that improvement) and ``collapsed`` (some
    class's pooled test Dice < 0.05).
``epochs``: one row per (node key, epoch): ``sweep``, ``key``, ``stage``, ``epoch``, ``loss``,
    ``val_dice_mean``, ``slices_per_s``, ``seconds`` and whatever else the stage reported. After
    a restart an epoch may have been recorded twice; the last record wins.
``paired`` (written by ``tabulate --baseline``): ``orchestrator.stats.PAIRED_COLUMNS``, one row
    per method and label fraction: mean paired difference to the baseline, 95 % CI, wins / n.
``summary``: ok trials grouped over seed and split by ``method``, ``label_fraction`` and the
    other grid axes: ``n_trials`` and, for each ``test_*`` metric ``m``, ``m_mean``, ``m_std``
    (sample standard deviation, NaN for a single trial) and ``m_n`` (trials with a value).
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import pandas as pd

from orchestrator.plan import Plan, Trial
from orchestrator.progress import clock
from orchestrator.spec import NAMED_AXES
from orchestrator.stats import PAIRED_COLUMNS, collapsed, converged
from orchestrator.store import StageStore, atomic_write, environment_info
from trainers.methods import display_name
from trainers.registry import stage_names

TABLE_NAMES = ("trials", "epochs", "summary")
TABLE_FORMATS = ("text", "md", "latex", "csv")  # format_table's (the CLI's --format choices)
STATUSES = ("ok", "failed", "skipped", "pending")
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
ENVIRONMENT_COLUMNS = ("torch_version", "ray_version", "numpy_version", "git_commit")
EPOCH_COLUMNS = (
    "sweep",
    "key",
    "stage",
    "epoch",
    "loss",
    "val_dice_mean",
    "slices_per_s",
    "seconds",
)
_TIME_KEYS = ("wall_s", "gpu_s")
# cell marks of paper_table: mark -> (trials column, the value that earns it)
CELL_MARKS = {"†": ("converged", False), "‡": ("collapsed", True)}
CELL_NOTES = {
    "†": "† holds a run whose validation Dice still rose in its last quarter (not converged)",
    "‡": "‡ holds a run with a class whose test Dice is below 0.05 (collapsed)",
}


class Tables(NamedTuple):
    """The three result tables of a sweep (also unpacks as ``trials, epochs, summary``)."""

    trials: pd.DataFrame
    epochs: pd.DataFrame
    summary: pd.DataFrame


def node_state(plan: Plan, store: StageStore, key: str) -> str:
    """complete | failed (error recorded) | skipped (an ancestor failed) | started (epochs
    recorded, not finished: running now, or resuming from its checkpoint at the next launch) |
    waiting (on an incomplete parent) | pending (ready to start)."""
    if store.is_complete(key):
        return "complete"
    if store.read_error(key) is not None:
        return "failed"
    parent = plan.nodes[key].parent
    while parent is not None:
        if not store.is_complete(parent) and store.read_error(parent) is not None:
            return "skipped"
        parent = plan.nodes[parent].parent if parent in plan.nodes else None
    folder = store.node_dir(key)
    finished_once = (folder / "COMPLETE").exists() or (folder / "COMPLETE.invalid").exists()
    if store.read_epochs(key) and not finished_once:  # an invalidated result reruns from zero
        return "started"
    direct = plan.nodes[key].parent
    return "waiting" if direct is not None and not store.is_complete(direct) else "pending"


def node_progress(plan: Plan, store: StageStore, key: str) -> str:
    """A started node's progress in words: budget done, time per epoch and an estimate of the
    time left (from its own epoch records), e.g. "step 648/1200, 4.1 s/epoch, about 0:01:40
    left"."""
    records = store.read_epochs(key)
    if not records:
        return "not started"
    last, config = records[-1], plan.nodes[key].config
    per_epoch = sum(float(r.get("seconds", 0.0)) for r in records) / len(records)
    if config.get("steps") is not None:
        done, total = int(last.get("steps", 0)), int(config["steps"])
        budget = f"step {done}/{total}"
        per_step = per_epoch * len(records) / max(done, 1)
        left = (total - done) * per_step
    else:
        done, total = int(last.get("epoch", 0)), int(config.get("epochs") or 0)
        budget = f"epoch {done}/{total}"
        left = (total - done) * per_epoch
    return f"{budget}, {per_epoch:.1f} s/epoch, about {clock(left)} left"


def trial_status(trial: Trial, store: StageStore) -> tuple[str, str | None]:
    """``(status, error)`` of a trial from the state of the first of its nodes that is not
    complete (module docstring): failed as its last node -> failed, as an earlier one ->
    skipped, no error -> pending; every node complete -> ok."""
    stages = list(trial.nodes)
    for stage, key in trial.nodes.items():
        if store.is_complete(key):
            continue
        error = store.read_error(key)
        if error is None:
            return "pending", None
        if stage == stages[-1]:
            return "failed", f"{stage} node {key}: {error}"
        return "skipped", f"{stage} node {key} failed: {error}"
    return "ok", None


def trial_columns(plan: Plan, trial: Trial, store: StageStore) -> dict[str, Any]:
    """The columns every per-trial table starts with: ``sweep``, ``trial_id``, the dotted grid
    axes, ``method``, ``label_fraction``, ``seed``, ``split``, ``status``, ``error``."""
    status, error = trial_status(trial, store)
    row: dict[str, Any] = {"sweep": plan.spec.name, "trial_id": trial.trial_id}
    row.update({axis: trial.params.get(axis) for axis in path_axes(plan)})
    row.update(
        method=trial.method,
        label_fraction=trial.label_fraction,
        seed=trial.seed,
        split=trial.split_index,
        status=status,
        error=error,
    )
    return row


def path_axes(plan: Plan) -> list[str]:
    """The grid keys that are dotted paths (e.g. ``stages.local.temperature``), in grid order:
    the axes', then the linked groups'."""
    return [name for name in plan.spec.axis_keys if name not in NAMED_AXES]


def collect(plan: Plan, store: StageStore) -> Tables:
    """Build the trials / epochs / summary tables of ``plan`` from what ``store`` holds."""
    sweep = plan.spec.name
    record = store.read_sweep() or {}
    environment = {**environment_info(), **record.get("environment", {})}
    axes = path_axes(plan)

    epochs_by_key = {key: _dedupe_epochs(store.read_epochs(key)) for key in plan.nodes}
    rows = []
    for trial in plan.trials:
        row = trial_columns(plan, trial, store)
        row.update({f"key_{stage}": trial.nodes.get(stage) for stage in stage_names()})
        final_key = trial.final_key
        final = (store.read_metrics(final_key) or {}) if store.is_complete(final_key) else {}
        row.update(
            {
                name: value
                for name, value in sorted(final.items())
                if name not in (*_TIME_KEYS, "steps", "timing")
            }
        )
        for stage in stage_names():
            key = trial.nodes.get(stage)
            metrics = (store.read_metrics(key) or {}) if key else {}
            epochs = epochs_by_key.get(key, []) if key else []
            row[f"wall_s_{stage}"] = _seconds(metrics, epochs, "wall_s", "seconds")
            row[f"gpu_s_{stage}"] = _seconds(metrics, epochs, "gpu_s", "gpu_s")
            row[f"steps_{stage}"] = _steps(metrics, epochs)
        if final:
            row["converged"], row["val_gain_last_quarter"] = converged(
                epochs_by_key.get(final_key, [])
            )
            row["collapsed"] = collapsed(final)
        else:
            row["converged"], row["val_gain_last_quarter"], row["collapsed"] = None, math.nan, None
        row.update({name: environment.get(name, "unknown") for name in ENVIRONMENT_COLUMNS})
        rows.append(row)
    trials = pd.DataFrame(rows)
    if trials.empty:
        trials = pd.DataFrame(
            columns=["sweep", "trial_id", "method", "label_fraction", "seed", "split", "status"]
        )

    epoch_rows = []
    for key, records in epochs_by_key.items():
        for record in records:
            epoch_rows.append(
                {"sweep": sweep, "key": key, "stage": plan.nodes[key].stage, **record}
            )
    epochs = pd.DataFrame(epoch_rows)
    for column in EPOCH_COLUMNS:
        if column not in epochs.columns:
            epochs[column] = pd.Series(dtype="float64")
    epochs = epochs[list(EPOCH_COLUMNS) + [c for c in epochs.columns if c not in EPOCH_COLUMNS]]

    return Tables(trials=trials, epochs=epochs, summary=summarise(trials, sweep, axes))


def summarise(trials: pd.DataFrame, sweep: str, axes: Sequence[str] = ()) -> pd.DataFrame:
    """Mean, std and n of every ``test_*`` metric over seeds and splits, per configuration.

    Groups the ok trials by ``method``, ``label_fraction`` and ``axes`` (the other grid axes).
    """
    keys = ["method", "label_fraction", *axes]
    metrics = sorted(c for c in trials.columns if c.startswith("test_"))
    ok = trials[trials["status"] == "ok"] if "status" in trials.columns else trials.iloc[0:0]
    columns = ["sweep", *keys, "n_trials"] + [
        f"{m}_{s}" for m in metrics for s in ("mean", "std", "n")
    ]
    if ok.empty:
        return pd.DataFrame(columns=columns)
    grouped = ok.assign(**{k: ok[k].map(_hashable) for k in keys}).groupby(
        keys, dropna=False, sort=False
    )
    rows = []
    for values, group in grouped:
        row: dict[str, Any] = {"sweep": sweep, **dict(zip(keys, values, strict=True))}
        row["n_trials"] = len(group)
        for metric in metrics:
            column = pd.to_numeric(group[metric], errors="coerce")
            row[f"{metric}_mean"] = float(column.mean()) if column.notna().any() else math.nan
            row[f"{metric}_std"] = (
                float(column.std(ddof=1)) if column.notna().sum() > 1 else math.nan
            )
            row[f"{metric}_n"] = int(column.notna().sum())
        rows.append(row)
    return pd.DataFrame(rows, columns=columns)


def write_tables(tables: Tables, store: StageStore) -> dict[str, Path]:
    """Write ``tables/{trials,epochs,summary}.parquet`` atomically; returns their paths."""
    paths = {}
    for name in TABLE_NAMES:
        frame = parquet_safe(getattr(tables, name))
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        path = store.tables_dir / f"{name}.parquet"
        atomic_write(path, lambda handle, data=buffer.getvalue(): handle.write(data))
        paths[name] = path
    return paths


def write_paired(paired: pd.DataFrame, store: StageStore) -> Path:
    """Write ``tables/paired.parquet`` (``orchestrator.stats.paired_differences``) atomically."""
    buffer = io.BytesIO()
    parquet_safe(paired).to_parquet(buffer, index=False)
    path = store.tables_dir / "paired.parquet"
    atomic_write(path, lambda handle: handle.write(buffer.getvalue()))
    return path


def read_tables(storage: str | os.PathLike[str]) -> Tables:
    """Read a sweep's parquet tables; ``FileNotFoundError`` naming the missing file."""
    folder = StageStore(storage).tables_dir
    frames = {}
    for name in TABLE_NAMES:
        path = folder / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such table (run `semicon-sweep tabulate {storage}`)"
            )
        frames[name] = pd.read_parquet(path)
    return Tables(**frames)


def tables_stale(store: StageStore) -> bool:
    """Whether the tables are missing or older than anything in the store they are built from."""
    paths = [store.tables_dir / f"{name}.parquet" for name in TABLE_NAMES]
    if not all(p.is_file() for p in paths):
        return True
    built = min(p.stat().st_mtime_ns for p in paths)
    sources = [store.sweep_path]
    if store.stages_dir.is_dir():
        for folder in store.stages_dir.iterdir():
            sources += [
                folder / n for n in ("COMPLETE", "metrics.json", "error.txt", "epochs.jsonl")
            ]
            sources.append(folder)  # a deleted error.txt changes the folder's mtime
    newest = max((p.stat().st_mtime_ns for p in sources if p.exists()), default=0)
    return newest > built


def parquet_safe(frame: pd.DataFrame) -> pd.DataFrame:
    """Object columns whose non-null values are not all one scalar type become strings.

    Lists and mappings (e.g. a ``dataset.label_remap`` axis) become JSON text; None stays None.
    """
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype != object:
            continue
        values = [
            v for v in out[column] if v is not None and not (isinstance(v, float) and math.isnan(v))
        ]
        kinds = {type(v) for v in values}
        if len(kinds) <= 1 and not kinds & {list, tuple, dict}:
            continue
        out[column] = out[column].map(lambda v: v if v is None else _text(v))
    return out


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
    table.attrs["best"] = _best_cells(means) if "dice" in metric else []
    return table


def _best_cells(means: pd.DataFrame) -> list[tuple[int, int]]:
    """(row, column) positions of the highest mean of each column, as shown (3 decimals), so
    cells that read the same are all best; none in a column with a single value."""
    best = []
    for j, column in enumerate(means.columns):
        shown = means[column].round(3).to_numpy()
        if (~pd.isna(shown)).sum() < 2:
            continue
        top = pd.Series(shown).max()
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


# ---- helpers ---------------------------------------------------------------------------------


def _dedupe_epochs(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Keep the last record of each epoch (a restart re-runs and re-records epochs)."""
    by_epoch: dict[Any, dict[str, Any]] = {}
    unnumbered = []
    for record in records:
        if "epoch" in record:
            by_epoch[record["epoch"]] = record
        else:
            unnumbered.append(record)
    ordered = sorted(by_epoch.items(), key=lambda item: _sort_key(item[0]))
    return [record for _, record in ordered] + unnumbered


def _seconds(
    metrics: dict[str, Any], epochs: list[dict[str, Any]], final_key: str, epoch_key: str
) -> float:
    value = metrics.get(final_key)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    per_epoch = [e[epoch_key] for e in epochs if isinstance(e.get(epoch_key), int | float)]
    return float(sum(per_epoch)) if per_epoch else math.nan


def _steps(metrics: dict[str, Any], epochs: list[dict[str, Any]]) -> float:
    """Optimiser steps a node ran: its final metrics' ``steps``, else its last epoch record's
    (NaN for nodes recorded before steps were counted, or not run)."""
    for source in (metrics, epochs[-1] if epochs else {}):
        value = source.get("steps")
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return math.nan


def _axes(trials: pd.DataFrame) -> list[str]:
    """Grid-axis-like columns of a trials table: dotted paths and the named axes."""
    named = ["method", "label_fraction", "seed", "split"]
    return [c for c in trials.columns if "." in c] + [c for c in named if c in trials.columns]


def _hashable(value: Any) -> Any:
    return _text(value) if isinstance(value, list | tuple | dict) else value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _cell(mean: float, std: float, count: int) -> str:
    if count == 0 or math.isnan(mean):
        return ""
    if count == 1 or math.isnan(std):
        return f"{mean:.3f} ({count})"
    return f"{mean:.3f} ± {std:.3f} ({count})"


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))


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
