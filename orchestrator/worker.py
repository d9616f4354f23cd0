"""The Ray Train ``train_loop_per_worker``: one stage node, run by every rank of a TorchTrainer.

``train_node(config)`` receives ``NodeJob.to_dict()`` (built by ``orchestrator.execute``; Train
passes its ``train_loop_config`` to every rank as plain data) and runs, on every rank:

1. the node's configs back to typed objects (``trainers.config.from_dict``), the slices
   memory-mapped (``load_slice_cache``), the split and labelled subset (``make_split``,
   ``labelled_subset``), the parent's final weights (``StageStore.load_state``, weights_only);
2. a resume state from ``ray.train.get_checkpoint()`` when Train restarts this run (a dead
   worker group, or a relaunch of the sweep: the Train run is named by the node key);
3. the node's stage kind's run function (``trainers.registry``) where ``ctx.report`` calls
   ``ray.train.report`` on every rank for each epoch that carries a checkpoint, and otherwise
   only once ``report_interval_s`` training seconds have passed since the last report
   (``ReportThrottle``: Ray Train holds one unread report per worker and collects it on its
   controller's poll, so reporting every short epoch would pace training by the poll); only
   rank 0 attaches a checkpoint (a
   directory holding ``checkpoint_state.pt``, a ``torch.save`` of the stage's checkpoint state:
   tensors, dicts, lists, numbers and strings only, so ``torch.load(weights_only=True)`` reads it);
4. rank 0 appends every epoch's record to ``stages/<key>/epochs.jsonl`` and, at the end, writes
   the node's result (``StageStore.write_result``: model, metrics, then ``COMPLETE``). The
   metrics gain ``wall_s`` (worker wall seconds of the node: this run plus, for a resumed run,
   those recorded in the checkpoint it resumed from), ``gpu_s`` (``wall_s`` x GPUs per
   worker x workers; 0 on CPU) and ``timing`` (unix times of this run: ``driver_started_at``
   (the Tune trial's driver entered ``drive_node``), ``worker_started_at`` (``train_node``
   entered), ``last_report_at`` (the last epoch's report returned), ``stage_ended_at`` (the
   stage function returned, final evaluation included), and ``report_s``: seconds spent in
   the per-epoch report (store record, checkpoint save, ``ray.train.report``); the store's
   ``COMPLETE`` adds ``completed_at``; ``benchmarks/bench_overhead.py`` reads them).

Epoch records are the project's own log (Tune rewrites its ``result.json`` when a trial
restarts): on a resumed run rank 0 first drops the records of epochs after the checkpoint it
resumes from, so every epoch appears once. Each record holds the stage's metrics (``epoch``,
``loss``, ``seconds``, ``slices_per_s`` ...) plus ``node``, ``stage``, ``world_size``,
``resumed_from`` (the checkpoint epoch, 0 for a fresh start), ``worker_nodes`` (the Ray node id
of every rank, comma-separated in rank order), ``torch_threads`` (rank 0's intra-op threads:
Ray sets ``OMP_NUM_THREADS`` to the worker's whole CPUs, at least 1) and ``time`` (unix
seconds, when the record was written).

Bundles: with ``config["bundle"]`` (a list of ``NodeJob.to_dict()``), ``train_bundle`` runs
the nodes one after another in this Train run: COMPLETE ones skipped, each resuming from and
checkpointing to its own ``stages/<key>/resume.pt`` (``save_resume_point``, atomic; removed
once the node is complete) instead of Train's checkpoints, each report carrying ``node_key``;
a node that raises is retried ``max_failures`` times, then its error is stored and the loop
goes on.

Failure injection (tests): ``NodeJob.inject_failure`` set to a message makes every rank raise
``RuntimeError(message)`` before training, so a failing trial goes through the real Train /
Tune error path. The executor sets it from ``SEMICON_SWEEP_FAIL_NODES`` (see
``orchestrator.execute.injected_failures``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from orchestrator.plan import StageNode
from orchestrator.progress import BUNDLE_KEY  # also the key of a bundle's jobs in train_loop_config
from orchestrator.store import StageStore, atomic_write_text
from trainers.config import ModelConfig, SplitConfig, from_dict
from trainers.data import load_slice_cache
from trainers.loop import ReportFn, StageResult
from trainers.point import stage_context
from trainers.registry import get_stage

CHECKPOINT_FILE = "checkpoint_state.pt"
DRIVER_STARTED_KEY = "driver_started_at"  # train_loop_config: when the node's driver started
RESUME_FILE = "resume.pt"  # stages/<key>/: a bundled node's last checkpoint state
WALL_KEY = "worker_wall_s"  # added to each checkpoint state: wall seconds spent up to it


@dataclass(frozen=True)
class NodeJob:
    """What the driver sends every worker of one stage node's Train job.

    ``node``: the stage node; ``storage``: the sweep's ``StageStore`` root; ``cache``: the
    folder of preprocessed slices, memory-mapped by the workers (never copied through the
    object store); ``checkpoint_every``: epochs between Train checkpoints;
    ``report_interval_s``: least training seconds between Train reports (``ReportThrottle``);
    ``gpus_per_worker``: for the ``gpu_s`` figure; ``inject_failure``: test hook (module
    docstring).
    """

    node: StageNode
    storage: str
    cache: str
    checkpoint_every: int = 1
    report_interval_s: float = 0.0
    gpus_per_worker: float = 0.0
    inject_failure: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain data (Train's ``train_loop_config``)."""
        return {**dataclasses.asdict(self), "node": self.node.to_dict()}

    @classmethod
    def from_dict(cls, config: Mapping[str, Any]) -> NodeJob:
        """Inverse of ``to_dict``; ``KeyError`` naming a missing required key."""
        missing = [key for key in REQUIRED_KEYS if key not in config]
        if missing:
            raise KeyError(f"train_node config: missing {missing[0]!r} (has {sorted(config)})")
        known = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in config.items() if key in known}
        return cls(**{**values, "node": StageNode.from_dict(config["node"])})


REQUIRED_KEYS = ("node", "storage", "cache")


class ReportThrottle:
    """Decides which epochs are reported to Ray Train; the same decision on every rank.

    Ray Train keeps one unread report per worker and its controller collects it on each poll
    (``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``), so a report made sooner than one poll after the
    previous one blocks the training loop. An epoch is reported when it carries a checkpoint
    (always the last epoch) or once ``min_interval_s`` of training time has accumulated since
    the last report. The time is the epoch's ``seconds`` metric, already the maximum over
    ranks, so every rank of a DDP group decides alike (a report is a collective in Train). Every epoch still gets its record in the stage store
    (validation metrics included): Tune sees a subset, the store holds them all.
    """

    def __init__(self, min_interval_s: float) -> None:
        if not min_interval_s >= 0:
            raise ValueError(f"report_interval_s must be >= 0, got {min_interval_s!r}")
        self.min_interval_s = float(min_interval_s)
        self._pending_s = 0.0

    def due(self, metrics: Mapping[str, Any], has_checkpoint: bool) -> bool:
        self._pending_s += float(metrics.get("seconds", 0.0))
        if has_checkpoint or self._pending_s >= self.min_interval_s:
            self._pending_s = 0.0
            return True
        return False


def train_node(config: Mapping[str, Any]) -> None:
    """Run one stage node on this Ray Train worker; ``config`` is ``NodeJob.to_dict()``, or
    ``{BUNDLE_KEY: [NodeJob.to_dict(), ...], "max_failures": n}`` for a bundle (``train_bundle``)."""
    if BUNDLE_KEY in config:
        train_bundle(config)
        return
    import ray.train

    job = NodeJob.from_dict(config)
    if job.inject_failure:
        raise RuntimeError(job.inject_failure)
    store = StageStore(job.storage)
    resume = _load_checkpoint(ray.train.get_checkpoint())
    if resume is None:  # an interrupted run of the node inside a bundle left its resume point
        resume = load_resume_point(store, job.node.key)
    _run_node(job, config.get(DRIVER_STARTED_KEY), resume, in_bundle=False)


def train_bundle(config: Mapping[str, Any]) -> None:
    """Run the nodes of a bundle one after another in this Train run (module docstring).

    A node already ``COMPLETE`` is skipped (a restarted worker group, a relaunch); a node
    resumes from its own resume point in the store (``resume.pt``), whatever bundle ran it
    before; a node whose run raises is retried up to ``max_failures`` times, then its error and
    traceback go to the store and the loop goes on with the next node: one failing node does
    not fail its bundle-mates. (Every rank must raise alike, as an injected failure or a
    non-finite loss does; a rank that dies is Train's to restart, the whole loop then resuming.)
    """
    import traceback

    import ray.train

    jobs = [NodeJob.from_dict(item) for item in config[BUNDLE_KEY]]
    attempts = int(config.get("max_failures", 0)) + 1
    rank = ray.train.get_context().get_world_rank()
    for job in jobs:
        store = StageStore(job.storage)
        key = job.node.key
        if store.is_complete(key):
            continue
        for attempt in range(1, attempts + 1):
            try:
                if job.inject_failure:
                    raise RuntimeError(job.inject_failure)
                _run_node(
                    job,
                    config.get(DRIVER_STARTED_KEY),
                    load_resume_point(store, key),
                    in_bundle=True,
                )
                break
            except Exception as err:
                if rank == 0 and attempt == attempts:
                    text = str(err).strip().splitlines()
                    message = f"{type(err).__name__}: {text[0]}" if text else type(err).__name__
                    store.write_error(key, message, traceback.format_exc())


def _run_node(
    job: NodeJob, driver_started_at: Any, resume: Mapping[str, Any] | None, in_bundle: bool
) -> None:
    """One node on this worker, resuming from ``resume``; rank 0 records and writes its result.

    Checkpoints: alone, a Train checkpoint (the Train run is named by the node key); in a
    bundle, the node's resume point in the store (``save_resume_point``), and each report
    carries ``node_key`` so Tune's callbacks know which node it is about.
    """
    import ray.train
    import ray.train.torch

    node = job.node
    started = time.monotonic()
    timing: dict[str, float] = {"worker_started_at": time.time(), "report_s": 0.0}
    if isinstance(driver_started_at, int | float):
        timing["driver_started_at"] = float(driver_started_at)
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    store = StageStore(job.storage)
    resumed_from = int(resume["epoch"]) if resume is not None else 0
    earlier_wall_s = float(resume.get(WALL_KEY, 0.0)) if resume is not None else 0.0
    gpus = float(job.gpus_per_worker)
    node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
    worker_nodes = ",".join(_gather_strings(node_id))
    if rank == 0:
        truncate_epochs(store, node.key, keep_through=resumed_from)
    throttle = ReportThrottle(float(job.report_interval_s))

    def report(metrics: dict[str, float], checkpoint_state: dict[str, Any] | None) -> None:
        entered = time.perf_counter()
        try:
            _report(metrics, checkpoint_state)
        finally:
            timing["report_s"] += time.perf_counter() - entered
            timing["last_report_at"] = time.time()

    def _report(metrics: dict[str, float], checkpoint_state: dict[str, Any] | None) -> None:
        if rank == 0:
            record = {
                **metrics,
                "node": node.key,
                "stage": node.stage,
                "world_size": world,
                "resumed_from": resumed_from,
                "worker_nodes": worker_nodes,
                "torch_threads": torch.get_num_threads(),
                "time": time.time(),
            }
            store.append_epoch(node.key, record)
        if not throttle.due(metrics, checkpoint_state is not None):
            return
        if checkpoint_state is not None:
            checkpoint_state = {
                **checkpoint_state,
                WALL_KEY: earlier_wall_s + time.monotonic() - started,
            }
        if in_bundle:
            if rank == 0 and checkpoint_state is not None:
                save_resume_point(store, node.key, checkpoint_state)
            ray.train.report({**metrics, "node_key": node.key})
        elif rank == 0 and checkpoint_state is not None:
            with tempfile.TemporaryDirectory(prefix=f"ckpt-{node.key}-") as folder:
                torch.save(checkpoint_state, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    result = run_stage(
        node,
        cache=job.cache,
        store=store,
        device=ray.train.torch.get_device(),
        report=report,
        resume=resume,
        checkpoint_every=int(job.checkpoint_every),
    )
    if rank == 0:
        wall_s = earlier_wall_s + time.monotonic() - started
        timing["stage_ended_at"] = time.time()
        metrics = {
            **result.metrics,
            "wall_s": wall_s,
            "gpu_s": wall_s * gpus * world,
            "timing": timing,
        }
        store.write_result(node.key, result.state, metrics)
        resume_path(store, node.key).unlink(missing_ok=True)


def resume_path(store: StageStore, key: str) -> Path:
    """``stages/<key>/resume.pt``: the node's last checkpoint state when it ran in a bundle."""
    return store.node_dir(key) / RESUME_FILE


def save_resume_point(store: StageStore, key: str, state: Mapping[str, Any]) -> None:
    """Write the node's checkpoint state to its resume point, atomically (temp file + rename)."""
    path = resume_path(store, key)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)


def load_resume_point(store: StageStore, key: str) -> dict[str, Any] | None:
    """The node's resume point (``resume_path``) or None; one that does not load is ignored
    (the node then starts over)."""
    path = resume_path(store, key)
    if not path.is_file():
        return None
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except Exception:
        return None


def run_stage(
    node: StageNode,
    cache: str | os.PathLike[str],
    store: StageStore,
    device: torch.device,
    report: ReportFn | None = None,
    resume: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1,
) -> StageResult:
    """Build the node's ``StageContext`` (``trainers.point.stage_context``) and run its kind's
    function (``trainers.registry``); returns its ``StageResult``.

    Needs no Ray (used by ``train_node`` and the in-process benchmark baseline). The parent's
    weights come from ``store`` (its ``model.pt``, loaded weights_only).
    """
    kind = get_stage(node.stage)
    stage_cfg = from_dict(kind.config, node.config, node.stage)
    ctx = stage_context(
        load_slice_cache(cache),
        from_dict(SplitConfig, node.split, "split"),
        node.split_index,
        node.seed,
        node.label_fraction,
        device,
        report=report,
        init_state=store.load_state(node.parent) if node.parent is not None else None,
        init_parts=tuple(node.init_parts),
        resume=resume,
        checkpoint_every=checkpoint_every,
    )
    return kind.run(stage_cfg, from_dict(ModelConfig, node.model, "model"), ctx)


def truncate_epochs(store: StageStore, key: str, keep_through: int) -> None:
    """Keep only the epoch records with ``epoch <= keep_through`` (atomic rewrite).

    A restarted run repeats the epochs after its checkpoint; their earlier records go first so
    that ``epochs.jsonl`` lists every epoch once. No file, or nothing to drop: nothing written.
    """
    records = store.read_epochs(key)
    kept = [r for r in records if _epoch_of(r) <= keep_through]
    if len(kept) == len(records):
        return
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept)
    atomic_write_text(store.node_dir(key) / "epochs.jsonl", text)


def _epoch_of(record: Mapping[str, Any]) -> int:
    try:
        return int(record.get("epoch", 0))
    except (TypeError, ValueError):
        return 0


def _load_checkpoint(checkpoint: Any) -> dict[str, Any] | None:
    """The stage checkpoint state inside a Ray Train ``Checkpoint`` (None when there is none)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as folder:
        path = Path(folder) / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path}: Train checkpoint lacks {CHECKPOINT_FILE}")
        return torch.load(path, weights_only=True, map_location="cpu")


def _gather_strings(value: str) -> list[str]:
    """``value`` from every rank, in rank order (just ``[value]`` outside torch.distributed)."""
    if not (torch_dist.is_available() and torch_dist.is_initialized()):
        return [value]
    gathered: list[Any] = [None] * torch_dist.get_world_size()
    torch_dist.all_gather_object(gathered, value)
    return [str(v) for v in gathered]
