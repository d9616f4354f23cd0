"""Fault injection: what a sweep does when its world breaks under it.

Fast (no Ray): a complete sweep's relaunch never starts Ray; a Tune run that dies part-way
(Ray lost a node, an actor, its GCS) still ends with tables that give every trial's status and
error. Slow (Ray): random ``kill -9`` of the driver and of Train workers, over and over, then a
relaunch whose tables equal an uninterrupted run's exactly.

The rest of the battery lives beside the code it checks: corrupted and missing store files
(test_store, test_cli_checks), concurrent launches (test_lock), read-only and file-as-directory
storage (test_cli_checks), signals (test_execute), and every bad input the CLI answers with
exit 2 (test_bad_inputs, which also writes docs/BAD_INPUTS.md).
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from orchestrator import execute
from orchestrator.cli import app
from orchestrator.plan import Plan, build_plan
from orchestrator.spec import load_spec
from orchestrator.store import StageStore
from orchestrator.tables import paper_table, render_table
from tests.orchestrator.conftest import ray_test_env
from tests.orchestrator.specs import write_spec
from tests.orchestrator.test_execute import REPO_ROOT
from tests.orchestrator.test_execute import write_spec as write_tiny_spec


def _plan(tmp_path: Path) -> Plan:
    spec_path = write_spec(tmp_path)
    return build_plan(load_spec(spec_path, overrides={"storage": str(tmp_path / "storage")}))


def _complete(store: StageStore, plan: Plan, key: str) -> None:
    store.write_node(plan.nodes[key])
    store.write_result(key, {"w": torch.zeros(1)}, {"test_dice_pooled_mean": 0.5, "wall_s": 1.0})


@contextlib.contextmanager
def _no_ray(address: str | None) -> Iterator[None]:
    raise AssertionError("Ray was started")
    yield  # pragma: no cover


def test_relaunch_of_a_complete_sweep_starts_no_ray(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plan = _plan(tmp_path)
    store = StageStore(plan.spec.storage)
    store.claim_sweep(plan.spec, plan=plan)
    for key in plan.nodes:
        _complete(store, plan, key)
    monkeypatch.setattr(execute, "ray_session", _no_ray)
    lines: list[str] = []
    outcome = execute.run_sweep(plan, store, progress=lines.append)
    assert sorted(outcome.already_complete) == sorted(plan.nodes)
    assert outcome.completed == [] and outcome.failed == {} and outcome.skipped == {}
    assert "0 nodes completed, 14 already complete" in lines[-1]


def test_a_tune_run_that_dies_still_ends_with_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The Tune run raises after one node completed (as when Ray loses the node holding the
    sweep's actors): the launch exits 1 with tables in which every trial has a status, the
    never-finished ones failed or skipped with the Ray error, and a relaunch would run them."""
    plan = _plan(tmp_path)
    store = StageStore(plan.spec.storage)
    first = plan.levels[0][0]

    def dying_tune(plan: Plan, store: StageStore, scheduler, payload, progress, started):  # noqa: ANN001
        _complete(store, plan, first)
        raise RuntimeError("ActorDiedError: the actor died because its node died")

    monkeypatch.setattr(execute, "ray_session", lambda address: contextlib.nullcontext())
    monkeypatch.setattr(execute, "_run_tune", dying_tune)
    result = CliRunner().invoke(
        app, ["launch", str(tmp_path / "spec.yaml"), "--storage", str(store.root)]
    )
    assert result.exit_code == 1, result.stderr
    assert "sweep interrupted by a Ray error: RuntimeError: ActorDiedError" in result.stderr
    trials = pd.read_parquet(store.tables_dir / "trials.parquet")
    assert len(trials) == len(plan.trials)
    assert set(trials["status"]) == {"failed", "skipped"}
    assert trials["error"].str.contains("ActorDiedError").all()
    assert store.is_complete(first)
    assert "ActorDiedError" in store.traceback_path(plan.levels[0][1]).read_text()
    assert "1 nodes completed" in result.stderr


# --------------------------------------------------------------------------------------------
# slow: kill -9 over and over


def _train_workers() -> list[int]:
    """Pids of live Ray Train worker processes (their command line names the actor class)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(b"ray::RayTrainWorker"):
                pids.append(int(entry.name))
    return pids


def _epochs_recorded(store: StageStore, plan: Plan) -> int:
    return sum(len(store.read_epochs(key)) for key in plan.nodes)


def _wait_until_released(timeout: float = 60) -> None:
    """A killed driver's trial, Train controller and workers go with its job: wait for their
    CPUs to come back to the session's Ray."""
    import ray

    deadline = time.monotonic() + timeout
    while (
        ray.available_resources().get("CPU", 0) < ray.cluster_resources()["CPU"]
        and time.monotonic() < deadline
    ):
        time.sleep(0.5)


METRICS = [
    "status",
    "test_dice_pooled_mean",
    "test_dice_volume_mean",
    "val_dice_pooled_mean",
    "val_dice_volume_mean",
]


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("nodes_per_run", [1, 4], ids=["bundling-off", "bundling-on"])
def test_random_kills_then_relaunch_equal_an_uninterrupted_run(
    ray_cluster: str, tmp_path: Path, nodes_per_run: int
) -> None:
    """At least 5 ``kill -9`` at random moments, in turn of a Train worker (Train restarts the
    worker group from the last checkpoint) and of the driver (then relaunched), until the sweep
    completes; its trials table equals an uninterrupted run's exactly, and no node ran twice to
    completion. With bundling on, the two fine-tunings (one from random init, one after the
    global stage) run in one Train run once the global node is complete, resuming from their
    resume points in the store."""
    rng = random.Random(20261130)
    spec_path = write_tiny_spec(
        tmp_path,
        "chaos",
        method=["random", "global"],
        label_fraction=0.5,
        # bundled nodes start no Train run of their own, so the sweep is quicker: more epochs
        # leave room for the kills
        stages={
            "global": {"epochs": 4},
            "finetune": {"epochs": 6 if nodes_per_run == 1 else 16, "batch_size": 4},
        },
        resources={"max_concurrent_trials": 1, "max_failures": 20, "nodes_per_run": nodes_per_run},
    )
    command = [sys.executable, "-m", "orchestrator", "launch", str(spec_path)]
    command += ["--address", ray_cluster]
    env = {**os.environ, **ray_test_env()}

    reference = tmp_path / "reference"
    done = subprocess.run(
        [*command, "--storage", str(reference)], cwd=REPO_ROOT, env=env, capture_output=True
    )
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    want = pd.read_parquet(reference / "tables" / "trials.parquet")
    # stdout carries the CLI's own output alone: the table, none of Ray's lines
    assert done.stdout.decode() == render_table(paper_table(want), "text")

    storage = tmp_path / "storage"
    plan = build_plan(load_spec(spec_path, overrides={"storage": str(storage)}))
    store = StageStore(storage)
    kills: list[str] = []
    log = tmp_path / "launch.log"
    for _launch in range(12):
        with log.open("wb") as out:
            driver = subprocess.Popen(
                [*command, "--storage", str(storage)],
                cwd=REPO_ROOT,
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=out,
            )
        while driver.poll() is None:
            # wait for training to progress past the last kill, then strike at a random moment
            seen = _epochs_recorded(store, plan)
            deadline = time.monotonic() + 240
            while (
                driver.poll() is None
                and _epochs_recorded(store, plan) <= seen
                and time.monotonic() < deadline
            ):
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            if driver.poll() is not None or len(kills) >= 8:
                continue
            # alternate the target; a worker is looked for for up to 3 s (between two nodes
            # there is none), else the driver goes
            workers = _train_workers()
            patience = time.monotonic() + 3
            while len(kills) % 2 == 0 and not workers and time.monotonic() < patience:
                time.sleep(0.05)
                workers = _train_workers()
            if len(kills) % 2 == 0 and workers:
                os.kill(rng.choice(workers), signal.SIGKILL)
                kills.append("worker")
            else:
                driver.send_signal(signal.SIGKILL)
                kills.append("driver")
        driver.wait(timeout=30)
        err = log.read_text()
        if driver.returncode == 0:
            break
        assert driver.returncode == -signal.SIGKILL, err[-2000:]
        _wait_until_released()
    assert driver.returncode == 0, err[-2000:]
    assert len(kills) >= 5, f"only {len(kills)} kills ({kills}): the sweep finished too fast"
    assert kills.count("driver") >= 2 and kills.count("worker") >= 2, kills
    print(f"kills: {kills}")

    got = pd.read_parquet(storage / "tables" / "trials.parquet")
    pd.testing.assert_frame_equal(got[["trial_id", *METRICS]], want[["trial_id", *METRICS]])
    for key in plan.nodes:
        epochs = [record["epoch"] for record in store.read_epochs(key)]
        assert epochs == sorted(set(epochs)), f"node {key} recorded an epoch twice: {epochs}"
