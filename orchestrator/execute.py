"""Run a planned sweep on Ray: one Ray Tune run for the whole stage DAG, one Ray Train job per node.

``run_sweep(plan, store)`` takes every node of the plan that is not ``COMPLETE`` in the store
and runs them as one Tune experiment whose search algorithm is the DAG itself
(``orchestrator.scheduler.DagScheduler`` inside a Tune ``Searcher``): a node is suggested as
soon as its parent is complete (no barrier between depths), the ready node with the most
descendants first, and a failed node's descendants are skipped with the reason::

    Tuner(with_resources(with_parameters(drive_node, payload=DriverPayload), NODE_DRIVER_RESOURCES),
          tune_config=TuneConfig(search_alg=DagSearcher, num_samples=<nodes>,
                                 max_concurrent_trials=node_concurrency(...)),
          run_config=RunConfig(name="sweep-<hash>", storage_path=<storage>/ray, ...))

Each Tune trial (``drive_node``) is only the driver of one node's Ray Train job: it builds a
``TorchTrainer(orchestrator.worker.train_node, train_loop_config=NodeJob.to_dict(),
ScalingConfig(...), RunConfig(name=<node key>, storage_path=<storage>/ray/train,
callbacks=[TuneReportCallback()]))`` and calls ``fit()``. The workers get their own placement
group, which Tune does not count: ``orchestrator.resources`` derives how many nodes run at once.
The Ray connection and the sweep's environment are ``orchestrator.session``'s; progress lines
``orchestrator.progress``'s.

Failures: a worker that raises is restarted by Train from its last checkpoint up to
``resources.max_failures`` times; when Train gives up, the driver writes a one-line message to
``stages/<key>/error.txt``, reports ``node_status: failed`` to Tune and ends normally, and the
sweep goes on with the other nodes (a failed node's children are skipped, with the reason). A
crashed driver (e.g. its machine lost) is retried by Tune up to ``max_failures`` times; the new
driver's Train run has the same name, so it resumes from the same checkpoints.

Resume = relaunch: a ``COMPLETE`` node whose files still match it is never run again (one that
no longer matches is invalidated first, with its complete descendants: ``orchestrator.store``);
an interrupted node's Train run
folder (``<storage>/ray/train/<key>``) still holds its checkpoints, so the new Train run of the
same name continues from the last one (the worker drops the epoch records after it). Once a
node is complete its Train checkpoints are deleted (its result lives in the stage store).

Bundles (``resources.nodes_per_run`` > 1): the searcher suggests several ready nodes of one
kind as one Tune trial (``config["bundle"]``), driven by ``drive_bundle``: one Train run for
them all (``orchestrator.worker.train_bundle``), each node resuming from its own resume point
in the store, a failing node recorded while its bundle-mates go on (docs/ARCHITECTURE.md).

Data: the slices are preprocessed once on the driver (``trainers.data.prepare_slices`` into
``<storage>/cache/<fingerprint>``); workers receive the folder's path and memory-map it.

Failure injection for tests: ``SEMICON_SWEEP_FAIL_NODES`` (read by the driver) is a
comma-separated list of tokens; a node matches a token equal to its stage name
(``finetune``) or a prefix (>= 4 characters) of its key. A matching node's workers raise
``RuntimeError`` before training, through the real Train / Tune path.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.plan import datasets
from orchestrator.progress import (
    BUNDLE_KEY,
    ProgressView,
    as_view,
    clock,
    print_progress,
    progress_callback,
    trial_nodes,
)
from orchestrator.resources import NODE_DRIVER_RESOURCES, node_concurrency, scaling_options
from orchestrator.scheduler import DagScheduler
from orchestrator.session import TRAIN_POLL_ENV, ClusterError, ray_session, train_env
from orchestrator.store import StageStore, invalidate_nodes
from orchestrator.tracking import check_tracking, logger_callbacks
from orchestrator.worker import DRIVER_STARTED_KEY, FUSE_KEY, NodeJob
from trainers.registry import stage_names

if TYPE_CHECKING:
    from orchestrator.plan import Plan, StageNode

__all__ = ["ClusterError", "DriverPayload", "SweepOutcome", "run_sweep"]

FAIL_NODES_ENV = "SEMICON_SWEEP_FAIL_NODES"

TRAIN_CHECKPOINTS_KEPT = 2


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
            raise ValueError(
                f"{FAIL_NODES_ENV}: token {token!r} must be a stage name or a key prefix of >= 4 characters"
            )
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


@dataclass(frozen=True)
class DriverPayload:
    """What every node's Tune trial (the driver of its Train job) receives, once for the whole
    sweep through ``tune.with_parameters``: each node's ``NodeJob`` (what its workers get), the
    ``ScalingConfig`` keyword arguments, the Train runs' folder, Train's ``max_failures`` and
    the ``RAY_TRAIN_*`` environment (``orchestrator.session.train_env``); ``fuse_finetunes``:
    ``resources.fuse_finetunes``, passed to bundles (``orchestrator.worker.train_bundle``)."""

    jobs: Mapping[str, NodeJob]
    scaling: Mapping[str, Any]
    train_dir: str
    max_failures: int
    train_env: Mapping[str, str]
    fuse_finetunes: bool = False


def drive_node(config: Mapping[str, Any], payload: DriverPayload) -> None:
    """Tune function trainable: run node ``config["node_key"]`` as a Ray Train job; record a
    failure in the store (``error.txt``) and report ``node_status`` to Tune, never raise."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.worker import train_node

    driver_started_at = time.time()
    if BUNDLE_KEY in config:
        drive_bundle(config, payload, driver_started_at)
        return
    key = config["node_key"]
    job = payload.jobs[key]
    store = StageStore(job.storage)
    os.environ.update(payload.train_env)  # Train passes these on to its controller
    trainer = TorchTrainer(
        train_node,
        train_loop_config={**job.to_dict(), DRIVER_STARTED_KEY: driver_started_at},
        scaling_config=ray.train.ScalingConfig(**payload.scaling),
        run_config=ray.train.RunConfig(
            name=key,
            storage_path=payload.train_dir,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=payload.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=TRAIN_CHECKPOINTS_KEPT),
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # every Train failure is this node's failure, recorded, not raised
        message = one_line_error(err)
        # Ray's error text carries the failing worker's own traceback
        store.write_error(key, message, "".join(traceback.format_exception(err)))
        ray.tune.report({"node_status": "failed", "error": message})
        return
    if not store.is_complete(key):
        message = "Train run ended without the node's result (no COMPLETE written by rank 0)"
        store.write_error(key, message)
        ray.tune.report({"node_status": "failed", "error": message})
        return
    shutil.rmtree(Path(payload.train_dir) / key, ignore_errors=True)
    # the last result carries the node's final metrics (val / test Dice per class for a
    # fine-tuning): what MLflow and TensorBoard show as the run's outcome
    final = {
        name: value
        for name, value in (store.read_metrics(key) or {}).items()
        if isinstance(value, int | float) and not isinstance(value, bool)
    }
    ray.tune.report({"node_status": "complete", **final})


def drive_bundle(
    config: Mapping[str, Any], payload: DriverPayload, driver_started_at: float
) -> None:
    """Tune function trainable for a bundle (``config[BUNDLE_KEY]``: node keys): one Train run
    whose workers run the bundle's nodes one after another (``orchestrator.worker.train_bundle``).

    The Train run is named by the bundle (``bundle-<hash of its keys>``), so a retried driver
    resumes it; each node's own resume point lives in the store, so a relaunch that bundles
    the nodes differently still resumes each. A node that failed gets its error in the store
    and the others go on; when Train itself gives up, every node of the bundle left without a
    result gets Train's error. Reports ``node_status`` (complete when every node is)."""
    import ray.train
    import ray.tune
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.worker import train_node

    keys = list(config[BUNDLE_KEY])
    store = StageStore(payload.jobs[keys[0]].storage)
    os.environ.update(payload.train_env)
    name = "bundle-" + hashlib.sha256(",".join(keys).encode()).hexdigest()[:12]
    trainer = TorchTrainer(
        train_node,
        train_loop_config={
            BUNDLE_KEY: [payload.jobs[key].to_dict() for key in keys],
            "max_failures": payload.max_failures,
            DRIVER_STARTED_KEY: driver_started_at,
            FUSE_KEY: payload.fuse_finetunes,
        },
        scaling_config=ray.train.ScalingConfig(**payload.scaling),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=payload.train_dir,
            callbacks=[TuneReportCallback()],
            failure_config=ray.train.FailureConfig(max_failures=payload.max_failures),
        ),
    )
    try:
        trainer.fit()
    except Exception as err:  # Train gave up: the nodes without a result share its error
        message = one_line_error(err)
        trace = "".join(traceback.format_exception(err))
        for key in keys:
            if not store.is_complete(key):
                store.write_error(key, message, trace)
    for key in keys:
        if not store.is_complete(key) and not _error_since(store, key, driver_started_at):
            store.write_error(
                key, "Train run ended without the node's result (no COMPLETE written by rank 0)"
            )
    complete = [key for key in keys if store.is_complete(key)]
    if len(complete) == len(keys):
        shutil.rmtree(Path(payload.train_dir) / name, ignore_errors=True)
    ray.tune.report(
        {
            "node_status": "complete" if len(complete) == len(keys) else "failed",
            "bundle_nodes": len(keys),
            "bundle_complete": len(complete),
        }
    )


def _error_since(store: StageStore, key: str, since: float) -> bool:
    """Whether the node's ``error.txt`` was written at or after ``since`` (unix time)."""
    try:
        return (store.node_dir(key) / "error.txt").stat().st_mtime >= since - 1.0
    except FileNotFoundError:
        return False


def node_folder(trial: Any) -> str:
    """Tune trial folder name: the node key (the store's name for it)."""
    return str(trial.config["node_key"])


def node_title(trial: Any) -> str:
    """Tune trial name, which trackers show (MLflow's run name): stage, short key and the grid
    point (``Plan.node_point``, which the searcher puts in the trial's config)."""
    config = dict(trial.config)
    point = ", ".join(
        f"{name}={value}"
        for name, value in config.items()
        if name not in ("node_key", "stage", BUNDLE_KEY)
    )
    more = len(config.get(BUNDLE_KEY) or ()) - 1
    bundle = f" +{more} more" if more > 0 else ""
    return f"{config.get('stage', 'node')} {str(config['node_key'])[:8]}{bundle} ({point})"


# --------------------------------------------------------------------------------------------
# the sweep


def _prepare_caches(nodes: list[StageNode], store: StageStore, cache: dict[str, str]) -> None:
    """Preprocess each distinct dataset of ``nodes`` once; fills ``cache`` (``data_ident`` ->
    slice cache folder)."""
    from trainers.data import prepare_slices

    for ident, config in datasets(nodes).items():
        if ident not in cache:
            data = prepare_slices(config, store.cache_dir)
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
    progress: Callable[[str], None] | ProgressView = print_progress,
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
    ``STRICT_PACK``, ``STRICT_SPREAD``). Progress goes to ``progress``: a view
    (``orchestrator.progress.progress_view``: plain lines or a live table), entered once Ray is
    up and left before Ray shuts down, or a line sink (plain lines).
    """
    strategies = ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD")
    if placement_strategy not in strategies:
        raise ValueError(
            f"placement_strategy: must be one of {list(strategies)}, got {placement_strategy!r}"
        )
    if not reuse:
        shared = _shared_nodes(plan)
        if shared:
            raise ValueError(
                f"reuse=False but node {shared[0]} serves several trials: build the plan with "
                "build_plan(spec, reuse=False)"
            )
    spec = plan.spec
    address = address if address is not None else spec.ray.address
    check_tracking(spec)  # the CLI checks it earlier too; the address is checked on connecting
    view = as_view(progress)
    started = time.monotonic()
    outcome = SweepOutcome(completed=[], failed={}, skipped={}, wall_s=0.0)
    parents = _pending_nodes(plan, store, view, outcome)
    if parents:  # a complete sweep's relaunch does not start (or join) Ray
        # the data is read, checked and cached before Ray starts: a bad file costs no start-up
        caches: dict[str, str] = {}
        _prepare_caches([plan.nodes[key] for key in parents], store, caches)
        # the view (a live table on a terminal) goes first on the way out: an interruption's
        # lines and the summary below print as plain lines
        with ray_session(address), view:
            _run_nodes(plan, store, parents, caches, view, placement_strategy, outcome, started)
    outcome.wall_s = time.monotonic() - started
    view(
        f"[{clock(outcome.wall_s)}] sweep {spec.name}: {len(outcome.completed)} nodes completed, "
        f"{len(outcome.already_complete)} already complete, {len(outcome.failed)} failed, "
        f"{len(outcome.skipped)} skipped"
    )
    return outcome


def _dag_searcher(
    plan: Plan,
    scheduler: DagScheduler,
    store: StageStore,
    nodes_per_run: int = 1,
    concurrency: int = 1,
) -> Any:
    """A ``ray.tune.search.Searcher`` that suggests ``{"node_key": key, **plan.node_point(key)}``
    from ``scheduler``; with ``nodes_per_run`` > 1, ``BUNDLE_KEY`` adds the keys of a bundle
    (``DagScheduler.next_bundle``) of at most that many nodes, fewer when there are free slots
    (``concurrency`` trials at once) for the ready nodes."""
    from ray.tune.search import Searcher

    class DagSearcher(Searcher):
        def __init__(
            self,
            plan: Plan,
            scheduler: DagScheduler,
            store: StageStore,
            nodes_per_run: int,
            concurrency: int,
        ) -> None:
            super().__init__()
            self.plan, self.scheduler, self.store = plan, scheduler, store
            self.nodes_per_run, self.concurrency = nodes_per_run, concurrency
            self.trial_keys: dict[str, list[str]] = {}
            self.active: set[str] = set()

        def suggest(self, trial_id: str) -> dict[str, Any] | str | None:
            if self.nodes_per_run > 1:
                # spread the ready nodes over the free slots before filling bundles
                free = max(1, self.concurrency - len(self.active))
                ready = len(self.scheduler.ready())
                limit = max(1, min(self.nodes_per_run, math.ceil(ready / free)))
                keys = self.scheduler.next_bundle(limit)
            else:
                keys = self.scheduler.next()
            if keys == DagScheduler.DONE:
                return Searcher.FINISHED
            if keys is None:
                return None  # Tune asks again once a running node ends
            keys = [keys] if isinstance(keys, str) else keys
            self.trial_keys[trial_id] = keys
            self.active.add(trial_id)
            # the grid point as the trial's parameters, for trackers; the trainable reads the key
            config = {"node_key": keys[0], **self.plan.node_point(keys[0])}
            if self.nodes_per_run > 1:
                config[BUNDLE_KEY] = keys
            return config

        def on_trial_complete(
            self, trial_id: str, result: dict | None = None, error: bool = False
        ) -> None:
            self.active.discard(trial_id)
            for key in self.trial_keys.get(trial_id, []):
                if key in self.scheduler.running:
                    why = self.store.read_error(key) or "did not complete"
                    self.scheduler.finished(key, self.store.is_complete(key), why)

        def save(self, checkpoint_path: str) -> None:
            # Tune snapshots its searcher; a sweep never restores one (a relaunch replans from
            # the store), so the snapshot is a readable record, not a restorable state.
            state = {
                "trial_keys": self.trial_keys,
                "completed": self.scheduler.completed,
                "failed": self.scheduler.failed,
                "skipped": self.scheduler.skipped,
                "waiting": self.scheduler.waiting,
                "running": sorted(self.scheduler.running),
            }
            Path(checkpoint_path).write_text(json.dumps(state, indent=1))

        def restore(self, checkpoint_path: str) -> None:
            raise NotImplementedError("a sweep resumes by relaunching, from the stage store")

    return DagSearcher(plan, scheduler, store, nodes_per_run, concurrency)


def grid_order(plan: Plan) -> list[str]:
    """Every node key once, trial by trial in grid order, each trial's chain parent first."""
    return list(dict.fromkeys(key for trial in plan.trials for key in trial.nodes.values()))


def _pending_nodes(
    plan: Plan, store: StageStore, progress: Callable[[str], None], outcome: SweepOutcome
) -> dict[str, str | None]:
    """The nodes still to run, each with its parent if that is still to run too (else None).

    Nodes are listed in grid order (trial by trial, each trial's chain parent first), which is
    the scheduler's tie-break after "most descendants first": the fine-tunings run in the
    order of the spec's trials, so a sweep stopped part-way holds whole slices of its grid.
    First, nodes whose ``COMPLETE`` no longer matches their files (and their complete
    descendants) are reported and invalidated (``orchestrator.store.invalidate_nodes``).
    Needs no Ray.
    """
    invalidate_nodes(plan, store, progress)
    parents: dict[str, str | None] = {}
    for key in grid_order(plan):
        if store.is_complete(key):
            outcome.already_complete.append(key)
        else:
            parent = plan.nodes[key].parent
            parents[key] = parent if parent is not None and not store.is_complete(parent) else None
    return parents


def _run_nodes(
    plan: Plan,
    store: StageStore,
    parents: dict[str, str | None],
    caches: dict[str, str],
    progress: Callable[[str], None],
    placement_strategy: str,
    outcome: SweepOutcome,
    started: float,
) -> None:
    """The ``parents`` nodes in one Tune run (their data in ``caches``: data JSON -> slice
    cache folder); a node starts once its parent completes.

    If the Tune run itself dies (e.g. the cluster loses the node holding its actors), every
    node it left incomplete is recorded as failed with that error, so the sweep still ends
    with tables that say what happened to each trial.
    """
    nodes = [plan.nodes[key] for key in parents]
    for node in nodes:
        store.write_node(node)
    failures = injected_failures(plan.nodes)
    env = train_env()
    resources = plan.spec.resources
    payload = DriverPayload(
        jobs={
            node.key: NodeJob(
                node=node,
                storage=str(store.root.absolute()),
                cache=caches[node.data_ident],
                checkpoint_every=resources.checkpoint_every,
                report_interval_s=float(env[TRAIN_POLL_ENV]),
                gpus_per_worker=resources.gpus_per_worker,
                inject_failure=failures.get(node.key),
            )
            for node in nodes
        },
        scaling=scaling_options(resources, placement_strategy),
        train_dir=str((store.ray_dir / "train").absolute()),
        max_failures=resources.max_failures,
        train_env=env,
        fuse_finetunes=resources.fuse_finetunes,
    )
    scheduler = DagScheduler(parents, {key: plan.nodes[key].stage for key in parents})
    try:
        errors = _run_tune(plan, store, scheduler, payload, progress, started)
    except Exception as err:  # the run as a whole died: Ray lost a node, an actor, the GCS
        lost = f"sweep interrupted by a Ray error: {one_line_error(err)}"
        progress(f"[{clock(time.monotonic() - started)}] {lost}")
        errors = {}
        for key in parents:
            if key not in scheduler.skipped and not store.is_complete(key):
                errors[key] = lost
                store.write_error(key, lost, traceback.format_exc())
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
    payload: DriverPayload,
    progress: Callable[[str], None],
    started: float,
) -> dict[str, str]:
    """The Tune experiment over the scheduler's nodes; returns key -> error of crashed trials."""
    import ray
    from ray import tune

    resources = plan.spec.resources
    keys = list(scheduler.parents)
    concurrency = node_concurrency(resources, ray.cluster_resources(), len(keys))
    name = _experiment_name(store, keys)
    stages = sorted({plan.nodes[key].stage for key in keys})
    progress(
        f"[{clock(time.monotonic() - started)}] {len(keys)} node(s) to run ({', '.join(stages)}), "
        f"{concurrency} at a time, each once its parent is complete -> {store.ray_dir / name}"
    )
    trainable = tune.with_resources(
        tune.with_parameters(drive_node, payload=payload), NODE_DRIVER_RESOURCES
    )
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_dag_searcher(plan, scheduler, store, resources.nodes_per_run, concurrency),
            num_samples=len(keys),
            max_concurrent_trials=concurrency,
            trial_name_creator=node_title,
            trial_dirname_creator=node_folder,
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=str(store.ray_dir.absolute()),
            failure_config=tune.FailureConfig(max_failures=resources.max_failures),
            callbacks=[
                progress_callback(plan, store, progress, started),
                *logger_callbacks(plan.spec),
            ],
            verbose=0,
        ),
    )
    results = tuner.fit()
    errors: dict[str, str] = {}
    for result in results:
        config = result.config or {}
        if "node_key" not in config or result.error is None:
            continue
        for key in trial_nodes(config):
            errors[key] = one_line_error(result.error)
            if not store.is_complete(key) and store.read_error(key) is None:
                store.write_error(key, errors[key])
    return errors
