"""Run a planned sweep on Ray: one Ray Tune run for the whole stage DAG, one Ray Train job per node.

``run_sweep(plan, store)`` takes every node of the plan that is not ``COMPLETE`` in the store
and runs them as one Tune experiment whose search algorithm is the DAG itself
(``DagScheduler`` inside a Tune ``Searcher``): a node is suggested as soon as its parent is
complete (no barrier between depths: a level-0 fine-tuning does not hold back the children of
a finished pretraining), the ready node with the most descendants first, and a failed node's
descendants are skipped with the reason::

    Tuner(with_resources(with_parameters(node_trial, payload=...), TRIAL_DRIVER_RESOURCES),
          tune_config=TuneConfig(search_alg=DagSearcher, num_samples=<nodes>,
                                 max_concurrent_trials=n),
          run_config=RunConfig(name="sweep-<hash>", storage_path=<storage>/ray, ...))

Each Tune trial (``node_trial``) is only the driver of a Ray Train job: it builds a
``TorchTrainer(orchestrator.worker.train_node, ScalingConfig(num_workers=workers_per_trial,
resources_per_worker={"CPU": c, "GPU": g}), RunConfig(name=<node key>, storage_path=
<storage>/ray/train, callbacks=[TuneReportCallback()]))`` and calls ``fit()``. The workers get
their own placement group, which Tune does not count, so the trial itself asks for no CPU (one
byte of memory: Tune refuses an empty request) and ``max_concurrent_trials`` is derived from the
cluster's resources:

    n = min(floor(cluster CPUs / (workers_per_trial * cpus_per_worker)),
            floor(cluster GPUs / (workers_per_trial * gpus_per_worker))   [when GPUs are used],
            nodes to run)

unless ``resources.max_concurrent_trials`` is set (e.g. for an autoscaling cluster).

Failures: a worker that raises is restarted by Train from its last checkpoint up to
``resources.max_failures`` times; when Train gives up, the trial writes a one-line message to
``stages/<key>/error.txt``, reports ``node_status: failed`` to Tune and ends normally, and the
sweep goes on with the other nodes (a failed node's children are skipped, with the reason). A
crashed trial *driver* (e.g. its node lost) is retried by Tune up to ``max_failures`` times; the
new driver's Train run has the same name, so it resumes from the same checkpoints.

Resume = relaunch: a ``COMPLETE`` node is never run again; an interrupted node's Train run
folder (``<storage>/ray/train/<key>``) still holds its checkpoints, so the new Train run of the
same name continues from the last one (the worker drops the epoch records after it). Once a
node is complete its Train checkpoints are deleted (its result lives in the stage store).

Reports: each worker calls ``ray.train.report`` for every checkpoint epoch and otherwise at
most once per poll interval (``orchestrator.worker.ReportThrottle``); Train's controller
collects them on its health-check poll, which sweeps shorten from Ray's 2 s to ``TRAIN_POLL_S``
(0.5 s) unless ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` is set: short epochs would otherwise wait on
it (``train_env``).

Data: the slices are preprocessed once on the driver (``trainers.data.prepare_slices`` into
``<storage>/cache/<fingerprint>``); workers receive the folder's path and memory-map it.

Failure injection for tests: ``SEMICON_SWEEP_FAIL_NODES`` (read by the driver) is a
comma-separated list of tokens; a node matches a token equal to its stage name
(``finetune``) or a prefix (>= 4 characters) of its key. A matching node's workers raise
``RuntimeError`` before training, through the real Train / Tune path.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from orchestrator.store import StageStore
from orchestrator.tracking import check_tracking, logger_callbacks
from trainers.registry import stage_names

if TYPE_CHECKING:
    from orchestrator.plan import Plan, StageNode
    from orchestrator.spec import Resources

FAIL_NODES_ENV = "SEMICON_SWEEP_FAIL_NODES"

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
EPOCH_PROGRESS_EVERY_S = 30.0
TRAIN_CHECKPOINTS_KEPT = 2
TRAIN_POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
TRAIN_POLL_S = "0.5"  # Ray's default is 2 s; see train_env()
# A Tune trial only waits on its Train job. Tune refuses an empty request, and any CPU share
# would break exact fits (two 1-CPU trials on 2 CPUs), so the trial reserves one byte of memory.
TRIAL_DRIVER_RESOURCES = {"cpu": 0, "memory": 1}


class ClusterError(ValueError):
    """The Ray cluster address is invalid or unreachable (one-line message naming it)."""


@dataclass
class SweepOutcome:
    """What one ``run_sweep`` call did.

    ``completed``: nodes run to completion by this call; ``failed``: node key -> one-line
    error; ``skipped``: node key -> why it did not run (its parent did not complete);
    ``already_complete``: nodes found ``COMPLETE`` in the store and not run again;
    ``wall_s``: seconds spent in ``run_sweep``.
    """

    completed: list[str]
    failed: dict[str, str]
    skipped: dict[str, str]
    wall_s: float
    already_complete: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no node failed or was skipped."""
        return not self.failed and not self.skipped


def print_progress(line: str) -> None:
    """The default progress sink: one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# connecting to Ray


def _probe_target(address: str) -> tuple[str, int] | None:
    """(host, port) to probe for ``address``; None when Ray resolves it itself ("auto")."""
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        return _probe_target(env) if env and env != "auto" else None
    if "://" in address:
        parts = urlsplit(address)
        if parts.scheme != "ray" or not parts.hostname:
            raise ClusterError(f"invalid Ray address {address!r}: expected host:port, ray://host:port or auto")
        try:
            port = parts.port or DEFAULT_CLIENT_PORT
        except ValueError:
            raise ClusterError(f"invalid Ray address {address!r}: bad port") from None
        return parts.hostname, port
    host, sep, port_text = address.rpartition(":")
    if not sep:
        host, port_text = address, str(DEFAULT_RAY_PORT)
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ClusterError(f"invalid Ray address {address!r}: expected host:port, ray://host:port or auto")
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


# --------------------------------------------------------------------------------------------
# resources


def trial_concurrency(resources: Resources, cluster: Mapping[str, float], pending: int) -> int:
    """How many trials run at once (see the module docstring for the formula).

    Raises ``ClusterError`` when one trial's workers need more than the whole cluster has and
    ``resources.max_concurrent_trials`` is not set.
    """
    if pending < 1:
        raise ValueError(f"pending: must be >= 1, got {pending}")
    if resources.max_concurrent_trials is not None:
        return min(resources.max_concurrent_trials, pending)
    workers = resources.workers_per_trial
    needs = {"CPU": workers * resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        needs["GPU"] = workers * resources.gpus_per_worker
    fits = {name: math.floor(cluster.get(name, 0.0) / need + 1e-9) for name, need in needs.items()}
    short = {name: n for name, n in fits.items() if n < 1}
    if short:
        name = next(iter(short))
        raise ClusterError(
            f"one trial needs {needs[name]:g} {name} (resources.workers_per_trial {workers} x "
            f"{name.lower()}s_per_worker) but the cluster has {cluster.get(name, 0.0):g}; lower them, "
            "or set resources.max_concurrent_trials to wait for an autoscaling cluster"
        )
    return max(1, min(min(fits.values()), pending))


def scaling_options(resources: Resources, placement_strategy: str = "PACK") -> dict[str, Any]:
    """Keyword arguments of ``ray.train.ScalingConfig`` for one node's Train job."""
    per_worker: dict[str, float] = {"CPU": resources.cpus_per_worker}
    if resources.gpus_per_worker > 0:
        per_worker["GPU"] = resources.gpus_per_worker
    return {
        "num_workers": resources.workers_per_trial,
        "use_gpu": resources.gpus_per_worker > 0,
        "resources_per_worker": per_worker,
        "placement_strategy": placement_strategy,
    }


# --------------------------------------------------------------------------------------------
# failure injection (tests)


def injected_failures(nodes: Mapping[str, StageNode], spec: str | None = None) -> dict[str, str]:
    """Node key -> injected error message for the nodes ``SEMICON_SWEEP_FAIL_NODES`` selects.

    ``spec`` overrides the environment variable. Tokens: a stage name, or a key prefix of at
    least 4 characters; an empty or unset variable selects nothing.
    """
    text = os.environ.get(FAIL_NODES_ENV, "") if spec is None else spec
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    for token in tokens:
        if token not in stage_names() and len(token) < 4:
            raise ValueError(f"{FAIL_NODES_ENV}: token {token!r} must be a stage name or a key prefix of >= 4 characters")
    out = {}
    for key, node in nodes.items():
        hit = next((t for t in tokens if t == node.stage or key.startswith(t)), None)
        if hit is not None:
            out[key] = f"injected failure ({FAIL_NODES_ENV}={hit}) in {node.stage} node {key}"
    return out


# --------------------------------------------------------------------------------------------
# the Tune trial: driver of one node's Train job


def one_line_error(err: BaseException) -> str:
    """``"<Type>: <first line>"`` of the root failure (a Train worker's own exception if any)."""
    failures = getattr(err, "worker_failures", None)
    if isinstance(failures, Mapping) and failures:
        rank = min(failures)
        inner = failures[rank]
        return f"rank {rank}: {one_line_error(inner)}"
    cause = getattr(err, "cause", None)  # ray.exceptions.RayTaskError wraps the user's error
    if isinstance(cause, BaseException) and cause is not err:
        return one_line_error(cause)
    text = str(err).strip()
    first = text.splitlines()[0] if text else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def node_trial(config: Mapping[str, Any], payload: Mapping[str, Any]) -> None:
    """Tune function trainable: run node ``config["node_key"]`` as a Ray Train job.

    ``payload`` (shared by the sweep's trials through ``tune.with_parameters``): ``nodes``
    (key -> ``train_node`` config), ``scaling`` (``ScalingConfig`` kwargs), ``train_dir``,
    ``storage``, ``max_failures``, ``train_env`` (see ``train_env``).
    """
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.worker import train_node

    key = config["node_key"]
    store = StageStore(payload["storage"])
    os.environ.update(payload.get("train_env", {}))  # Train passes these on to its controller
    trainer = TorchTrainer(
        train_node,
        train_loop_config=dict(payload["nodes"][key]),
        scaling_config=ray.train.ScalingConfig(**payload["scaling"]),
        run_config=ray.train.RunConfig(
            name=key,
            storage_path=payload["train_dir"],
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=payload["max_failures"]),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=TRAIN_CHECKPOINTS_KEPT),
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # every Train failure is this node's failure, recorded, not raised
        message = one_line_error(err)
        store.write_error(key, message)
        ray.tune.report({"node_status": "failed", "error": message})
        return
    if not store.is_complete(key):
        message = "Train run ended without the node's result (no COMPLETE written by rank 0)"
        store.write_error(key, message)
        ray.tune.report({"node_status": "failed", "error": message})
        return
    shutil.rmtree(Path(payload["train_dir"]) / key, ignore_errors=True)
    ray.tune.report({"node_status": "complete"})


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


def trial_name(trial: Any) -> str:
    """Tune trial (and trial folder) name: the node key."""
    return str(trial.config["node_key"])


# --------------------------------------------------------------------------------------------
# progress


def _progress_callback(
    plan: Plan, store: StageStore, progress: Callable[[str], None], sweep_start: float
) -> Any:
    """A ``ray.tune.Callback`` printing a line per node start / finish / failure."""
    from ray.tune import Callback

    class NodeProgress(Callback):
        def __init__(self, plan: Plan, store: StageStore, progress: Callable[[str], None], start: float) -> None:
            # attributes, not closure variables: cloudpickle would pickle a closure's cells
            self.plan, self.store, self.progress, self.sweep_start = plan, store, progress, start
            self.started: dict[str, float] = {}
            self.last: dict[str, dict[str, Any]] = {}
            self.printed: dict[str, float] = {}

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into tuner.pkl; the plan, store and progress sink (which
            # may not pickle) are dropped: a sweep never restores a Tuner from that file.
            return {"started": self.started}

        def _line(self, key: str, text: str) -> None:
            node = self.plan.nodes[key]
            clock = time.monotonic() - self.sweep_start
            self.progress(f"[{_clock(clock)}] {node.stage:<8} {key} {text}")

        def _loss(self, key: str) -> str:
            last = self.last.get(key, {})
            if "loss" not in last:
                return "no epoch reported"
            config = self.plan.nodes[key].config
            if config.get("steps") is not None:
                budget = f"step {last.get('steps', '?')}/{config['steps']}"
            else:
                budget = f"epoch {last.get('epoch', '?')}/{config.get('epochs', '?')}"
            return f"{budget} loss {float(last['loss']):.4f}"

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = trial.config["node_key"]
            self.started[key] = time.monotonic()
            users = sum(1 for t in self.plan.trials if key in t.nodes.values())
            self._line(key, f"start (serves {users} trial{'s' * (users != 1)})")

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            key = trial.config["node_key"]
            if "loss" in result:
                self.last[key] = result
                now = time.monotonic()
                if now - self.printed.get(key, self.started.get(key, now)) >= EPOCH_PROGRESS_EVERY_S:
                    self.printed[key] = now
                    self._line(key, self._loss(key))

        def _elapsed(self, key: str) -> str:
            return _clock(time.monotonic() - self.started.get(key, time.monotonic()))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = trial.config["node_key"]
            if self.store.is_complete(key):
                self._line(key, f"done in {self._elapsed(key)}, {self._loss(key)}")
            else:
                error = self.store.read_error(key) or "no result"
                self._line(key, f"FAILED after {self._elapsed(key)}, {self._loss(key)}: {error}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = trial.config["node_key"]
            self._line(key, f"FAILED (trial crashed) after {self._elapsed(key)}, {self._loss(key)}")

    return NodeProgress(plan, store, progress, sweep_start)


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


# --------------------------------------------------------------------------------------------
# the sweep


def _prepare_caches(nodes: list[StageNode], store: StageStore, cache: dict[str, str]) -> None:
    """Preprocess each distinct dataset of ``nodes`` once; fills ``cache`` (data JSON -> folder)."""
    from trainers.config import DataConfig, from_dict
    from trainers.data import prepare_slices

    for node in nodes:
        ident = json.dumps(node.data, sort_keys=True)
        if ident not in cache:
            data = prepare_slices(from_dict(DataConfig, node.data, "dataset"), store.cache_dir)
            cache[ident] = str((store.cache_dir / data.fingerprint).absolute())


def _experiment_name(store: StageStore, keys: list[str]) -> str:
    """``sweep-<hash of the keys>``, with ``-2``, ``-3`` ... when that folder exists already."""
    digest = hashlib.sha256(",".join(sorted(keys)).encode()).hexdigest()[:8]
    name = base = f"sweep-{digest}"
    attempt = 1
    while (store.ray_dir / name).exists():
        attempt += 1
        name = f"{base}-{attempt}"
    return name


def _shared_nodes(plan: Plan) -> list[str]:
    """Keys of the nodes that more than one trial runs."""
    users: dict[str, int] = {}
    for trial in plan.trials:
        for key in trial.nodes.values():
            users[key] = users.get(key, 0) + 1
    return [key for key, count in users.items() if count > 1]


def run_sweep(
    plan: Plan,
    store: StageStore,
    address: str | None = None,
    progress: Callable[[str], None] = print_progress,
    reuse: bool = True,
    placement_strategy: str = "PACK",
) -> SweepOutcome:
    """Run every node of ``plan`` not yet complete in ``store`` on Ray, each once its parent is.

    ``address``: None uses ``plan.spec.ray.address`` (None there too: start Ray locally);
    ``"auto"``, ``host:port`` or ``ray://host:port`` join a cluster. A bad or unreachable address
    raises ``ClusterError`` before anything is written. ``reuse``: whether ``plan`` was built
    to share nodes between trials (``build_plan(reuse=...)``); with False, a plan in which a
    node serves several trials is refused (``ValueError``). Either way a node already
    ``COMPLETE`` in the store is not run again: that is what makes a relaunch resume.
    ``placement_strategy``: of each node's Train workers (``PACK``, ``SPREAD``,
    ``STRICT_PACK``, ``STRICT_SPREAD``). Progress lines go to ``progress``.
    """
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    if placement_strategy not in strategies:
        raise ValueError(f"placement_strategy: must be one of {list(strategies)}, got {placement_strategy!r}")
    if not reuse:
        shared = _shared_nodes(plan)
        if shared:
            raise ValueError(
                f"reuse=False but node {shared[0]} serves several trials: build the plan with "
                "build_plan(spec, reuse=False)"
            )
    spec = plan.spec
    address = address if address is not None else spec.ray.address
    check_tracking(spec)
    started = time.monotonic()
    outcome = SweepOutcome(completed=[], failed={}, skipped={}, wall_s=0.0)
    with quiet_ray_env(), quiet_ray_loggers():
        started_ray = connect_ray(address)
        try:
            _run_nodes(plan, store, progress, placement_strategy, outcome, started)
        finally:
            if started_ray:
                import ray

                ray.shutdown()
    outcome.wall_s = time.monotonic() - started
    progress(
        f"[{_clock(outcome.wall_s)}] sweep {spec.name}: {len(outcome.completed)} nodes completed, "
        f"{len(outcome.already_complete)} already complete, {len(outcome.failed)} failed, "
        f"{len(outcome.skipped)} skipped"
    )
    return outcome


class DagScheduler:
    """Which incomplete node to start next, as soon as its parent is complete (Ray-free).

    ``parents``: node key -> parent key, or None when the node can start now (no parent, or the
    parent complete already); a parent must itself be one of the keys. ``stages``: key -> stage
    name (for messages). Among the ready nodes the one with the most descendants goes first (a
    shared pretraining node unlocks every trial it serves), ties in the order of ``parents``.

    ``next()`` gives a key to start, None when nothing is ready until a running node ends, or
    ``DONE`` when nothing is left to start. ``finished(key, ok, why)`` records a node's end; a
    failed node's descendants are dropped into ``skipped`` (key -> reason) and never started.
    """

    DONE = "DONE"

    def __init__(self, parents: Mapping[str, str | None], stages: Mapping[str, str]) -> None:
        for key, parent in parents.items():
            if parent is not None and parent not in parents:
                raise ValueError(f"node {key}: parent {parent} is not among the nodes to run")
        self.parents = dict(parents)
        self.stages = dict(stages)
        self.children: dict[str, list[str]] = {key: [] for key in parents}
        for key, parent in parents.items():
            if parent is not None:
                self.children[parent].append(key)
        order = {key: i for i, key in enumerate(parents)}
        self.priority = {key: (-self._descendants(key), order[key]) for key in parents}
        self.waiting: list[str] = list(parents)
        self.running: set[str] = set()
        self.completed: list[str] = []
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def _descendants(self, key: str) -> int:
        return sum(1 + self._descendants(child) for child in self.children[key])

    def next(self) -> str | None:
        done = set(self.completed)
        ready = [key for key in self.waiting if self.parents[key] is None or self.parents[key] in done]
        if not ready:
            return self.DONE if not self.waiting else None
        key = min(ready, key=self.priority.__getitem__)
        self.waiting.remove(key)
        self.running.add(key)
        return key

    def finished(self, key: str, ok: bool, why: str = "did not complete") -> None:
        if key not in self.running:
            raise ValueError(f"node {key} is not running")
        self.running.discard(key)
        if ok:
            self.completed.append(key)
            return
        self.failed[key] = why
        self._skip_children(key, why)

    def _skip_children(self, key: str, why: str) -> None:
        for child in self.children[key]:
            if child in self.waiting:
                self.waiting.remove(child)
                self.skipped[child] = f"parent {key} ({self.stages[key]}) did not complete: {why}"
                self._skip_children(child, why)


def _dag_searcher(scheduler: DagScheduler, store: StageStore) -> Any:
    """A ``ray.tune.search.Searcher`` that suggests ``{"node_key": key}`` from ``scheduler``."""
    from ray.tune.search import Searcher

    class DagSearcher(Searcher):
        def __init__(self, scheduler: DagScheduler, store: StageStore) -> None:
            super().__init__()
            self.scheduler, self.store = scheduler, store
            self.trial_keys: dict[str, str] = {}

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            key = self.scheduler.next()
            if key == DagScheduler.DONE:
                return Searcher.FINISHED
            if key is None:
                return None  # Tune asks again once a running node ends
            self.trial_keys[trial_id] = key
            return {"node_key": key}

        def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
            key = self.trial_keys.get(trial_id)
            if key is not None and key in self.scheduler.running:
                why = self.store.read_error(key) or "did not complete"
                self.scheduler.finished(key, self.store.is_complete(key), why)

        def save(self, checkpoint_path: str) -> None:
            # Tune snapshots its searcher; a sweep never restores one (a relaunch replans from
            # the store), so the snapshot is a readable record, not a restorable state.
            state = {"trial_keys": self.trial_keys, "completed": self.scheduler.completed,
                     "failed": self.scheduler.failed, "skipped": self.scheduler.skipped,
                     "waiting": self.scheduler.waiting, "running": sorted(self.scheduler.running)}
            Path(checkpoint_path).write_text(json.dumps(state, indent=1))

        def restore(self, checkpoint_path: str) -> None:
            raise NotImplementedError("a sweep resumes by relaunching, from the stage store")

    return DagSearcher(scheduler, store)


def _run_nodes(
    plan: Plan,
    store: StageStore,
    progress: Callable[[str], None],
    placement_strategy: str,
    outcome: SweepOutcome,
    started: float,
) -> None:
    """Every node not yet complete, in one Tune run; a node starts once its parent completes."""
    parents: dict[str, str | None] = {}
    for level in plan.levels:
        for key in level:
            if store.is_complete(key):
                outcome.already_complete.append(key)
            else:
                parent = plan.nodes[key].parent
                parents[key] = parent if parent is not None and not store.is_complete(parent) else None
    if not parents:
        return
    nodes = [plan.nodes[key] for key in parents]
    caches: dict[str, str] = {}
    _prepare_caches(nodes, store, caches)
    for node in nodes:
        store.write_node(node)
    failures = injected_failures(plan.nodes)
    env = train_env()
    payload = {
        "nodes": {
            node.key: {
                "node": node.to_dict(),
                "storage": str(store.root.absolute()),
                "cache": caches[json.dumps(node.data, sort_keys=True)],
                "checkpoint_every": plan.spec.resources.checkpoint_every,
                "report_interval_s": float(env[TRAIN_POLL_ENV]),
                "gpus_per_worker": plan.spec.resources.gpus_per_worker,
                "inject_failure": failures.get(node.key),
            }
            for node in nodes
        },
        "scaling": scaling_options(plan.spec.resources, placement_strategy),
        "train_dir": str((store.ray_dir / "train").absolute()),
        "storage": str(store.root.absolute()),
        "max_failures": plan.spec.resources.max_failures,
        "train_env": env,
    }
    scheduler = DagScheduler(parents, {key: plan.nodes[key].stage for key in parents})
    errors = _run_tune(plan, store, scheduler, payload, progress, started)
    outcome.skipped.update(scheduler.skipped)
    for key in parents:
        if key in scheduler.skipped:
            continue
        if store.is_complete(key):
            outcome.completed.append(key)
        else:
            outcome.failed[key] = store.read_error(key) or errors.get(key) or "did not complete"


def _run_tune(
    plan: Plan,
    store: StageStore,
    scheduler: DagScheduler,
    payload: dict[str, Any],
    progress: Callable[[str], None],
    started: float,
) -> dict[str, str]:
    """The Tune experiment over the scheduler's nodes; returns key -> error of crashed trials."""
    import ray
    from ray import tune

    resources = plan.spec.resources
    keys = list(scheduler.parents)
    concurrency = trial_concurrency(resources, ray.cluster_resources(), len(keys))
    name = _experiment_name(store, keys)
    stages = sorted({plan.nodes[key].stage for key in keys})
    progress(
        f"[{_clock(time.monotonic() - started)}] {len(keys)} node(s) to run ({', '.join(stages)}), "
        f"{concurrency} at a time, each once its parent is complete -> {store.ray_dir / name}"
    )
    trainable = tune.with_resources(tune.with_parameters(node_trial, payload=payload), TRIAL_DRIVER_RESOURCES)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_dag_searcher(scheduler, store),
            num_samples=len(keys),
            max_concurrent_trials=concurrency,
            trial_name_creator=trial_name,
            trial_dirname_creator=trial_name,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(store.ray_dir.absolute()),
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            callbacks=[_progress_callback(plan, store, progress, started), *logger_callbacks(plan.spec)],
            verbose=0,
        ),
    )
    results = tuner.fit()
    errors: dict[str, str] = {}
    for result in results:
        key = (result.config or {}).get("node_key")
        if key is not None and result.error is not None:
            errors[key] = one_line_error(result.error)
            if not store.is_complete(key) and store.read_error(key) is None:
                store.write_error(key, errors[key])
    return errors
