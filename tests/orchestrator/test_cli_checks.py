"""The CLI's checks before anything is written, without Ray: damaged COMPLETE nodes, storage
paths that cannot hold a sweep, oversized grids, a node larger than a local Ray, duplicate spec
keys, and failed vs skipped trials in ``status``."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.plan import Plan, build_plan
from orchestrator.resources import check_local_resources
from orchestrator.session import ClusterError
from orchestrator.spec import Resources, load_spec
from orchestrator.store import StageStore
from tests.orchestrator import test_cli
from tests.orchestrator.specs import CLI_SPEC, write_spec
from tests.orchestrator.test_cli import fake_executor, one_error_line

# test_cli's ``finished``: a storage after a launch where seed 1's global pretraining failed
failed_sweep = test_cli.finished


def rows(stdout: str) -> dict[str, list[str]]:
    return {line.split()[0]: line.split()[1:] for line in stdout.splitlines() if line.split()}


# ---- (a) COMPLETE is checked ------------------------------------------------------------------


@pytest.fixture
def complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, runner: CliRunner) -> Plan:
    """Every node of CLI_SPEC complete in ``tmp_path / storage`` (a launch with a stand-in executor)."""
    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor())
    storage = tmp_path / "storage"
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 0, result.stderr
    return build_plan(load_spec(tmp_path / "spec.yaml", overrides={"storage": str(storage)}))


def test_truncated_model_is_reported_and_its_subtree_replanned(
    runner: CliRunner, tmp_path: Path, complete: Plan
) -> None:
    store = StageStore(complete.spec.storage)
    args = ["launch", str(tmp_path / "spec.yaml"), "--storage", store.root.as_posix()]
    before = runner.invoke(app, [*args, "--dry-run"])
    assert rows(before.stdout)["global"] == ["2", "2", "0"] and before.stderr == ""

    root = complete.levels[0][0]
    model = store.model_path(root)
    model.write_bytes(model.read_bytes()[:64])
    descendants = [
        k for k, n in complete.nodes.items() if root in (n.parent, _grandparent(complete, k))
    ]
    result = runner.invoke(app, [*args, "--dry-run"])
    assert result.exit_code == 0, result.stderr
    assert rows(result.stdout)["global"] == ["2", "1", "1"]
    assert rows(result.stdout)["local"] == ["4", "2", "2"]  # the broken node's children rerun
    assert rows(result.stdout)["finetune"] == ["8", "4", "4"]
    lines = result.stderr.splitlines()
    recorded = _recorded(store, root)
    assert lines[0] == (
        f"semicon-sweep: node {root} will rerun: {model}: 64 bytes, COMPLETE vouches for {recorded}"
    )
    assert len(lines) == 1 + len(descendants)

    as_json = json.loads(runner.invoke(app, [*args, "--dry-run", "--json"]).stdout)
    assert set(as_json["invalid"]) == {root, *descendants}

    status = runner.invoke(app, ["status", store.root.as_posix()])
    assert status.exit_code == 0
    assert status.stderr.splitlines()[0].startswith(
        f"semicon-sweep: node {root} will rerun: {model}"
    )
    # an invalidated result reruns from zero: pending, neither complete nor started
    assert rows(status.stdout)["global"] == ["2", "1", "0", "0", "0", "0", "1"]


def _grandparent(plan: Plan, key: str) -> str | None:
    parent = plan.nodes[key].parent
    return plan.nodes[parent].parent if parent else None


def _recorded(store: StageStore, key: str) -> int:
    return json.loads((store.node_dir(key) / "COMPLETE").read_text())["files"]["model.pt"]["bytes"]


def test_verify_checks_hashes(runner: CliRunner, tmp_path: Path, complete: Plan) -> None:
    store = StageStore(complete.spec.storage)
    key = complete.levels[-1][0]
    model = store.model_path(key)
    model.write_bytes(b"\0" * model.stat().st_size)  # same size, other content
    plain = runner.invoke(app, ["status", str(store.root)])
    assert plain.exit_code == 0 and plain.stderr == ""  # sizes only
    verified = runner.invoke(app, ["status", str(store.root), "--verify"])
    assert f"node {key} will rerun: {model}: content differs" in verified.stderr
    dry = runner.invoke(
        app,
        [
            "launch",
            str(tmp_path / "spec.yaml"),
            "--storage",
            str(store.root),
            "--dry-run",
            "--verify",
        ],
    )
    assert dry.exit_code == 0 and rows(dry.stdout)["finetune"] == ["8", "7", "1"]


# ---- (b) storage checks -----------------------------------------------------------------------

COMMANDS = {
    "launch": lambda spec, storage: ["launch", spec, "--storage", storage],
    "dry run": lambda spec, storage: ["launch", spec, "--storage", storage, "--dry-run"],
    "status": lambda spec, storage: ["status", storage],
    "tabulate": lambda spec, storage: ["tabulate", storage],
    "plot": lambda spec, storage: ["plot", storage],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("where", ["file", "under a file"])
def test_storage_that_is_a_file_exits_2_naming_it(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: str, where: str
) -> None:
    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor())
    file = tmp_path / "results"
    file.write_text("not a folder")
    storage = file if where == "file" else file / "sweep"
    result = runner.invoke(app, COMMANDS[command](str(write_spec(tmp_path)), str(storage)))
    assert result.exit_code == 2, result.output
    assert one_error_line(result.stderr).startswith(
        f"semicon-sweep: error: {storage}: not a folder"
    )
    assert file.read_text() == "not a folder"


def read_only(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``folder`` look read-only: the tests run as root, for whom chmod does not bite, so
    ``os.access`` is mocked."""
    real_access = os.access

    def access(path: object, mode: int) -> bool:
        if Path(str(path)) == folder and mode & os.W_OK:
            return False
        return real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)


def test_read_only_storage(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failed_sweep: Path
) -> None:
    (failed_sweep / "tables" / "trials.parquet").unlink()  # tabulate would rewrite the tables
    snapshot = {p: p.stat().st_mtime_ns for p in failed_sweep.rglob("*")}
    read_only(monkeypatch, failed_sweep)
    spec = str(tmp_path / "spec.yaml")
    for args in (
        COMMANDS["launch"](spec, str(failed_sweep)),
        COMMANDS["dry run"](spec, str(failed_sweep)),
    ):
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        assert f"{failed_sweep}: storage folder cannot be read and written" in one_error_line(
            result.stderr
        )
    plot = runner.invoke(app, ["plot", str(failed_sweep)])
    assert plot.exit_code == 2 and str(failed_sweep) in one_error_line(plot.stderr)
    assert runner.invoke(app, ["status", str(failed_sweep)]).exit_code == 0  # readers only read
    table = runner.invoke(app, ["tabulate", str(failed_sweep)])
    assert table.exit_code == 0 and "global" in table.stdout
    assert "read-only: tables built, not saved" in table.stderr
    assert {p: p.stat().st_mtime_ns for p in failed_sweep.rglob("*")} == snapshot


# ---- (c) grid size ----------------------------------------------------------------------------

MILLION = """
name: million
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: global
seed: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]
label_fraction: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
grid:
  stages.global.temperature: [0.01, 0.02, 0.03, 0.04, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1]
  stages.global.lr: [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01]
  stages.finetune.lr: [0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.007, 0.008, 0.009, 0.01]
  stages.finetune.batch_size: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]
"""


@pytest.mark.parametrize("dry_run", [True, False])
def test_a_million_point_grid_is_refused_at_once(
    runner: CliRunner, tmp_path: Path, dry_run: bool
) -> None:
    storage = tmp_path / "storage"
    args = ["launch", str(write_spec(tmp_path, MILLION)), "--storage", str(storage)]
    started = time.process_time()
    result = runner.invoke(app, args + (["--dry-run"] if dry_run else []))
    assert time.process_time() - started < 5  # counted, not built (about 15 ms a point)
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "grid: 1,000,000 trials, more than the limit of 10,000" in line
    assert "--allow-large-grid" in line
    assert not storage.exists()


def test_allowed_large_grid_dry_run_counts_without_building(
    runner: CliRunner, tmp_path: Path
) -> None:
    args = ["launch", str(write_spec(tmp_path, MILLION)), "--dry-run", "--allow-large-grid"]
    started = time.process_time()
    text = runner.invoke(app, args)
    as_json = runner.invoke(app, [*args, "--json"])
    assert time.process_time() - started < 5
    assert text.exit_code == 0 and text.stdout.startswith("1,000,000 trials over axes seed (10)")
    summary = json.loads(as_json.stdout)
    assert summary["trials"] == 10**6 and summary["planned"] is False
    assert summary["axes"]["stages.finetune.batch_size"] == 10


# ---- (d) checks that used to wait for Ray -----------------------------------------------------


@pytest.mark.parametrize("dry_run", [True, False])
@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("resources: {cpus_per_worker: 4096}\n", "resources.cpus_per_worker"),
        (
            "resources: {workers_per_trial: 4096, max_concurrent_trials: 1}\n",
            "resources.cpus_per_worker",
        ),
        ("tracking: {mlflow_uri: 'file:///tmp/x'}\n", "tracking.mlflow_uri"),
        ("tracking: {wandb: {project: p, mode: offline}}\n", "tracking.wandb"),
    ],
)
def test_checks_before_ray_exit_2_and_write_nothing(
    runner: CliRunner,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    dry_run: bool,
    extra: str,
    key: str,
) -> None:
    package = {"tracking.mlflow_uri": "mlflow", "tracking.wandb": "wandb"}.get(key)
    if package is not None and importlib.util.find_spec(package) is not None:
        pytest.skip(f"{package} is installed here: the tracking check passes")
    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor())
    storage = tmp_path / "storage"
    args = ["launch", str(write_spec(tmp_path, CLI_SPEC + extra)), "--storage", str(storage)]
    result = runner.invoke(app, args + (["--dry-run"] if dry_run else []))
    assert result.exit_code == 2, result.output
    assert f": {key}: " in one_error_line(result.stderr)
    assert not storage.exists()  # no sweep.json, no cache


def test_local_resources_only_bind_a_local_ray() -> None:
    check_local_resources(Resources(cpus_per_worker=2), None, cpus=2, gpus=0)
    check_local_resources(Resources(cpus_per_worker=64), "ray://head:10001", cpus=2, gpus=0)
    with pytest.raises(ClusterError, match="resources.gpus_per_worker: one stage node needs 1 GPU"):
        check_local_resources(Resources(gpus_per_worker=1), None, cpus=2, gpus=0)
    with pytest.raises(ClusterError, match="needs 4 CPU .* this machine has 2"):
        check_local_resources(
            Resources(workers_per_trial=2, cpus_per_worker=2), None, cpus=2, gpus=0
        )


# ---- (e) duplicate keys, (f) failed vs skipped ------------------------------------------------


def test_duplicate_spec_key_exits_2(runner: CliRunner, tmp_path: Path) -> None:
    spec = write_spec(tmp_path, CLI_SPEC + "seed: 3\n")
    result = runner.invoke(app, ["launch", str(spec), "--dry-run"])
    assert result.exit_code == 2
    assert one_error_line(result.stderr).endswith(f"{spec}: seed: written twice (lines 7 and 10)")


def test_status_names_the_failed_node_of_skipped_trials(
    runner: CliRunner, failed_sweep: Path
) -> None:
    result = runner.invoke(app, ["status", str(failed_sweep)])
    plan = build_plan(
        load_spec(failed_sweep.parent / "spec.yaml", overrides={"storage": str(failed_sweep)})
    )
    failed = next(k for k, n in plan.nodes.items() if n.stage == "global" and n.seed == 1)
    skipped = [line for line in result.stdout.splitlines() if " skipped: " in line]
    assert len(skipped) == 4
    assert all(
        f"skipped: global node {failed} failed: RuntimeError: injected" in s for s in skipped
    )
    assert not [
        line for line in result.stdout.splitlines() if " failed: " in line.split("skipped")[0]
    ]


def test_status_points_at_a_failed_nodes_traceback(runner: CliRunner, failed_sweep: Path) -> None:
    store = StageStore(failed_sweep)
    plan = build_plan(
        load_spec(failed_sweep.parent / "spec.yaml", overrides={"storage": str(failed_sweep)})
    )
    trial = next(t for t in plan.trials if store.is_complete(t.final_key))
    (store.node_dir(trial.final_key) / "COMPLETE").unlink()
    store.write_error(trial.final_key, "ValueError: boom", "Traceback (most recent call last):")
    result = runner.invoke(app, ["status", str(failed_sweep)])
    line = next(line for line in result.stdout.splitlines() if line.startswith(trial.trial_id))
    assert "failed:" in line and "ValueError: boom" in line
    assert line.endswith(f"(traceback: {store.traceback_path(trial.final_key)})")
