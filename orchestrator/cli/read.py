"""The commands that read a sweep's storage: ``status``, ``tabulate``, ``evaluate`` and ``plot``,
each from the plan recorded in ``sweep.json`` (``recorded_plan``; no Ray, no data needed)."""

from __future__ import annotations

import enum
import re
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.common import (
    MAX_PROBLEMS_SHOWN,
    PROG,
    VerifyOption,
    app,
    bad_input,
    log,
    report_invalid,
    report_owner,
    status_line,
)

if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.store import StageStore


def recorded_plan(storage: Path) -> tuple[Plan, StageStore]:
    """The plan of the sweep held in ``storage`` (from ``sweep.json``; no Ray, no data needed)."""
    from orchestrator.plan import Plan, build_plan
    from orchestrator.spec import spec_from_mapping
    from orchestrator.store import StageStore, StorageConflict, check_storage

    check_storage(storage, writable=False)
    store = StageStore(storage)
    record = store.read_sweep()
    if record is None:
        raise StorageConflict(
            f"{storage}: holds no sweep (no sweep.json); launch one into it first"
        )
    if not isinstance(record.get("spec"), dict):
        raise StorageConflict(f"{store.sweep_path}: has no resolved spec")
    spec = spec_from_mapping(record["spec"], source=str(store.sweep_path), check_paths=False)
    if isinstance(record.get("plan"), dict):
        return Plan.from_dict(spec, record["plan"]), store
    return build_plan(spec), store


# node state (orchestrator.tables.node_state) -> column width in ``status``
NODE_STATES = {
    "complete": 10,
    "failed": 8,
    "skipped": 9,
    "started": 9,
    "waiting": 9,
    "pending": 9,
}


@app.command()
def status(
    storage: Annotated[Path, typer.Argument(help="The sweep's storage folder.")],
    verify: VerifyOption = False,
) -> None:
    """Count trials and stage nodes that are complete, failed, skipped or pending.

    Failed trials are listed with their error, skipped ones with the failed node they build on;
    nodes whose COMPLETE no longer matches their files are listed on stderr (they will rerun).
    """
    from orchestrator.progress import node_label
    from orchestrator.store import invalid_nodes
    from orchestrator.tables import node_progress, node_state, trial_status

    with bad_input():
        plan, store = recorded_plan(storage)
        store.verify_hashes = verify
        report_invalid(invalid_nodes(plan, store))
    report_owner(store.root)
    counts = Counter(trial_status(trial, store)[0] for trial in plan.trials)
    typer.echo(f"sweep '{plan.spec.name}' (spec {plan.spec.spec_hash[:12]}) in {store.root}")
    typer.echo(status_line(counts, len(plan.trials)))
    typer.echo("")
    typer.echo(
        f"{'stage':<10}{'nodes':>7}"
        + "".join(f"{state:>{width}}" for state, width in NODE_STATES.items())
    )
    states = {key: node_state(plan, store, key) for key in plan.nodes}
    for stage in plan.stages:
        counts = Counter(state for key, state in states.items() if plan.nodes[key].stage == stage)
        cells = "".join(f"{counts.get(state, 0):>{width}}" for state, width in NODE_STATES.items())
        typer.echo(f"{stage:<10}{sum(counts.values()):>7}{cells}")
    started = [key for key, state in states.items() if state == "started"]
    for key in started[:MAX_PROBLEMS_SHOWN]:
        node = plan.nodes[key]
        typer.echo(
            f"started: {node.stage} {key[:8]} {node_label(plan, key)}: "
            f"{node_progress(plan, store, key)}"
        )
    if len(started) > MAX_PROBLEMS_SHOWN:
        typer.echo(f"... and {len(started) - MAX_PROBLEMS_SHOWN} more started nodes")
    problems = [(trial, *trial_status(trial, store)) for trial in plan.trials]
    for shown in ("failed", "skipped"):
        listed = [(trial, error) for trial, state, error in problems if state == shown]
        for trial, error in listed[:MAX_PROBLEMS_SHOWN]:
            line = f"{trial.trial_id} {shown}: {(error or '').splitlines()[0] if error else ''}"
            tracebacks = [store.traceback_path(key) for key in trial.nodes.values()]
            kept = [path for path in tracebacks if path.is_file()]
            typer.echo(line + (f" (traceback: {kept[0]})" if kept and shown == "failed" else ""))
        if len(listed) > MAX_PROBLEMS_SHOWN:
            typer.echo(f"... and {len(listed) - MAX_PROBLEMS_SHOWN} more {shown} trials")


class TableFormat(str, enum.Enum):
    """``tabulate --format`` (``orchestrator.tables.TABLE_FORMATS``)."""

    text = "text"
    md = "md"
    latex = "latex"
    csv = "csv"


@app.command()
def tabulate(
    storage: Annotated[Path, typer.Argument(help="The sweep's storage folder.")],
    metric: Annotated[
        str,
        typer.Option(
            help="Trials-table column to report, e.g. test_native_dice_pooled_mean (Dice on "
            "each test volume's own voxel grid) or test_native_hd95_mean (mm)."
        ),
    ] = "test_dice_pooled_mean",
    by: Annotated[str, typer.Option(help="Grid axis for the table's columns.")] = "label_fraction",
    fmt: Annotated[TableFormat, typer.Option("--format", help="Table format.")] = TableFormat.text,
    out: Annotated[
        Path | None, typer.Option(help="Write the table to this file instead of stdout.")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="Also report every method's mean paired difference to this method (same seed "
            "and split) with its 95 % CI and wins/n; written to tables/paired.parquet."
        ),
    ] = None,
) -> None:
    """Print the paper-style table (mean ± std (n) over seeds and splits).

    Cells marked † hold a run that had not converged, ‡ one with a collapsed class.
    """
    from orchestrator.stats import paired_differences
    from orchestrator.store import atomic_write_text, check_storage, storage_writable
    from orchestrator.tables import (
        comment_prefix,
        format_table,
        paired_table,
        paper_table,
        render_table,
        write_paired,
        write_tables,
    )

    fmt = TableFormat(fmt).value
    with bad_input(ValueError, FileNotFoundError):
        if out is not None:
            check_storage(out.absolute().parent, writable=True)
        tables, store, collected = sweep_tables(storage)
        writable = storage_writable(store.root)
        if collected:
            if writable:
                write_tables(tables, store)
            else:
                log(f"{PROG}: {store.root} is read-only: tables built, not saved")
        table = paper_table(tables.trials, metric=metric, cols=by)
        paired = None
        if baseline is not None and not table.empty:
            axes = [a for a in table.index.names if a not in ("method", by)]
            paired = paired_differences(tables.trials, baseline, metric=metric, axes=axes)
    if table.empty:
        log(
            f"{PROG}: no finished trials in {storage} yet ({status_line(Counter(tables.trials['status']), len(tables.trials))})"
        )
        return
    text = render_table(table, fmt)
    if (unfinished := unfinished_note(tables.trials)) is not None:
        text += f"{comment_prefix(fmt)}{unfinished}\n"
    if paired is not None:
        if writable:
            write_paired(paired, store)
        text += (
            f"\n{comment_prefix(fmt)}{metric}: mean paired difference to {baseline} over matching "
            f"(seed, split) runs [95 % t interval] wins/n\n"
        )
        text += format_table(paired_table(paired, cols=by), fmt)
    if out is None:
        typer.echo(text, nl=False)
    else:
        atomic_write_text(out, text)
        log(f"{PROG}: wrote {out}")


def sweep_tables(storage: Path) -> tuple[Any, StageStore, bool]:
    """The result tables (``orchestrator.tables.Tables``) of the sweep in ``storage``, its store,
    and whether they were collected anew (then the caller writes them once it succeeded).

    With ``sweep.json``: collected from the stage store when the tables are missing or older than
    it, else read. Without (results committed without their stages, e.g. a folder under
    ``results/`` that holds only ``tables/``): read from ``tables/`` as they are.
    """
    from orchestrator.store import StageStore, check_storage
    from orchestrator.tables import collect, read_tables, tables_stale

    check_storage(storage, writable=False)
    store = StageStore(storage)
    if store.read_sweep() is None and (store.tables_dir / "trials.parquet").is_file():
        return read_tables(storage), store, False
    plan, store = recorded_plan(storage)
    if tables_stale(store):
        return collect(plan, store), store, True
    return read_tables(storage), store, False


def unfinished_note(trials: Any) -> str | None:
    """``"12 of 40 trials finished; not shown: pending 26, failed 2"``; None when all are ok."""
    from orchestrator.tables import STATUSES

    counts = Counter(trials["status"]) if "status" in trials.columns else Counter()
    if counts.get("ok", 0) == len(trials):
        return None
    rest = ", ".join(f"{status} {counts[status]}" for status in STATUSES[1:] if counts.get(status))
    return f"{counts.get('ok', 0)} of {len(trials)} trials finished; not shown: {rest}"


def _check_device(value: str) -> str:
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value):
        raise typer.BadParameter(f"{value!r}: one of cpu, cuda, cuda:N")
    return value


@app.command()
def evaluate(
    storage: Annotated[Path, typer.Argument(help="The finished sweep's storage folder.")],
    data: Annotated[
        Path,
        typer.Option(
            "--data", help="An MSD-layout folder (external test set); every case is evaluated."
        ),
    ],
    batch_size: Annotated[int, typer.Option(help="Slices per forward pass.")] = 256,
    device: Annotated[
        str,
        typer.Option(
            metavar="[cpu|cuda|cuda:N]", callback=_check_device, help="Device for the models."
        ),
    ] = "cpu",
    native: Annotated[
        bool,
        typer.Option(
            "--native",
            help="Also score each case on its own voxel grid (logits resized back to the stored "
            "slices): ext_native_dice_* columns.",
        ),
    ] = False,
) -> None:
    """Score every fine-tuned model of a finished sweep on all cases of another MSD folder.

    Preprocessed as the sweep's data; writes tables/external.parquet (ext_* Dice per trial).
    """
    from orchestrator.evaluate import ExternalEvalError, evaluate_external, write_external
    from orchestrator.store import invalid_nodes
    from orchestrator.tables import paper_table, render_table

    with bad_input(ExternalEvalError):
        plan, store = recorded_plan(storage)
        report_invalid(invalid_nodes(plan, store))
        frame = evaluate_external(
            plan, store, data, batch_size=batch_size, device=device, progress=log, native=native
        )
    path = write_external(frame, store)
    log(f"{PROG}: wrote {path}")
    table = paper_table(frame, metric="ext_dice_pooled_mean")
    if not table.empty:
        typer.echo(render_table(table, "text"), nl=False)


@app.command()
def plot(
    storage: Annotated[Path, typer.Argument(help="The sweep's storage folder.")],
    metric: Annotated[
        str,
        typer.Option(help="Trials-table column to plot (ext_* columns: the external table)."),
    ] = "test_dice_pooled_mean",
    out: Annotated[
        Path | None, typer.Option(help="Folder for the figures (default: STORAGE/plots).")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="Also plot every method's paired difference to this method (95 % CI)."),
    ] = None,
) -> None:
    """Write figures (PNG, and PDF beside each): Dice vs label fraction, ablation heatmaps, curves.

    Prints the path of every file written.
    """
    from orchestrator.evaluate import ExternalEvalError, read_external
    from orchestrator.plot import PlotError, plot_sweep
    from orchestrator.store import check_storage, storage_writable
    from orchestrator.tables import write_tables

    with bad_input(PlotError, ExternalEvalError, ValueError, FileNotFoundError):
        tables, store, stale = sweep_tables(storage)
        check_storage(out or store.root / "plots", writable=True)
        trials = read_external(store) if metric.startswith("ext_") else tables.trials
        paths = plot_sweep(
            trials, tables.epochs, out or store.root / "plots", metric=metric, baseline=baseline
        )
    if stale and storage_writable(store.root):  # only once the plots succeeded
        write_tables(tables, store)
    if (unfinished := unfinished_note(trials)) is not None:
        log(f"{PROG}: {unfinished} (the figures show the finished ones)")
    for path in paths:
        typer.echo(str(path))
