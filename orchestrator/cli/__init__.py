"""``semicon-sweep``: launch a sweep, watch it, tabulate it, and prepare data.

Commands::

    semicon-sweep --version
    semicon-sweep launch SPEC [--address A] [--storage DIR] [--dry-run [--json]] [--force] [--no-reuse]
                              [--verify] [--allow-large-grid] [--force-unlock] [--plain]
    semicon-sweep status STORAGE [--verify]
    semicon-sweep tabulate STORAGE [--metric M] [--by AXIS] [--format text|md|latex|csv] [--out FILE] [--baseline METHOD]
    semicon-sweep evaluate STORAGE --data ROOT [--batch-size N] [--device cpu|cuda] [--native]
    semicon-sweep predict STORAGE --images DIR --out DIR [--trial ID | --best METRIC] [--force]
                              [--batch-size N] [--device cpu|cuda]
    semicon-sweep export STORAGE --out FILE.pt [--trial ID | --best METRIC] [--force]
    semicon-sweep plot STORAGE [--metric M] [--out DIR]
    semicon-sweep schema
    semicon-sweep data synth DIR [--cases N] [--seed S]
    semicon-sweep data check ROOT

Exit codes: 0 done (every trial ok), 1 some trials failed or are unfinished, 2 bad input
(a bad spec, config, dataset, storage owned by another sweep, in use by a running launch
(``orchestrator.lock``) or not a writable folder, a grid
over ``MAX_TRIALS`` points without --allow-large-grid, a node needing more CPUs / GPUs than a
local Ray has, unreachable cluster, a stored model that fails to load, an image ``predict``
cannot read, an unknown or unfinished ``--trial``, an output that exists without --force). Bad input
prints one line ``semicon-sweep: error: <message>`` on stderr, writes nothing, and never a
traceback. Ray is imported only by ``launch`` when it actually runs, so every other command
(and a dry run) starts fast and needs no cluster.
"""

from __future__ import annotations

import json
import sys

import typer

# Each module below registers its commands on ``app`` as it is imported, in the order of the help.
from orchestrator.cli.common import (
    MAX_INVALID_SHOWN,
    MAX_PROBLEMS_SHOWN,
    MAX_TRIALS_SHOWN,
    PROG,
    VerifyOption,
    app,
    bad_input,
    bad_input_errors,
    data_app,
    log,
    package_version,
    report_invalid,
    report_owner,
)
from orchestrator.cli.data import data_check, data_synth, describe_volumes
from orchestrator.cli.launch import check_datasets, describe_large_grid, describe_plan
from orchestrator.cli.predict import export, predict
from orchestrator.cli.read import (
    NODE_STATES,
    TableFormat,
    evaluate,
    plot,
    recorded_plan,
    status,
    sweep_tables,
    tabulate,
    unfinished_note,
)

__all__ = [
    "MAX_INVALID_SHOWN",
    "MAX_PROBLEMS_SHOWN",
    "MAX_TRIALS_SHOWN",
    "NODE_STATES",
    "PROG",
    "TableFormat",
    "VerifyOption",
    "app",
    "bad_input",
    "bad_input_errors",
    "check_datasets",
    "data_app",
    "data_check",
    "data_synth",
    "describe_large_grid",
    "describe_plan",
    "describe_volumes",
    "evaluate",
    "export",
    "log",
    "main",
    "package_version",
    "plot",
    "predict",
    "recorded_plan",
    "report_invalid",
    "report_owner",
    "schema",
    "status",
    "sweep_tables",
    "tabulate",
    "unfinished_note",
]


@app.command()
def schema() -> None:
    """Print the JSON Schema (draft 2020-12) of a spec file, for editors and validators.

    Generated from the config classes and the spec loader's keys (orchestrator.schema).
    """
    from orchestrator.schema import spec_schema

    typer.echo(json.dumps(spec_schema(), indent=2))


def main() -> None:
    """Console-script entry point (``semicon-sweep``)."""
    app(prog_name=PROG)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
