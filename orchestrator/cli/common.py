"""What every command shares: the Typer apps, the program's name and limits, ``log`` (stderr)
and ``bad_input`` (bad-input errors as one line and exit 2), and the stderr lines about a
storage's lock owner and its invalid nodes.

Imports typer and the standard library alone: each command imports what it needs."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer

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


def status_line(counts: Counter[str], total: int) -> str:
    """``"8 trials: ok 6, failed 1, ..."``: the trials counted by status."""
    from orchestrator.tables import STATUSES

    parts = ", ".join(f"{status} {counts.get(status, 0)}" for status in STATUSES)
    return f"{total} trials: {parts}"
