"""The Ray session of a sweep: checking a cluster address, connecting (or starting Ray), and the
environment a sweep runs in (quiet Ray, and the ``RAY_TRAIN_*`` settings forwarded to every
Train job). Nothing here knows about plans or stages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

# Set (unless the user set them) while a sweep runs. The first two reach Ray's worker processes
# only when this process starts Ray (they inherit the raylet's environment).
QUIET_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS": "0",
    "RAY_AIR_NEW_OUTPUT": "0",  # Tune's legacy reporter: silent at verbose=0, the new one is not
    "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",  # loggers are listed by orchestrator.tracking
    "TUNE_DISABLE_SIGINT_HANDLER": "1",  # Ctrl+C stops the whole sweep at once
}

# A sweep's own Ray lives in a fresh temp dir named so: Ray looks for "the current cluster" in
# its temp dir, so a plain ray.init() elsewhere (another sweep, a test suite) never finds it, and
# this sweep never joins a cluster that `ray start` or ray.cluster_utils recorded in /tmp/ray.
PRIVATE_TEMP_PREFIX = "semicon-"  # short: Ray's socket paths under it must stay < 108 bytes
CONNECT_TIMEOUT_S = 5.0
DEFAULT_RAY_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"  # Ray's default is 2 s; see train_env()


class ClusterError(ValueError):
    """The Ray cluster address is invalid or unreachable (one-line message naming it)."""


class SweepInterrupted(KeyboardInterrupt):
    """SIGTERM reached the driver while a sweep ran (SIGINT is Python's own KeyboardInterrupt).
    Both unwind through ``ray_session``, which shuts down a Ray the sweep started. Tune may
    re-raise a plain KeyboardInterrupt on the way: ``interrupting_signal`` tells them apart."""


_RECEIVED: list[int] = []  # SIGTERMs seen by sigterm_as_interrupt in this process


def interrupting_signal() -> signal.Signals:
    """The signal behind the KeyboardInterrupt being handled: SIGTERM if one arrived during a
    sweep, else SIGINT."""
    return signal.Signals(_RECEIVED[-1]) if _RECEIVED else signal.SIGINT


def _probe_target(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for ``address``; None when Ray resolves it itself ("auto")."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        return _probe_target(env) if env and env != "auto" else None
    if "://" in address:
        parts = urlsplit(address)
        if parts.scheme != "ray" or not parts.hostname:
            raise ClusterError(
                f"invalid Ray address {address!r}: expected host:port, ray://host:port or auto"
            )
        try:
            port = parts.port or DEFAULT_CLIENT_PORT
        except ValueError:
            raise ClusterError(f"invalid Ray address {address!r}: bad port") from None
        return parts.hostname, port
    host, sep, port_text = address.rpartition(":")
    if not sep:
        host, port_text = address, str(DEFAULT_RAY_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterError(
            f"invalid Ray address {address!r}: expected host:port, ray://host:port or auto"
        )
    return host.strip("[]"), int(port_text)


def check_address(address: str, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
    """Raise ``ClusterError`` unless ``address`` parses and accepts a TCP connection in time.

    ``ray.init(address=...)`` on an unreachable address retries for a long time; this probe
    fails in at most ``timeout_s`` seconds. Writes nothing.
    """
    target = _probe_target(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout_s) as conn:
            speaks_grpc = _answers_http2(conn)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, TimeoutError | socket.timeout):
            reason = f"no answer within {timeout_s:g} s"
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {reason}") from None
    if not speaks_grpc:
        # ray.init would retry for minutes, printing Ray's C++ connection warnings
        raise ClusterError(
            f"{address} answers but is not a Ray cluster (no gRPC there): check the host and port"
        )


# The HTTP/2 client preface and an empty SETTINGS frame: a gRPC server (Ray's GCS, the Ray
# Client server) answers with a SETTINGS frame (frame type 4 in the 4th byte of its header).
_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"


def _answers_http2(conn: socket.socket) -> bool:
    """Whether the server behind ``conn`` answers the HTTP/2 preface with a SETTINGS frame."""
    conn.sendall(_HTTP2_PREFACE)
    header = b""
    while len(header) < 9:
        chunk = conn.recv(9 - len(header))
        if not chunk:
            return False
        header += chunk
    return header[3] == 0x04


def system_temp_dir() -> Path:
    """Where Ray keeps its temp dirs on this machine (Ray's own rule: RAY_TMPDIR, then TMPDIR
    on Linux, else /tmp on Linux and macOS)."""
    if os.environ.get("RAY_TMPDIR"):
        return Path(os.environ["RAY_TMPDIR"])
    if sys.platform.startswith("linux") and os.environ.get("TMPDIR"):
        return Path(os.environ["TMPDIR"])
    if sys.platform.startswith(("linux", "darwin")):
        return Path("/tmp")
    return Path(tempfile.gettempdir())


def resolve_address(address: str) -> str:
    """``address`` with "auto" made explicit: ``RAY_ADDRESS``, else the shared cluster that
    ``ray start --head`` recorded in Ray's default temp dir. Ray's own "auto" also joins any
    Ray process it finds on the machine, which may be another sweep's private instance (gone
    when that sweep ends); this never does. ``ClusterError`` when there is no shared cluster."""
    if address != "auto":
        return address
    env = os.environ.get("RAY_ADDRESS", "")
    if env and env != "auto":
        return env
    record = system_temp_dir() / "ray" / "ray_current_cluster"
    try:
        recorded = record.read_text(encoding="utf-8").strip()
    except OSError:
        recorded = ""
    if not recorded:
        raise ClusterError(
            "--address auto: no shared Ray cluster on this machine (start one with "
            "`ray start --head` or set RAY_ADDRESS); another sweep's own Ray is never joined"
        )
    return recorded


def connect_ray(address: str | None) -> Path | None:
    """Make sure this process is connected to Ray; returns the private temp dir of a Ray it
    started itself (to remove after ``ray.shutdown()``), else None.

    ``address`` None: start a private local Ray in a fresh ``PRIVATE_TEMP_PREFIX`` temp dir
    (no dashboard: the sweep uses no early stopping, the one feature whose cleanup needs the
    State API), ignoring ``RAY_ADDRESS``; otherwise join the cluster at ``address`` ("auto":
    ``resolve_address``) after a quick reachability check. A process already connected (e.g. a
    test session) keeps its connection. Connection failures raise ``ClusterError``.
    """
    import ray

    if address is not None:
        address = resolve_address(address)
        check_address(address)
    if ray.is_initialized():
        return None
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    temp_dir: Path | None = None
    try:
        if address is None:
            temp_dir = Path(tempfile.mkdtemp(prefix=PRIVATE_TEMP_PREFIX, dir=system_temp_dir()))
            with _without_env("RAY_ADDRESS"):
                ray.init(include_dashboard=False, _temp_dir=str(temp_dir), **options)
        else:
            ray.init(address=address, **options)
    except (OSError, RuntimeError, ValueError) as err:  # OSError: e.g. a socket path too long
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = address if address is not None else "a local Ray instance"
        raise ClusterError(f"cannot connect to {where}: {first}") from None
    return temp_dir


@contextlib.contextmanager
def _without_env(name: str) -> Iterator[None]:
    saved = os.environ.pop(name, None)
    try:
        yield
    finally:
        if saved is not None:
            os.environ[name] = saved


@contextlib.contextmanager
def quiet_ray_loggers(names: tuple[str, ...] = ("ray", "ray.tune", "ray.train")) -> Iterator[None]:
    """Raise Ray's Python loggers to WARNING (Tune logs every result-file write at INFO)."""
    levels = {name: logging.getLogger(name).level for name in names}
    for name in names:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


@contextlib.contextmanager
def quiet_ray_env(values: Mapping[str, str] = QUIET_ENV) -> Iterator[None]:
    """Set ``values`` in ``os.environ`` where unset, restoring the environment afterwards."""
    added = [name for name in values if name not in os.environ]
    for name in added:
        os.environ[name] = values[name]
    try:
        yield
    finally:
        for name in added:
            os.environ.pop(name, None)


def train_env() -> dict[str, str]:
    """The driver's ``RAY_TRAIN_*`` settings, forwarded to every node's Train job.

    Ray Train reads them in its controller (which inherits them from the trial). One matters
    for throughput: ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, the poll on which the controller
    collects each worker's report; a worker's next report waits for it, so with Ray's 2 s
    default, epochs shorter than about 2 s are paced by the poll (benchmarks/README.md,
    bench_ray_stage: 0.4 s epochs gave 77 slices/s at a 2 s poll, 242 at 0.5 s). Unless set,
    sweeps use ``TRAIN_POLL_S``, and workers report epochs without a checkpoint or validation
    at most once per poll interval of training (``orchestrator.worker.ReportThrottle``).
    """
    env = {TRAIN_POLL_ENV: TRAIN_POLL_S}
    env.update({name: value for name, value in os.environ.items() if name.startswith("RAY_TRAIN_")})
    return env


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM raises ``SweepInterrupted`` in the main thread for the block (replacing Ray's
    own handler, which exits with a crash dump and leaves the sweep's Ray behind)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: Any) -> None:
        _RECEIVED.append(signum)
        raise SweepInterrupted()

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[None]:
    """Quiet Ray, connected to ``address`` (see ``connect_ray``) for the block; a Ray started
    here is shut down at its end and its private temp dir removed."""
    with quiet_ray_env(), quiet_ray_loggers():
        private = connect_ray(address)
        try:
            with sigterm_as_interrupt():
                yield
        finally:
            if private is not None:
                import ray

                ray.shutdown()
                shutil.rmtree(private, ignore_errors=True)
