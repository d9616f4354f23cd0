"""The Ray session of a sweep: checking a cluster address, connecting (or starting Ray), and the
environment a sweep runs in (quiet Ray, and the ``RAY_TRAIN_*`` settings forwarded to every
Train job). Nothing here knows about plans or stages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
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

CONNECT_TIMEOUT_S = 5.0
DEFAULT_RAY_PORT = 6379
DEFAULT_CLIENT_PORT = 10001
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"  # Ray's default is 2 s; see train_env()


class ClusterError(ValueError):
    """The Ray cluster address is invalid or unreachable (one-line message naming it)."""


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
        with socket.create_connection(target, timeout=timeout_s):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if isinstance(err, TimeoutError | socket.timeout):
            reason = f"no answer within {timeout_s:g} s"
        raise ClusterError(f"cannot reach the Ray cluster at {address}: {reason}") from None


def connect_ray(address: str | None) -> bool:
    """Make sure this process is connected to Ray; returns True when it started Ray itself.

    ``address`` None: start a local Ray (no dashboard: the sweep uses no early stopping, the
    one feature whose cleanup needs the State API); otherwise join the cluster at ``address``
    after a quick reachability check. A process already connected (e.g. a test session) keeps
    its connection. Connection failures raise ``ClusterError``.
    """
    import ray

    if address is not None:
        check_address(address)
    if ray.is_initialized():
        return False
    options: dict[str, Any] = {"log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address is None:
            ray.init(include_dashboard=False, **options)
        else:
            ray.init(address=address, **options)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = address if address is not None else "a local Ray instance"
        raise ClusterError(f"cannot connect to {where}: {first}") from None
    return True


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
def ray_session(address: str | None) -> Iterator[None]:
    """Quiet Ray, connected to ``address`` (see ``connect_ray``) for the block; a Ray started
    here is shut down at its end."""
    with quiet_ray_env(), quiet_ray_loggers():
        started = connect_ray(address)
        try:
            yield
        finally:
            if started:
                import ray

                ray.shutdown()
