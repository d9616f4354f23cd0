"""``semicon-sweep launch``: load the spec, check what can be checked without Ray, then print
the plan (``--dry-run``) or take the storage's lock, claim it, run the sweep and write its
tables."""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from orchestrator.cli.common import (
    MAX_TRIALS_SHOWN,
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
    from orchestrator.spec import GridTooLarge, Spec
    from orchestrator.store import StageStore


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
    from orchestrator.plan import datasets
    from trainers.data import check_dataset

    for data in datasets(plan.nodes.values()).values():
        check_dataset(data, store.cache_dir)


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
    from orchestrator.tables import collect, paper_table, render_table, write_tables

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
    log(f"{PROG}: {status_line(counts, len(plan.trials))}; tables in {store.tables_dir}")
    table = paper_table(tables.trials)
    if not table.empty:
        typer.echo(render_table(table, "text"), nl=False)
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
