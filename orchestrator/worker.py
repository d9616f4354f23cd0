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
goes on. With ``resources.fuse_finetunes`` the bundle's fusable fine-tunings first train as one
fused model (``_run_fused_groups``, ``trainers.fused``), each written as an ordinary node whose
metrics and epoch records add ``fused`` (K) and whose ``wall_s`` is its 1 / K share.

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
from trainers.loop import ReportFn, StageContext, StageResult
from trainers.point import stage_context
from trainers.registry import get_stage

CHECKPOINT_FILE = "checkpoint_state.pt"
DRIVER_STARTED_KEY = "driver_started_at"  # train_loop_config: when the node's driver started
FUSE_KEY = "fuse_finetunes"  # a bundle's train_loop_config: resources.fuse_finetunes
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

    With ``config[FUSE_KEY]`` (``resources.fuse_finetunes``) and one worker, the bundle's
    fusable fine-tunings first train fused (``_run_fused_groups``); every node that did not
    complete there (not fusable, failed, or its group raised) then runs in the loop above.
    """
    import traceback

    import ray.train

    jobs = [NodeJob.from_dict(item) for item in config[BUNDLE_KEY]]
    attempts = int(config.get("max_failures", 0)) + 1
    rank = ray.train.get_context().get_world_rank()
    if config.get(FUSE_KEY) and ray.train.get_context().get_world_size() == 1:
        _run_fused_groups(jobs, config.get(DRIVER_STARTED_KEY))  # the rest: one after another
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


class _NodeRecorder:
    """What rank 0 records of one node run on this worker (``_run_node``, ``_run_fused``): its
    epoch records, reports to Train, checkpoints and, at the end, its result with timing.

    ``share``: the node's share of this worker's wall time (1 alone; 1 / K for each of K fused
    fine-tunings, so that ``wall_s`` and ``gpu_s`` summed over nodes stay the worker's).
    ``throttle``: fused members share one (``_run_fused``): their epochs end together, and K
    Train reports in a row would each wait for Train's poll; a fused member's checkpoint goes to
    its resume point whether or not that epoch is reported to Train."""

    def __init__(
        self,
        job: NodeJob,
        driver_started_at: Any,
        resume: Mapping[str, Any] | None,
        in_bundle: bool,
        share: float = 1.0,
        throttle: ReportThrottle | None = None,
    ) -> None:
        import ray.train

        self.job, self.node, self.in_bundle, self.share = job, job.node, in_bundle, share
        self.started = time.monotonic()
        self.timing: dict[str, float] = {"worker_started_at": time.time(), "report_s": 0.0}
        if isinstance(driver_started_at, int | float):
            self.timing["driver_started_at"] = float(driver_started_at)
        context = ray.train.get_context()
        self.rank, self.world = context.get_world_rank(), context.get_world_size()
        self.store = StageStore(job.storage)
        self.resume = resume
        self.resumed_from = int(resume["epoch"]) if resume is not None else 0
        self.earlier_wall_s = float(resume.get(WALL_KEY, 0.0)) if resume is not None else 0.0
        node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else "local"
        self.worker_nodes = ",".join(_gather_strings(node_id))
        if self.rank == 0:
            truncate_epochs(self.store, self.node.key, keep_through=self.resumed_from)
        self.shared_throttle = throttle is not None
        self.throttle = throttle or ReportThrottle(float(job.report_interval_s))

    def wall_s(self) -> float:
        return self.earlier_wall_s + (time.monotonic() - self.started) * self.share

    def report(self, metrics: dict[str, float], checkpoint_state: dict[str, Any] | None) -> None:
        entered = time.perf_counter()
        try:
            self._report(metrics, checkpoint_state)
        finally:
            self.timing["report_s"] += time.perf_counter() - entered
            self.timing["last_report_at"] = time.time()

    def _report(self, metrics: dict[str, float], checkpoint_state: dict[str, Any] | None) -> None:
        import ray.train

        node, store, rank = self.node, self.store, self.rank
        if rank == 0:
            record = {
                **metrics,
                "node": node.key,
                "stage": node.stage,
                "world_size": self.world,
                "resumed_from": self.resumed_from,
                "worker_nodes": self.worker_nodes,
                "torch_threads": torch.get_num_threads(),
                "time": time.time(),
            }
            if self.share != 1.0:
                record["fused"] = round(1.0 / self.share)
            store.append_epoch(node.key, record)
        if checkpoint_state is not None:
            checkpoint_state = {**checkpoint_state, WALL_KEY: self.wall_s()}
        if self.shared_throttle:  # a fused member (always in a bundle)
            if rank == 0 and checkpoint_state is not None:
                save_resume_point(store, node.key, checkpoint_state)
            if self.throttle.due(metrics, False):
                ray.train.report({**metrics, "node_key": node.key})
            return
        if not self.throttle.due(metrics, checkpoint_state is not None):
            return
        if self.in_bundle:
            if rank == 0 and checkpoint_state is not None:
                save_resume_point(store, node.key, checkpoint_state)
            ray.train.report({**metrics, "node_key": node.key})
        elif rank == 0 and checkpoint_state is not None:
            with tempfile.TemporaryDirectory(prefix=f"ckpt-{node.key}-") as folder:
                torch.save(checkpoint_state, Path(folder) / CHECKPOINT_FILE)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(folder))
        else:
            ray.train.report(metrics)

    def write_result(self, result: StageResult) -> None:
        """Rank 0: the node's result (model, metrics with ``wall_s``, ``gpu_s``, ``timing``;
        ``fused``: K when it trained fused with K - 1 others), then its resume point goes."""
        if self.rank != 0:
            return
        wall_s = self.wall_s()
        self.timing["stage_ended_at"] = time.time()
        metrics = {
            **result.metrics,
            "wall_s": wall_s,
            "gpu_s": wall_s * float(self.job.gpus_per_worker) * self.world,
            "timing": self.timing,
        }
        if self.share != 1.0:
            metrics["fused"] = round(1.0 / self.share)
        self.store.write_result(self.node.key, result.state, metrics)
        resume_path(self.store, self.node.key).unlink(missing_ok=True)


def _run_node(
    job: NodeJob, driver_started_at: Any, resume: Mapping[str, Any] | None, in_bundle: bool
) -> None:
    """One node on this worker, resuming from ``resume``; rank 0 records and writes its result.

    Checkpoints: alone, a Train checkpoint (the Train run is named by the node key); in a
    bundle, the node's resume point in the store (``save_resume_point``), and each report
    carries ``node_key`` so Tune's callbacks know which node it is about.
    """
    import ray.train.torch

    recorder = _NodeRecorder(job, driver_started_at, resume, in_bundle)
    result = run_stage(
        job.node,
        cache=job.cache,
        store=recorder.store,
        device=ray.train.torch.get_device(),
        report=recorder.report,
        resume=resume,
        checkpoint_every=int(job.checkpoint_every),
    )
    recorder.write_result(result)


def _run_fused_groups(jobs: list[NodeJob], driver_started_at: Any) -> None:
    """Train the incomplete fine-tuning nodes of ``jobs`` fused (``trainers.fused``), in groups
    of one stage config, model config, data cache and resume epoch; groups of one node, or
    that ``fusable`` refuses, are left to the caller, as are members that fail and every member
    of a group whose fused run raises (each then resumes alone from its own resume point)."""
    groups: dict[str, list[tuple[NodeJob, Mapping[str, Any] | None]]] = {}
    for job in jobs:
        node = job.node
        store = StageStore(job.storage)
        if node.stage != "finetune" or job.inject_failure or store.is_complete(node.key):
            continue
        resume = load_resume_point(store, node.key)
        group = json.dumps(
            [
                node.config,
                node.model,
                job.cache,
                job.checkpoint_every,
                int(resume["epoch"]) if resume is not None else 0,
            ],
            sort_keys=True,
            default=str,
        )
        groups.setdefault(group, []).append((job, resume))
    for members in groups.values():
        if len(members) > 1:
            _run_fused(members, driver_started_at)


def _run_fused(
    members: list[tuple[NodeJob, Mapping[str, Any] | None]], driver_started_at: Any
) -> None:
    """One fused run of ``members`` (jobs with their resume points); each member that completes
    is written to the store as an ordinary node (``_NodeRecorder.write_result``). Anything
    raised on the way (a missing parent, the fused run itself) leaves the members to the
    bundle's ordinary loop, which records their own errors."""
    import ray.train.torch

    from trainers.fused import FusedRunError, fusable, run_finetunes_fused

    try:
        device = ray.train.torch.get_device()
        share = 1.0 / len(members)
        throttle = ReportThrottle(float(members[0][0].report_interval_s))
        recorders = [
            _NodeRecorder(job, driver_started_at, resume, True, share, throttle)
            for job, resume in members
        ]
        contexts: list[StageContext] = []
        for (job, resume), recorder in zip(members, recorders, strict=True):
            cfg, model_cfg, ctx = node_context(
                job.node,
                job.cache,
                recorder.store,
                device,
                recorder.report,
                resume,
                int(job.checkpoint_every),
            )
            contexts.append(ctx)
        reason = fusable(cfg, model_cfg, contexts)
        if reason is not None:
            print(f"fuse_finetunes: {len(members)} nodes run one by one: {reason}", flush=True)
            return
        results: list[StageResult | None] = list(run_finetunes_fused(cfg, model_cfg, contexts))
    except FusedRunError as err:
        results = err.results
    except Exception as err:  # the members run one by one, each from its resume point
        print(f"fuse_finetunes: fused run raised {err!r}; its nodes run one by one", flush=True)
        return
    for recorder, result in zip(recorders, results, strict=True):
        if result is not None:
            recorder.write_result(result)


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


def node_context(
    node: StageNode,
    cache: str | os.PathLike[str],
    store: StageStore,
    device: torch.device,
    report: ReportFn | None = None,
    resume: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1,
) -> tuple[Any, ModelConfig, StageContext]:
    """The node's stage config, model config and ``StageContext``
    (``trainers.point.stage_context``; the parent's weights from ``store``, weights_only)."""
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
    return stage_cfg, from_dict(ModelConfig, node.model, "model"), ctx


def run_stage(
    node: StageNode,
    cache: str | os.PathLike[str],
    store: StageStore,
    device: torch.device,
    report: ReportFn | None = None,
    resume: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1,
) -> StageResult:
    """Build the node's ``StageContext`` (``node_context``) and run its kind's function
    (``trainers.registry``); returns its ``StageResult``.

    Needs no Ray (used by ``train_node`` and the in-process benchmark baseline). The parent's
    weights come from ``store`` (its ``model.pt``, loaded weights_only).
    """
    stage_cfg, model_cfg, ctx = node_context(
        node, cache, store, device, report, resume, checkpoint_every
    )
    return get_stage(node.stage).run(stage_cfg, model_cfg, ctx)


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
