"""One Ray instance for every Ray test of the session (starting Ray costs 3-6 s on 2 cores).

``ray_cluster`` starts a local Ray once (4 logical CPUs: two concurrent 1-CPU trials plus room,
no dashboard, a 256 MiB object store, worker logs kept off the terminal) and yields its GCS
address, which subprocess drivers (``semicon-sweep launch --address ...``) join. The quiet
environment variables and ``PYTHONPATH`` (the checkout, so Ray's worker processes import
``orchestrator`` and ``trainers`` however pytest was started) are set before Ray starts, since
workers inherit the raylet's environment, and restored at the end.

A ``ray.cluster_utils.Cluster`` cannot share a process with this instance: tests needing
several simulated nodes run them in a subprocess.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

REPO_ROOT = Path(__file__).resolve().parents[2]

RAY_TEST_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
    # Train's controller collects reports on this poll (default 2 s), pacing tiny test epochs
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2",
}


def ray_test_env() -> dict[str, str]:
    """The environment for Ray test processes: quiet settings and the checkout on PYTHONPATH."""
    path = os.environ.get("PYTHONPATH", "")
    parts = [str(REPO_ROOT), *[p for p in path.split(os.pathsep) if p and p != str(REPO_ROOT)]]
    return {**RAY_TEST_ENV, "PYTHONPATH": os.pathsep.join(parts)}


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[str]:
    """A session-wide local Ray (4 logical CPUs); yields its address for subprocess drivers."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        raise RuntimeError("ray_cluster: Ray is already initialised in this test process")
    saved = {name: os.environ.get(name) for name in [*ray_test_env(), "RAY_ADDRESS"]}
    os.environ.update(ray_test_env())
    os.environ.pop("RAY_ADDRESS", None)
    # a private temp dir: ray.init() would otherwise join a cluster recorded in /tmp/ray (a
    # `ray start` cluster or a simulated one), and nothing else finds this one
    temp_dir = tempfile.mkdtemp(prefix="semicon-ray-test-")
    try:
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            object_store_memory=256 << 20,
            log_to_driver=False,
            logging_level="WARNING",
            _temp_dir=temp_dir,
        )
        yield ray.get_runtime_context().gcs_address
    finally:
        if ray.is_initialized():
            ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@pytest.fixture
def runner() -> CliRunner:
    """A Typer test runner (stdout and stderr apart) for the CLI tests."""
    return CliRunner()
