"""``semicon-sweep``: launch a sweep, watch it, tabulate it, and prepare data.

Commands::

    semicon-sweep --version
    semicon-sweep launch SPEC [--address A] [--storage DIR] [--dry-run [--json]] [--force] [--no-reuse]
                              [--verify] [--allow-large-grid] [--force-unlock] [--plain]
    semicon-sweep status STORAGE [--verify]
    semicon-sweep tabulate STORAGE [--metric M] [--by AXIS] [--format text|md|latex|csv] [--out FILE] [--baseline METHOD]
    semicon-sweep evaluate STORAGE --data ROOT [--batch-size N] [--device cpu|cuda]
    semicon-sweep plot STORAGE [--metric M] [--out DIR]
    semicon-sweep schema
    semicon-sweep data synth DIR [--cases N] [--seed S]
    semicon-sweep data check ROOT

Exit codes: 0 done (every trial ok), 1 some trials failed or are unfinished, 2 bad input
(a bad spec, config, dataset, storage owned by another sweep, in use by a running launch
(``orchestrator.lock``) or not a writable folder, a grid
over ``MAX_TRIALS`` points without --allow-large-grid, a node needing more CPUs / GPUs than a
local Ray has, unreachable cluster, a stored model that fails to load). Bad input
prints one line ``semicon-sweep: error: <message>`` on stderr, writes nothing, and never a
traceback. Ray is imported only by ``launch`` when it actually runs, so every other command
(and a dry run) starts fast and needs no cluster.
"""

from __future__ import annotations

import contextlib
import enum
import json
import re
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

# Everything else is imported by the command that needs it: ``--help`` and argument errors
# import typer alone (no torch, pandas or Ray), and reading a spec imports no torch either.
if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.spec import GridTooLarge, Spec
    from orchestrator.store import StageStore

PROG = "semicon-sweep"
MAX_TRIALS_SHOWN = 20
MAX_INVALID_SHOWN = 20
MAX_PROBLEMS_SHOWN = 5  # failed / skipped trials listed by ``status``, each

# launch and status: hash the files every COMPLETE vouches for (sizes are always compared)
VerifyOption = Annotated[
    bool,
    typer.Option(
        "--verify", help="Check the sha256 of every complete node's files, not only their sizes."
    ),
]


class TableFormat(str, enum.Enum):
    """``tabulate --format`` (``orchestrator.tables.TABLE_FORMATS``)."""

    text = "text"
    md = "md"
    latex = "latex"
    csv = "csv"


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """The bad-input errors (docs/ARCHITECTURE.md, "Bad input"): one line, exit 2."""
    from orchestrator.lock import SweepLocked
    from orchestrator.session import ClusterError
    from orchestrator.spec import SpecError
    from orchestrator.store import StorageConflict, StorageError, StoredFileError
    from trainers.config import ConfigError, DatasetError

    return (
        SpecError,
        ConfigError,
        DatasetError,
        StorageConflict,
        StorageError,
        StoredFileError,
        ClusterError,
        SweepLocked,
    )


app = typer.Typer(
    name=PROG,
    help="Ray-distributed sweeps of semi-supervised contrastive segmentation (Hu et al., MICCAI 2021).",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain help: typer's boxed help prints `<bool>` after every flag (--dry-run, --help)
    rich_markup_mode=None,
)
data_app = typer.Typer(
    help="Prepare and check MSD-layout datasets.", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(data_app, name="data")


def main() -> None:
    """Console-script entry point (``semicon-sweep``)."""
    app(prog_name=PROG)


def package_version() -> str:
    """The installed package's version (``unknown`` when run from a checkout not installed)."""
    from importlib import metadata

    try:
        return metadata.version("semicon-sweep")
    except metadata.PackageNotFoundError:
        return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{PROG} {package_version()}")
        raise typer.Exit()


@app.callback()
def _global_options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Options before the command (the app's help text is ``app``'s ``help``)."""


def log(message: str) -> None:
    """A line for the person at the terminal: stderr, so stdout stays machine-readable."""
    typer.echo(message, err=True)


@contextlib.contextmanager
def bad_input(*extra: type[BaseException]) -> Iterator[None]:
    """Turn bad-input errors into one stderr line and exit code 2."""
    try:
        yield
    except (*bad_input_errors(), *extra) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        typer.echo(f"{PROG}: error: {message}", err=True)
        raise typer.Exit(2) from None


# ---- launch --------------------------------------------------------------------------------


@app.command()
def launch(
    spec_path: Annotated[Path, typer.Argument(metavar="SPEC", help="The sweep's YAML spec.")],
    address: Annotated[
        str | None,
        typer.Option(
            help="Ray address: 'auto' or ray://host:port (default: the spec's ray.address)."
        ),
    ] = None,
    storage: Annotated[
        Path | None, typer.Option(help="Storage folder (default: the spec's storage).")
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan; run and write nothing.")
    ] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="With --dry-run: print one JSON object.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Launch into a storage folder that holds another sweep.")
    ] = False,
    no_reuse: Annotated[
        bool, typer.Option("--no-reuse", help="Give every trial its own stage nodes (no sharing).")
    ] = False,
    verify: VerifyOption = False,
    allow_large_grid: Annotated[
        bool,
        typer.Option(
            "--allow-large-grid",
            help="Plan a grid beyond the trial limit, orchestrator.spec.MAX_TRIALS (with "
            "--dry-run: count it).",
        ),
    ] = False,
    force_unlock: Annotated[
        bool,
        typer.Option(
            "--force-unlock",
            help="Take over the storage's launch.lock held by a launch on another machine "
            "whose heartbeat is still fresh (only when you know that launch is gone).",
        ),
    ] = False,
    plain: Annotated[
        bool,
        typer.Option(
            "--plain",
            help="Progress as plain lines even when stderr is a terminal (also "
            "SEMICON_SWEEP_PLAIN=1 or TERM=dumb); a terminal otherwise gets a live table.",
        ),
    ] = False,
) -> None:
    """Plan a sweep and run it on Ray (or only print the plan with --dry-run).

    One launch at a time runs into a storage folder: it holds STORAGE/launch.lock while it runs,
    and a second launch exits 2 naming the owner (orchestrator.lock). Progress goes to stderr:
    a live table of the running nodes on a terminal, plain lines otherwise (orchestrator.progress).
    """
    from orchestrator.plan import build_plan
    from orchestrator.resources import check_local_resources
    from orchestrator.session import check_address, resolve_address
    from orchestrator.spec import MAX_TRIALS, GridTooLarge, SpecError, load_spec
    from orchestrator.store import StageStore, check_storage, invalid_nodes
    from orchestrator.tracking import check_tracking

    if as_json and not dry_run:
        with bad_input():
            raise SpecError("--json: only with --dry-run")
    overrides: dict[str, Any] = {}
    if storage is not None:
        overrides["storage"] = str(storage)
    if address is not None:
        overrides["address"] = address
    with bad_input():
        try:
            limit = None if allow_large_grid and not dry_run else MAX_TRIALS
            spec = load_spec(spec_path, overrides=overrides, max_trials=limit)
        except GridTooLarge as err:
            if not allow_large_grid:
                raise
            typer.echo(describe_large_grid(err, as_json))
            return
        # everything that can be checked without Ray, before anything is written
        check_storage(spec.storage, writable=True)
        check_tracking(spec)
        check_local_resources(spec.resources, spec.ray.address)
        if spec.ray.address is not None:  # a quick probe, not a connection
            check_address(resolve_address(spec.ray.address))
        plan = build_plan(spec, reuse=not no_reuse)
    store = StageStore(spec.storage, verify_hashes=verify)
    if dry_run:
        report_owner(store.root)
        with bad_input():
            store.check_claim(spec, force=force)
            check_datasets(plan, store)  # what the launch reads before Ray starts
            invalid = invalid_nodes(plan, store)
            report_invalid(invalid)
            summary = plan.summary(lambda key: key not in invalid and store.is_complete(key))
        if as_json:
            summary.update(
                storage=spec.storage,
                spec_hash=spec.spec_hash,
                invalid=invalid,
                axes=dict(spec.axis_counts),
                points={trial.trial_id: trial.params for trial in plan.trials},
            )
            typer.echo(json.dumps(summary))
        else:
            typer.echo(describe_plan(plan, store, invalid))
        return

    from orchestrator.lock import acquire_lock

    existed = store.root.exists()
    with bad_input():
        lock = acquire_lock(store.root, force_unlock=force_unlock)  # before anything is written
    with lock:
        _run_locked(spec_path, spec, plan, store, existed, force, no_reuse, plain)


def check_datasets(plan: Plan, store: Any) -> None:
    """Read and check each distinct dataset of ``plan`` not yet cached in ``store``."""
    from trainers.config import DataConfig, from_dict
    from trainers.data import check_dataset

    for data in {json.dumps(node.data, sort_keys=True) for node in plan.nodes.values()}:
        check_dataset(from_dict(DataConfig, json.loads(data), "dataset"), store.cache_dir)


def _run_locked(
    spec_path: Path,
    spec: Spec,
    plan: Plan,
    store: StageStore,
    existed: bool,
    force: bool,
    no_reuse: bool,
    plain: bool = False,
) -> None:
    """``launch`` once it holds the storage's lock: claim, run, collect, exit."""
    # Ray itself is imported only inside run_sweep; execute's module level is Ray-free
    from orchestrator.execute import ClusterError, run_sweep
    from orchestrator.progress import progress_view
    from orchestrator.session import sigterm_as_interrupt
    from orchestrator.tables import collect, format_table, paper_table, write_tables

    previous = store.sweep_path.read_bytes() if store.sweep_path.is_file() else None
    with bad_input():
        store.claim_sweep(spec, force=force, plan=plan)
    # a live table when stderr is a terminal, else plain lines (orchestrator.progress); the
    # launch line waits for run_sweep's first line (Ray is up then), so that bad input found by
    # run_sweep's checks is the only line printed
    progress = progress_view(plain=plain, sink=log)
    progress.hold(
        f"{PROG}: launching sweep '{spec.name}' ({len(plan.trials)} trials) into {spec.storage}"
    )

    try:
        # SIGTERM as KeyboardInterrupt from here on (not only while Ray runs), so the lock is
        # released whenever the launch is stopped
        # stdout is for the table alone: whatever Ray prints while the sweep runs goes to stderr
        with (
            sigterm_as_interrupt(),
            bad_input(ClusterError),
            contextlib.redirect_stdout(sys.stderr),
        ):
            run_sweep(plan, store, address=spec.ray.address, progress=progress, reuse=not no_reuse)
    except KeyboardInterrupt:  # SIGINT, or SIGTERM as session.SweepInterrupted
        from orchestrator.session import interrupting_signal

        signum = interrupting_signal()
        log(
            f"{PROG}: interrupted ({signum.name}): complete nodes are kept and running ones "
            f"resume from their last checkpoint; relaunch to continue: {PROG} launch {spec_path}"
        )
        raise typer.Exit(128 + signum.value) from None
    except typer.Exit:
        # run_sweep checks the trackers and the Ray address before it writes anything: on bad
        # input the claim is undone and the storage left as it was
        _undo_claim(store, existed, previous)
        raise
    tables = collect(plan, store)
    write_tables(tables, store)
    counts = Counter(tables.trials["status"])
    log(f"{PROG}: {_status_line(counts, len(plan.trials))}; tables in {store.tables_dir}")
    table = paper_table(tables.trials)
    if not table.empty:
        typer.echo(format_table(table, "text"), nl=False)
    raise typer.Exit(0 if counts.get("ok", 0) == len(plan.trials) else 1)


def _undo_claim(store: StageStore, existed: bool, previous: bytes | None) -> None:
    """After a launch that never reached the cluster, leave the storage as it was."""
    from orchestrator.store import atomic_write_text

    if not existed:
        if not any(store.stages_dir.glob("*")):
            shutil.rmtree(store.root, ignore_errors=True)
    elif previous is not None:
        atomic_write_text(store.sweep_path, previous.decode("utf-8"))
    else:
        store.sweep_path.unlink(missing_ok=True)


def report_owner(root: Path) -> None:
    """One stderr line naming the launch that holds ``root``'s lock, if any (readers go on)."""
    from orchestrator.lock import describe_owner, read_owner

    owner = read_owner(root)
    if owner is not None:
        log(f"{PROG}: {root} is in use by a launch ({describe_owner(owner)})")


def report_invalid(invalid: dict[str, str]) -> None:
    """One stderr line per node whose COMPLETE no longer holds (``store.invalid_nodes``)."""
    for key, why in list(invalid.items())[:MAX_INVALID_SHOWN]:
        log(f"{PROG}: node {key} will rerun: {why}")
    if len(invalid) > MAX_INVALID_SHOWN:
        log(f"{PROG}: ... and {len(invalid) - MAX_INVALID_SHOWN} more nodes will rerun")


def describe_large_grid(err: GridTooLarge, as_json: bool) -> str:
    """The dry run of a grid over ``MAX_TRIALS`` points: its size only, no point built."""
    from orchestrator.spec import MAX_TRIALS

    if as_json:
        return json.dumps({"trials": err.trials, "axes": dict(err.axes), "planned": False})
    axes = ", ".join(f"{name} ({count})" for name, count in err.axes)
    return "\n".join(
        [
            f"{err.trials:,} trials over axes {axes}",
            f"more than {MAX_TRIALS:,}: grid points were counted, not checked or planned; "
            "dry run: nothing was run or written",
        ]
    )


def describe_plan(plan: Plan, store: StageStore, invalid: dict[str, str] | None = None) -> str:
    """The plan for a person: stage node counts, what is done, and the trials.

    ``invalid``: nodes whose COMPLETE no longer holds (``store.invalid_nodes``): to run."""
    spec = plan.spec
    invalid = invalid or {}

    def complete(key: str) -> bool:
        return key not in invalid and store.is_complete(key)

    summary = plan.summary(complete)
    lines = [
        f"sweep '{spec.name}' (spec {spec.spec_hash[:12]}): {summary['trials']} trials",
        f"storage: {spec.storage}",
        f"axes: {', '.join(f'{name} ({count})' for name, count in spec.axis_counts) or 'none'}",
        "",
        f"{'stage':<10}{'nodes':>7}{'done':>7}{'to run':>8}",
    ]
    for stage, counts in summary["stages"].items():
        done = counts["nodes"] - counts["to_run"]
        lines.append(f"{stage:<10}{counts['nodes']:>7}{done:>7}{counts['to_run']:>8}")
    lines.append("")
    for trial in plan.trials[:MAX_TRIALS_SHOWN]:
        chain = " -> ".join(
            f"{stage}:{key[:8]}{'*' if complete(key) else ''}" for stage, key in trial.nodes.items()
        )
        params = ", ".join(f"{k}={v}" for k, v in trial.params.items())
        lines.append(f"{trial.trial_id}  {params or '(single point)'}  [{chain}]")
    if len(plan.trials) > MAX_TRIALS_SHOWN:
        lines.append(f"... and {len(plan.trials) - MAX_TRIALS_SHOWN} more trials")
    lines.append("(* = complete in the store)  dry run: nothing was run or written")
    return "\n".join(lines)


# ---- status / tabulate -------------------------------------------------------------------


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


def _status_line(counts: Counter[str], total: int) -> str:
    from orchestrator.tables import STATUSES

    parts = ", ".join(f"{status} {counts.get(status, 0)}" for status in STATUSES)
    return f"{total} trials: {parts}"


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
    typer.echo(_status_line(counts, len(plan.trials)))
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


@app.command()
def tabulate(
    storage: Annotated[Path, typer.Argument(help="The sweep's storage folder.")],
    metric: Annotated[
        str, typer.Option(help="Trials-table column to report.")
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
        format_table,
        paired_table,
        paper_table,
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
            f"{PROG}: no finished trials in {storage} yet ({_status_line(Counter(tables.trials['status']), len(tables.trials))})"
        )
        return
    text = format_table(table, fmt) + _notes(table, fmt)
    if (unfinished := unfinished_note(tables.trials)) is not None:
        text += f"{_comment(fmt)}{unfinished}\n"
    if paired is not None:
        if writable:
            write_paired(paired, store)
        text += (
            f"\n{_comment(fmt)}{metric}: mean paired difference to {baseline} over matching "
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


def _comment(fmt: str) -> str:
    return {"latex": "% ", "csv": "# "}.get(fmt, "")


def _notes(table: Any, fmt: str) -> str:
    notes = table.attrs.get("notes", [])
    lead = "\n" if notes and fmt in ("text", "md") else ""
    return lead + "".join(f"{_comment(fmt)}{note}\n" for note in notes)


# ---- evaluate / plot -----------------------------------------------------------------------


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
) -> None:
    """Score every fine-tuned model of a finished sweep on all cases of another MSD folder.

    Preprocessed as the sweep's data; writes tables/external.parquet (ext_* Dice per trial).
    """
    from orchestrator.evaluate import ExternalEvalError, evaluate_external, write_external
    from orchestrator.store import invalid_nodes
    from orchestrator.tables import format_table, paper_table

    with bad_input(ExternalEvalError):
        plan, store = recorded_plan(storage)
        report_invalid(invalid_nodes(plan, store))
        frame = evaluate_external(
            plan, store, data, batch_size=batch_size, device=device, progress=log
        )
    path = write_external(frame, store)
    log(f"{PROG}: wrote {path}")
    table = paper_table(frame, metric="ext_dice_pooled_mean")
    if not table.empty:
        typer.echo(format_table(table, "text"), nl=False)


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


# ---- schema --------------------------------------------------------------------------------


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of a spec file, for editors and validators.

    Generated from the config classes and the spec loader's keys (orchestrator.schema).
    """
    from orchestrator.schema import spec_schema

    typer.echo(json.dumps(spec_schema(), indent=2))


# ---- data ----------------------------------------------------------------------------------


@data_app.command("synth")
def data_synth(
    folder: Annotated[Path, typer.Argument(metavar="DIR", help="Where to write the dataset.")],
    cases: Annotated[int, typer.Option(help="Number of volumes.")] = 24,
    seed: Annotated[int, typer.Option(help="Generator seed.")] = 0,
) -> None:
    """Write a synthetic MSD-layout dataset (Hippocampus-like, 3 classes)."""
    from trainers.synthetic import write_synthetic_msd

    with bad_input(ValueError):
        root = write_synthetic_msd(folder, num_cases=cases, seed=seed)
    typer.echo(f"{root}: {cases} synthetic cases (seed {seed})")


@data_app.command("check")
def data_check(root: Annotated[Path, typer.Argument(help="An MSD-layout folder.")]) -> None:
    """Read and check every case of an MSD folder; print a summary."""
    from trainers.msd import load_msd

    with bad_input():
        volumes = load_msd(root)
    typer.echo(describe_volumes(root, volumes))


def describe_volumes(root: Path, volumes: list[Any]) -> str:
    """Cases, classes with their voxel shares, and the range of volume shapes."""
    import numpy as np

    names = _class_names(root)
    voxels: Counter[int] = Counter()
    for volume in volumes:
        values, counts = np.unique(volume.label, return_counts=True)
        voxels.update({int(v): int(c) for v, c in zip(values, counts, strict=True)})
    total = sum(voxels.values()) or 1
    classes = ", ".join(
        f"{value} {names.get(value, '?')} ({100 * count / total:.2f}%)"
        for value, count in sorted(voxels.items())
    )
    shapes = np.array([volume.image.shape for volume in volumes])
    extent = " x ".join(
        f"{lo}-{hi}" if lo != hi else f"{lo}"
        for lo, hi in zip(shapes.min(0), shapes.max(0), strict=True)
    )
    return "\n".join(
        [
            f"{root}: {len(volumes)} cases, all readable and consistent",
            f"classes: {classes}",
            f"shapes: {extent}",
        ]
    )


def _class_names(root: Path) -> dict[int, str]:
    try:
        labels = json.loads((root / "dataset.json").read_text()).get("labels", {})
        return {int(k): str(v) for k, v in labels.items()}
    except (OSError, ValueError, AttributeError):
        return {}


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
