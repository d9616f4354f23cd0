"""One running owner per storage folder: the ``launch.lock`` file a launch holds while it runs.

Two launches into one folder would train the same node twice at once, append every epoch to
``epochs.jsonl`` twice and share one Ray Train checkpoint folder. ``acquire_lock(root)`` makes
the second one fail at once with ``SweepLocked`` (a bad-input error: one line naming the owner,
exit 2) before it writes anything.

Acquisition is atomic on a local disk and on NFS: the record is written to a temporary file in
the folder, then hard-linked to ``<root>/launch.lock`` (``os.link`` fails when the name exists,
so exactly one contender wins, and a reader never sees a half-written lock). The record names
the owner: ``host``, ``boot_id`` (Linux), ``pid``, ``pid_start`` (the process's start time in
clock ticks after boot, ``/proc/<pid>/stat`` field 22), ``started_at``, ``user``, ``argv`` and a
random ``token`` that tells the owner's own lock from a successor's.

Whether a lock left behind is stale (its launch was killed, e.g. ``kill -9``):

* **Same machine** (same host name and boot id): stale when the pid is not running, is a zombie,
  or is running but started at another time than recorded (the pid was reused by another
  process). A lock of a live owner is never taken over, ``--force-unlock`` or not: stop it first.
  Without ``/proc`` (macOS) only whether the pid runs is checked.
* **Another machine** (a shared cluster filesystem): its processes cannot be checked, so the
  owner touches the lock every ``HEARTBEAT_S`` seconds (a daemon thread), and a lock whose
  modification time is older than ``STALE_AFTER_S`` is stale. A launch killed on node A can thus
  be relaunched on node B a few minutes later, or at once with ``--force-unlock`` by someone who
  knows it is gone. The age is measured against this machine's clock, so the machines' clocks
  must agree to well within ``STALE_AFTER_S`` (NTP does). A suspended owner (``SIGSTOP``, a
  frozen VM) stops its heartbeat too and loses its lock after ``STALE_AFTER_S``.

A stale lock is taken over by renaming it to a unique name (one contender wins the rename),
checking that what was renamed is the lock judged stale (else it is put back: another contender
took over first), and then linking a new one. ``SweepLock.release`` removes the lock only while
it still holds this owner's token; the CLI releases it on a normal exit, on exceptions and on
SIGINT / SIGTERM (both arrive as ``KeyboardInterrupt``, ``orchestrator.session``). Readers
(``status``, ``tabulate``, ``plot``, ``launch --dry-run``) never take the lock; they may name
its owner (``read_owner``, ``describe_owner``).
"""

from __future__ import annotations

import contextlib
import getpass
import json
import os
import socket
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

LOCK_NAME = "launch.lock"
HEARTBEAT_S = 30.0  # the owner touches its lock this often
STALE_AFTER_S = 300.0  # another machine's lock untouched this long is stale (10 heartbeats)


class SweepLocked(ValueError):
    """Another launch holds the storage folder (one line naming it: host, pid, start time)."""


@dataclass(frozen=True)
class LockOwner:
    """What ``launch.lock`` records about the launch holding it."""

    host: str
    boot_id: str | None
    pid: int
    pid_start: int | None
    started_at: float
    user: str
    argv: tuple[str, ...]
    token: str

    @classmethod
    def of_this_process(cls) -> LockOwner:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            boot_id=boot_id(),
            pid=pid,
            pid_start=process_start(pid),
            started_at=time.time(),
            user=_user(),
            argv=tuple(sys.argv),
            token=uuid.uuid4().hex,
        )

    @classmethod
    def from_record(cls, record: Any) -> LockOwner | None:
        """The owner in a lock file's JSON record; None when it is not one."""
        if not isinstance(record, dict):
            return None
        try:
            return cls(
                host=str(record["host"]),
                boot_id=None if record.get("boot_id") is None else str(record["boot_id"]),
                pid=int(record["pid"]),
                pid_start=None if record.get("pid_start") is None else int(record["pid_start"]),
                started_at=float(record["started_at"]),
                user=str(record.get("user", "?")),
                argv=tuple(str(a) for a in record.get("argv", ())),
                token=str(record["token"]),
            )
        except (KeyError, TypeError, ValueError):
            return None

    def on_this_machine(self) -> bool:
        """Same host name and (where both know it) the same boot: its pid can be checked."""
        if self.host != socket.gethostname():
            return False
        here = boot_id()
        return self.boot_id is None or here is None or self.boot_id == here


def describe_owner(owner: LockOwner) -> str:
    """``host node1, pid 4242, started 2025-01-31 14:02:11`` (local time)."""
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(owner.started_at))
    return f"host {owner.host}, pid {owner.pid}, started {started}"


def boot_id() -> str | None:
    """This boot's id (Linux ``/proc/sys/kernel/random/boot_id``); None elsewhere."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or None
    except OSError:
        return None


def process_start(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks after boot (``/proc/<pid>/stat`` field 22);
    None without ``/proc``, when it does not exist, or when it is a zombie (it has exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and ")", so split after its last ")"
    fields = stat[stat.rfind(")") + 2 :].split()
    if not fields or fields[0] in ("Z", "X"):  # zombie / dead: exited, not yet reaped
        return None
    try:
        return int(fields[19])  # field 22 overall; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def pid_running(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (zombies count as gone)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    if Path("/proc").is_dir():
        return process_start(pid) is not None
    return True


def stale_reason(owner: LockOwner, lock_mtime: float, now: float | None = None) -> str | None:
    """Why ``owner``'s lock is stale (module docstring), in a few words; None while it holds."""
    if owner.on_this_machine():
        if not pid_running(owner.pid):
            return f"pid {owner.pid} is not running"
        start = process_start(owner.pid)
        if owner.pid_start is not None and start is not None and start != owner.pid_start:
            return f"pid {owner.pid} is now another process (started later)"
        return None
    age = (time.time() if now is None else now) - lock_mtime
    if age > STALE_AFTER_S:
        return f"no heartbeat for {age:.0f} s (> {STALE_AFTER_S:.0f} s)"
    return None


def lock_path(root: str | os.PathLike[str]) -> Path:
    """``<root>/launch.lock``."""
    return Path(root) / LOCK_NAME


def read_owner(root: str | os.PathLike[str]) -> LockOwner | None:
    """The owner recorded in ``<root>/launch.lock``; None when there is none (or unreadable)."""
    try:
        return LockOwner.from_record(json.loads(lock_path(root).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


class SweepLock:
    """A held ``launch.lock``; ``release()`` (or leaving its ``with`` block) gives it up."""

    def __init__(self, path: Path, owner: LockOwner, heartbeat_s: float | None) -> None:
        self.path = path
        self.owner = owner
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if heartbeat_s:
            self._thread = threading.Thread(
                target=self._beat, args=(heartbeat_s,), name="launch-lock-heartbeat", daemon=True
            )
            self._thread.start()

    def __enter__(self) -> SweepLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    @property
    def held(self) -> bool:
        """Whether ``launch.lock`` still holds this owner's token."""
        current = read_owner(self.path.parent)
        return current is not None and current.token == self.owner.token

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self.held:
                return  # taken over (this owner was judged stale) or removed
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this owner's (idempotent)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()


def acquire_lock(
    root: str | os.PathLike[str],
    force_unlock: bool = False,
    heartbeat_s: float | None = HEARTBEAT_S,
) -> SweepLock:
    """Take ``<root>/launch.lock`` (creating ``root``) or raise ``SweepLocked`` naming its owner.

    A stale lock is taken over (module docstring); ``force_unlock`` also takes over a lock of
    another machine whose heartbeat is fresh, never one of a running process on this machine.
    ``heartbeat_s``: how often the lock is touched while held (None: never; tests).
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    path = lock_path(root)
    owner = LockOwner.of_this_process()
    text = json.dumps({**asdict(owner), "argv": list(owner.argv)}, indent=2) + "\n"
    for _ in range(5):  # each round loses at most one race with another contender
        if _link_new(path, text):
            return SweepLock(path, owner, heartbeat_s)
        current, mtime = _read_lock(path)
        if current is None and mtime is None:
            continue  # released between our link and our read: try again
        if current is None:  # not a lock record (empty or damaged): only a person can judge
            if not force_unlock:
                raise SweepLocked(
                    f"{path}: holds no readable lock record; remove it, or relaunch with "
                    "--force-unlock, once no launch runs into this folder"
                )
        else:
            why = stale_reason(current, mtime or 0.0)
            if why is None and (current.on_this_machine() or not force_unlock):
                raise SweepLocked(_refusal(path.parent, current, mtime or 0.0))
        _take_over(path, current)
    raise SweepLocked(f"{path}: other launches keep taking this folder; try again")


def _refusal(root: Path, owner: LockOwner, mtime: float) -> str:
    where = f"{root} is in use by a running launch ({describe_owner(owner)})"
    if owner.on_this_machine():
        return f"{where}; wait for it to finish or stop it (kill {owner.pid}), then relaunch"
    age = max(0.0, time.time() - mtime)
    return (
        f"{where}; its heartbeat is {age:.0f} s old: it counts as gone after "
        f"{STALE_AFTER_S:.0f} s, or relaunch with --force-unlock if you know it is gone"
    )


def _link_new(path: Path, text: str) -> bool:
    """Atomically create ``path`` holding ``text``; False when it already exists."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _read_lock(path: Path) -> tuple[LockOwner | None, float | None]:
    """The lock's owner and modification time; (None, None) when there is no lock file."""
    try:
        mtime = path.stat().st_mtime
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    try:
        return LockOwner.from_record(json.loads(text)), mtime
    except ValueError:
        return None, mtime


def _take_over(path: Path, judged: LockOwner | None) -> None:
    """Move the stale lock ``judged`` out of the way; put back what turns out to be another."""
    aside = path.with_name(f".{path.name}.{uuid.uuid4().hex}.stale")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return  # another contender moved it first
    moved, _ = _read_lock(aside)
    same = (moved is None and judged is None) or (
        moved is not None and judged is not None and moved.token == judged.token
    )
    if not same:  # a fresh lock linked after our read: restore it unless another one exists
        with contextlib.suppress(FileExistsError):
            os.link(aside, path)
    aside.unlink()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid()) if hasattr(os, "getuid") else "?"
