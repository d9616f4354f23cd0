"""The result tables built from the stage store: each node's state, each trial's status and row
(its final metrics, times, steps, convergence, environment), every epoch record, and the summary
over seeds and splits (the columns: ``orchestrator.tables``)."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import pandas as pd

from orchestrator.plan import Plan, Trial
from orchestrator.progress import clock, node_budget
from orchestrator.spec import NAMED_AXES
from orchestrator.stats import collapsed, converged
from orchestrator.store import StageStore, environment_info
from trainers.registry import stage_names

STATUSES = ("ok", "failed", "skipped", "pending")
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
    time left (from its own epoch records, ``orchestrator.progress.node_budget``), e.g.
    "step 648/1200, 4.1 s/epoch, about 0:01:40 left"."""
    budget = node_budget(plan.nodes[key].config, store.read_epochs(key))
    if budget is None:
        return "not started"
    return f"{budget.text}, {budget.per_epoch_s:.1f} s/epoch, about {clock(budget.left_s)} left"


def trial_status(trial: Trial, store: StageStore) -> tuple[str, str | None]:
    """``(status, error)`` of a trial from the state of the first of its nodes that is not
    complete (``orchestrator.tables``): failed as its last node -> failed, as an earlier one ->
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
                if name not in (*_TIME_KEYS, "steps", "timing", "fused")
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


def _hashable(value: Any) -> Any:
    return _text(value) if isinstance(value, list | tuple | dict) else value


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except TypeError:
        return str(value)


def _sort_key(value: Any) -> tuple[int, Any]:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return (0, value)
    return (1, str(value))
