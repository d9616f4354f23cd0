"""One running owner per storage folder (``orchestrator.lock``), without Ray: the lock API
directly, a lock held by another live process, stale locks (dead pid, reused pid, another
machine's old heartbeat), and ``launch`` refusing a held folder with the executor faked."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.lock import (
    STALE_AFTER_S,
    LockOwner,
    SweepLocked,
    acquire_lock,
    lock_path,
    process_start,
    read_owner,
)
from tests.orchestrator.conftest import REPO_ROOT
from tests.orchestrator.specs import write_spec
from tests.orchestrator.test_cli import fake_executor, one_error_line


def write_lock(root: Path, **changes: object) -> LockOwner:
    """A lock record of this process with ``changes`` (another pid, host, start), written as a
    launch would have left it."""
    owner = dataclasses.replace(LockOwner.of_this_process(), **changes)
    root.mkdir(parents=True, exist_ok=True)
    record = {**dataclasses.asdict(owner), "argv": list(owner.argv)}
    lock_path(root).write_text(json.dumps(record))
    return owner


def test_second_acquisition_in_one_process_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    with acquire_lock(root, heartbeat_s=None) as held:
        assert read_owner(root) == held.owner
        with pytest.raises(SweepLocked) as err:
            acquire_lock(root, heartbeat_s=None)
        message = str(err.value)
        assert f"pid {os.getpid()}" in message and f"host {held.owner.host}" in message
        assert "started " in message and f"kill {os.getpid()}" in message
        with pytest.raises(SweepLocked):  # a live owner is not forced out
            acquire_lock(root, force_unlock=True, heartbeat_s=None)
    assert not lock_path(root).exists()
    acquire_lock(root, heartbeat_s=None).release()  # free again


def test_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), acquire_lock(tmp_path, heartbeat_s=None):
        assert lock_path(tmp_path).is_file()
        raise RuntimeError("boom")
    assert not lock_path(tmp_path).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temp files left


def test_release_leaves_a_successors_lock(tmp_path: Path) -> None:
    held = acquire_lock(tmp_path, heartbeat_s=None)
    successor = write_lock(tmp_path, token="someone-else")
    held.release()
    assert read_owner(tmp_path) == successor


HOLDER = """
import sys, time
from orchestrator.lock import acquire_lock
lock = acquire_lock(sys.argv[1], heartbeat_s=None)
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_of_a_live_process_refused_then_taken_over_once_it_is_killed(tmp_path: Path) -> None:
    root = tmp_path / "storage"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        with pytest.raises(SweepLocked, match=f"pid {holder.pid}, started "):
            acquire_lock(root, heartbeat_s=None)
        os.kill(holder.pid, signal.SIGKILL)  # kill -9: nothing released
        deadline = time.monotonic() + 10
        while process_start(holder.pid) is not None and time.monotonic() < deadline:
            time.sleep(0.05)  # a zombie until reaped: it already counts as gone
        assert lock_path(root).is_file()
        with acquire_lock(root, heartbeat_s=None) as taken:
            assert read_owner(root) == taken.owner
    finally:
        holder.kill()
        holder.wait(timeout=10)
    assert not [p for p in root.iterdir() if p.name != "launch.lock"]  # nothing set aside left


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    code = "import os; print(os.getpid())"
    gone = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    write_lock(tmp_path, pid=int(gone.stdout), token="dead")
    with acquire_lock(tmp_path, heartbeat_s=None) as held:
        assert read_owner(tmp_path) == held.owner


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_reused_pid_is_not_mistaken_for_the_owner(tmp_path: Path) -> None:
    """The recorded pid runs, but started at another time: another process got that pid."""
    start = process_start(os.getpid())
    assert start is not None
    write_lock(tmp_path, pid_start=start - 1, token="older")
    with acquire_lock(tmp_path, heartbeat_s=None) as held:
        assert held.owner.token != "older"


def test_another_machines_lock_waits_for_its_heartbeat_to_age(tmp_path: Path) -> None:
    write_lock(tmp_path, host="node-elsewhere", pid=1, token="remote")
    with pytest.raises(SweepLocked) as err:
        acquire_lock(tmp_path, heartbeat_s=None)
    assert "host node-elsewhere, pid 1" in str(err.value) and "--force-unlock" in str(err.value)
    old = time.time() - STALE_AFTER_S - 5
    os.utime(lock_path(tmp_path), (old, old))  # the owner stopped touching it
    with acquire_lock(tmp_path, heartbeat_s=None) as held:
        assert read_owner(tmp_path) == held.owner


def test_force_unlock_takes_over_another_machines_fresh_lock(tmp_path: Path) -> None:
    write_lock(tmp_path, host="node-elsewhere", pid=1, token="remote")
    with acquire_lock(tmp_path, force_unlock=True, heartbeat_s=None) as held:
        assert read_owner(tmp_path) == held.owner


def test_owner_heartbeat_touches_the_lock(tmp_path: Path) -> None:
    with acquire_lock(tmp_path, heartbeat_s=0.05):
        old = time.time() - 1000
        os.utime(lock_path(tmp_path), (old, old))
        deadline = time.monotonic() + 5
        while lock_path(tmp_path).stat().st_mtime < old + 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert lock_path(tmp_path).stat().st_mtime > time.time() - 60
    assert not lock_path(tmp_path).exists()


def test_unreadable_lock_is_left_to_a_person(tmp_path: Path) -> None:
    lock_path(tmp_path).write_text("")
    with pytest.raises(SweepLocked, match="no readable lock record"):
        acquire_lock(tmp_path, heartbeat_s=None)
    acquire_lock(tmp_path, force_unlock=True, heartbeat_s=None).release()


def test_process_start_skips_spaces_and_parens_in_the_command_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stat = "123 (a b) c) S 1 " + " ".join(str(n) for n in range(5, 22)) + " 987654 0 0\n"
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        return stat if str(self) == "/proc/123/stat" else real_read(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    assert process_start(123) == 987654
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: stat.replace(" S ", " Z "))
    assert process_start(123) is None  # a zombie has exited


# ---- through launch ---------------------------------------------------------------------------


def test_launch_into_a_held_folder_exits_2_naming_the_owner_and_writes_nothing(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "orchestrator.execute", fake_executor())
    storage = tmp_path / "storage"
    args = ["launch", str(write_spec(tmp_path)), "--storage", str(storage)]
    with acquire_lock(storage, heartbeat_s=None) as held:
        result = runner.invoke(app, args)
        assert result.exit_code == 2
        line = one_error_line(result.stderr)
        assert line.startswith(f"semicon-sweep: error: {storage} is in use by a running launch")
        assert f"host {held.owner.host}, pid {os.getpid()}, started " in line
        assert sorted(p.name for p in storage.iterdir()) == ["launch.lock"]  # nothing written

        dry = runner.invoke(app, [*args, "--dry-run"])  # readers go on, naming the owner
        assert dry.exit_code == 0
        assert f"{storage} is in use by a launch (host {held.owner.host}" in dry.stderr
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert not lock_path(storage).exists()  # released after a normal run

    with acquire_lock(storage, heartbeat_s=None):
        status = runner.invoke(app, ["status", str(storage)])
        assert status.exit_code == 0 and "is in use by a launch" in status.stderr
        assert runner.invoke(app, ["tabulate", str(storage)]).exit_code == 0


def test_launch_holds_the_lock_while_it_runs_and_releases_it_when_interrupted(
    runner: CliRunner, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module = fake_executor()
    seen: list[LockOwner | None] = []

    def interrupted(plan, store, **kwargs) -> None:
        seen.append(read_owner(store.root))
        raise KeyboardInterrupt

    module.run_sweep = interrupted  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "orchestrator.execute", module)
    storage = tmp_path / "storage"
    result = runner.invoke(app, ["launch", str(write_spec(tmp_path)), "--storage", str(storage)])
    assert result.exit_code == 130, result.output
    assert seen[0] is not None and seen[0].pid == os.getpid()
    assert not lock_path(storage).exists()


def test_launch_released_by_sigterm_in_a_real_process(tmp_path: Path) -> None:
    """A launch stopped by SIGTERM (the executor faked, sleeping) leaves no lock behind."""
    spec, storage = write_spec(tmp_path), tmp_path / "storage"
    code = textwrap.dedent(
        f"""
        import sys, time, types
        module = types.ModuleType("orchestrator.execute")
        module.ClusterError = type("ClusterError", (ValueError,), {{}})
        def run_sweep(plan, store, **kwargs):
            print("running", flush=True)  # the launch sends the sweep's stdout to stderr
            time.sleep(60)
        module.run_sweep = run_sweep
        sys.modules["orchestrator.execute"] = module
        from orchestrator.cli import app
        app(["launch", {str(spec)!r}, "--storage", {str(storage)!r}], prog_name="semicon-sweep")
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", code],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stderr is not None and proc.stderr.readline() == "running\n"
        assert read_owner(storage) is not None and read_owner(storage).pid == proc.pid
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted (SIGTERM)" in stderr
    assert not lock_path(storage).exists()
