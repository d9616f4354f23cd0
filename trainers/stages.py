"""The stage loops: global pretraining, local pretraining, fine-tuning (METHOD.md, "Stages").

Every stage function reads as the same few named steps:

1. **build** (``_build``): seed, model, the parent stage's parts (``transfer_weights``), Adam over
   *all* trainable parameters (projection heads included), DDP when ``torch.distributed`` is up,
   and the state of ``ctx.resume`` when continuing an interrupted run;
2. **load** the stage's slices onto the device once (``_device_slices``);
3. **fit** (``_fit``): per epoch one pass over shuffled index batches with the stage's step
   function, an optional evaluation (fine-tuning: validation Dice), one report per epoch and a
   checkpoint every ``ctx.checkpoint_every`` epochs and at the last epoch;
4. **evaluate** (fine-tuning): Dice on the validation and test volumes (``evaluate_model``).

Data use (docs/ARCHITECTURE.md; each stage's ``*_reads`` function in ``trainers.registry``,
resolved by ``resolve_volumes``, is the single place that decides it): global
reads all slices of ``split.train``, unlabelled; local supervised the slices of ``labelled``;
local self all of ``split.train``, unlabelled; fine-tuning the slices of ``labelled`` (Mean
Teacher also unlabelled slices of ``split.train``). ``split.val`` is read only by the per-epoch
validation, ``split.test`` only by the final evaluation.

Randomness: ``seed_everything(ctx.seed)`` before the model is built, then per epoch two explicit
generators derived from (seed, stage, epoch): an *order* generator, identical on every rank,
for the epoch's permutation, and an *augment* generator (also keyed by rank) for augmentation,
Mixup pairings and unlabelled draws; a NumPy generator keyed the same way draws Mixup's lambda
on the host. Since nothing random is carried from one epoch to the next, a run resumed from the
checkpoint of epoch e repeats epochs e+1.. exactly (bit-identical on CPU).

Devices: on CUDA the network runs under ``torch.autocast(bfloat16)`` with channels_last inputs
and weights, losses are computed in float32; on CPU everything is float32. The per-epoch loss is
accumulated on the device and read once per epoch (no per-step host synchronisation).

Distributed (``torch.distributed`` initialised, e.g. inside a Ray Train worker): the model is
wrapped in ``DistributedDataParallel`` (``find_unused_parameters=True``: every stage leaves some
heads unused) and every pass goes through the wrapper's ``forward`` (``UNet.forward``'s
``output`` selector). ``batch_size`` is per rank: each epoch's permutation, equal on all ranks,
is cut to a multiple of the world size and rank r takes every world-th index from r. Reported
metrics are all-reduced (loss and slice counts summed, seconds maximised), so every rank reports
the same numbers; validation and test evaluation run whole on every rank.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainers import seed_everything
from trainers.augment import (
    global_view_args,
    global_views,
    intensity_args,
    intensity_augment,
    intensity_views,
    spatial_args,
    spatial_augment,
)
from trainers.config import FinetuneConfig, GlobalConfig, LocalConfig, ModelConfig
from trainers.data import SliceData, Split
from trainers.losses import (
    nt_xent,
    partition_global_loss,
    partition_of,
    segmentation_loss,
    self_local_contrastive,
    supervised_local_contrastive,
)
from trainers.metrics import evaluate_volumes
from trainers.model import UNet, transfer_weights, unwrap_model
from trainers.registry import finetune_reads, global_reads, local_reads, resolve_volumes

ReportFn = Callable[[dict[str, float], dict[str, Any] | None], None]
StepFn = Callable[["_Step"], Tensor]


@dataclass
class StageContext:
    """Everything a stage needs besides its own config and the model config.

    ``report(metrics, checkpoint_state)`` is called once per epoch on every rank; the
    checkpoint state (every ``checkpoint_every`` epochs and at the last one, else None) is
    {"stage", "epoch", "model", "optimizer", "train_seconds", "last_metrics"} plus "teacher"
    for Mean Teacher, all tensors on CPU. Passing such a state back as ``resume`` continues
    from the epoch after it.
    """

    data: SliceData
    split: Split
    labelled: tuple[int, ...]
    seed: int
    device: torch.device
    report: ReportFn | None = None
    init_state: Mapping[str, Tensor] | None = None
    init_parts: tuple[str, ...] = ()
    resume: Mapping[str, Any] | None = None
    checkpoint_every: int = 1

    def __post_init__(self) -> None:
        self.device = torch.device(self.device)
        self.labelled = tuple(self.labelled)
        outside = sorted(set(self.labelled) - set(self.split.train))
        if outside:
            raise ValueError(
                f"labelled: volumes {outside} are not training volumes of split {self.split.index}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: must be an integer >= 0, got {self.seed!r}")
        if (
            isinstance(self.checkpoint_every, bool)
            or not isinstance(self.checkpoint_every, int)
            or self.checkpoint_every < 1
        ):
            raise ValueError(
                f"checkpoint_every: must be an integer >= 1, got {self.checkpoint_every!r}"
            )
        if self.init_parts and self.init_state is None:
            raise ValueError(f"init_parts: {self.init_parts} given but init_state is None")


@dataclass
class StageResult:
    """``state``: the full UNet state_dict on CPU (no DDP prefix); ``metrics``: final metrics
    (``loss`` and ``train_seconds``; fine-tuning adds ``val_*`` and ``test_*`` Dice)."""

    state: dict[str, Tensor]
    metrics: dict[str, float]


@dataclass
class _DeviceSlices:
    """Slices on the training device: images (S, 1, H, W) float32, labels (S, H, W) int64 or
    None, position (S,) float32 in [0, 1)."""

    images: Tensor
    labels: Tensor | None
    position: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _device_slices(
    data: SliceData, volumes: tuple[int, ...], device: torch.device, labels: bool
) -> _DeviceSlices:
    """Copy the slices of ``volumes`` to ``device`` once (the arrays may be memory-mapped)."""
    index = data.slices_of(volumes)
    if index.size == 0:
        raise ValueError(f"volumes {list(volumes)[:8]} hold no slices")
    images = torch.from_numpy(np.ascontiguousarray(data.images[index])).unsqueeze(1).to(device)
    label_maps = (
        torch.from_numpy(data.labels[index].astype(np.int64)).to(device) if labels else None
    )
    position = torch.from_numpy(np.ascontiguousarray(data.position[index])).to(device)
    return _DeviceSlices(images, label_maps, position)


# ---------------------------------------------------------------------------------------------
# device, precision and distribution


@dataclass(frozen=True)
class _Dist:
    """This process's place in ``torch.distributed`` (rank 0 of 1 when it is not initialised)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> _Dist:
        if torch_dist.is_available() and torch_dist.is_initialized():
            return _Dist(torch_dist.get_rank(), torch_dist.get_world_size())
        return _Dist()

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) ``tensor`` across ranks in place; a no-op in a single process."""
        if self.world > 1:
            torch_dist.all_reduce(
                tensor, op=torch_dist.ReduceOp.SUM if op == "sum" else torch_dist.ReduceOp.MAX
            )
        return tensor


def _autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing elsewhere (CPU trains in float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def _derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _torch_generator(device: torch.device, *parts: object) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(_derived_seed(*parts))
    return generator


def _to_cpu(value: Any) -> Any:
    """Deep copy of a (nested) state with every tensor detached, cloned and on CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: _to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(v) for v in value)
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# build


@dataclass
class _Run:
    """One stage's live training state, shared by the step functions and ``_fit``."""

    stage: str
    ctx: StageContext
    model: UNet  # the unwrapped network: states and evaluation
    net: nn.Module  # what training passes call: ``model`` or DDP(model)
    optimizer: torch.optim.Optimizer
    dist: _Dist
    lr: float = 0.0  # the peak learning rate; the schedule scales it at every step
    lr_schedule: str = "constant"
    start_epoch: int = 1
    train_seconds: float = 0.0
    last_metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, nn.Module] = field(default_factory=dict)  # checkpointed with the model

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    def forward(self, x: Tensor, output: str = "logits") -> Tensor:
        """The network (through DDP when distributed) on ``x`` (B, 1, H, W), in float32 out."""
        with _autocast(self.device):
            out = self.net(x.contiguous(memory_format=_memory_format(self.device)), output=output)
        return out.float()

    def add_extra(self, name: str, module: nn.Module) -> None:
        """Track ``module`` (e.g. the Mean Teacher) in checkpoints; restore it when resuming."""
        self.extras[name] = module
        if self.ctx.resume is not None:
            if name not in self.ctx.resume:
                raise ValueError(f"resume: checkpoint of stage {self.stage!r} lacks {name!r}")
            module.load_state_dict(self.ctx.resume[name])

    def checkpoint(self, epoch: int) -> dict[str, Any]:
        state: dict[str, Any] = {
            "stage": self.stage,
            "epoch": epoch,
            "model": _to_cpu(self.model.state_dict()),
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "train_seconds": self.train_seconds,
            "last_metrics": dict(self.last_metrics),
        }
        for name, module in self.extras.items():
            state[name] = _to_cpu(module.state_dict())
        return state


def _build(stage: str, cfg: Any, model_cfg: ModelConfig, ctx: StageContext) -> _Run:
    """Seed, build the UNet, load the parent's parts, create Adam (``cfg.lr``,
    ``cfg.weight_decay``; ``cfg.lr_schedule`` applied by ``_fit``), wrap in DDP, resume."""
    seed_everything(ctx.seed)
    model = UNet(model_cfg, in_channels=1, num_classes=ctx.data.num_classes)
    if ctx.init_parts:
        transfer_weights(ctx.init_state, model, ctx.init_parts)
    model = model.to(ctx.device, memory_format=_memory_format(ctx.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = _Run(stage, ctx, model, model, optimizer, _Dist.current(), cfg.lr, cfg.lr_schedule)
    if ctx.resume is not None:
        if ctx.resume.get("stage") != stage:
            raise ValueError(
                f"resume: checkpoint is of stage {ctx.resume.get('stage')!r}, not {stage!r}"
            )
        model.load_state_dict(ctx.resume["model"])
        optimizer.load_state_dict(ctx.resume["optimizer"])
        run.start_epoch = int(ctx.resume["epoch"]) + 1
        run.train_seconds = float(ctx.resume.get("train_seconds", 0.0))
        run.last_metrics = dict(ctx.resume.get("last_metrics", {}))
    if run.dist.world > 1:
        device_ids = (
            [ctx.device.index]
            if ctx.device.type == "cuda" and ctx.device.index is not None
            else None
        )
        run.net = nn.parallel.DistributedDataParallel(
            model, device_ids=device_ids, find_unused_parameters=True
        )
    return run


# ---------------------------------------------------------------------------------------------
# fit: the shared epoch loop


@dataclass(frozen=True)
class _Step:
    """What a step function gets: ``batch`` (b,) indices into the stage's device slices, the
    epoch's augment generator ``gen`` (device) and host generator ``rng``, the 0-based optimiser
    step since the stage began, and ``progress`` = epochs completed (fractional)."""

    batch: Tensor
    gen: torch.Generator
    rng: np.random.Generator
    step: int
    progress: float


def _steps_per_epoch(num_slices: int, batch_size: int, min_batch: int, dist: _Dist) -> int:
    """How many batches ``_epoch_batches`` yields per rank (the same every epoch)."""
    full, rest = divmod(num_slices // dist.world, batch_size)
    return full + (1 if rest and rest >= min_batch else 0)


def _epoch_batches(
    num_slices: int,
    batch_size: int,
    min_batch: int,
    order: torch.Generator,
    dist: _Dist,
    device: torch.device,
) -> list[Tensor]:
    """This rank's index batches of one epoch: a permutation of ``num_slices`` (the same on every
    rank), cut to a multiple of the world size, rank r taking positions r, r + world, ...; batches
    of ``batch_size`` with a last batch smaller than ``min_batch`` dropped."""
    permutation = torch.randperm(num_slices, generator=order, device=device)
    usable = num_slices // dist.world * dist.world
    shard = permutation[:usable][dist.rank :: dist.world]
    batches = list(shard.split(batch_size))
    if batches and len(batches[-1]) < min_batch:
        batches.pop()
    return batches


def lr_factor(schedule: str, step: int, total_steps: int) -> float:
    """The learning rate of the 0-based optimiser ``step`` of ``total_steps``, as a fraction of
    the stage's ``lr``: "constant" 1; "poly" (1 - step / total) ** 0.9 (nnU-Net's schedule);
    "cosine" (1 + cos(pi * step / total)) / 2. Both decays start at 1 and approach 0 at the
    end of the budget, so a fixed step budget ends on a settled model."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    if schedule == "poly":
        return (1.0 - progress) ** 0.9
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0


def _train_epoch(
    run: _Run,
    epoch: int,
    batches: list[Tensor],
    steps_per_epoch: int,
    step_fn: StepFn,
    after_step: Callable[[int], None] | None,
    total_steps: int,
) -> tuple[Tensor, int]:
    """One pass over ``batches``: (sum of batch loss x batch size, on the device; slices seen).

    Before each optimiser step the learning rate is ``run.lr * lr_factor(...)`` of the step's
    position in the ``total_steps`` budget, so a resumed run continues the same schedule.

    The epoch's augment generator and host generator are derived from (seed, stage, epoch, rank),
    so an epoch's randomness does not depend on the epochs before it.
    """
    seed, device, rank = run.ctx.seed, run.device, run.dist.rank
    gen = _torch_generator(device, seed, run.stage, epoch, "augment", rank)
    rng = np.random.default_rng(_derived_seed(seed, run.stage, epoch, "host", rank))
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for i, batch in enumerate(batches):
        step = (epoch - 1) * steps_per_epoch + i
        loss = step_fn(_Step(batch, gen, rng, step, (epoch - 1) + i / len(batches)))
        if run.lr_schedule != "constant":
            for group in run.optimizer.param_groups:
                group["lr"] = run.lr * lr_factor(run.lr_schedule, step, total_steps)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        run.optimizer.step()
        if after_step is not None:
            after_step(step + 1)
        loss_sum += loss.detach().double() * len(batch)
        seen += len(batch)
    return loss_sum, seen


def _fit(
    run: _Run,
    cfg: Any,
    *,
    num_slices: int,
    step_fn: StepFn,
    min_batch: int = 1,
    after_step: Callable[[int], None] | None = None,
    evaluate: Callable[[], dict[str, float]] | None = None,
    evaluate_every: int = 1,
    evaluate_every_steps: int = 0,
) -> None:
    """Train ``run`` from ``run.start_epoch`` for the stage config's budget (``cfg.epochs`` or
    ``cfg.steps``, batches of ``cfg.batch_size``); report each epoch.

    A step budget runs ceil(steps / steps_per_epoch) epochs, the last one cut short, so that
    exactly ``steps`` optimiser updates happen whatever the number of slices (label fractions
    compared at equal updates, METHOD.md). ``step_fn`` returns the batch's mean loss (a scalar
    with grad); ``after_step(n)`` runs after the n-th optimiser step (1-based, e.g. an EMA
    update); ``evaluate()`` adds metrics after every ``evaluate_every``-th epoch, or with
    ``evaluate_every_steps`` > 0 after every epoch in which the step count passed a multiple of
    it, and after the last epoch. Each epoch reports ``epoch``, ``steps`` (optimiser steps so
    far), ``loss`` (mean over the epoch's slices, all ranks), ``seconds`` (training time,
    slowest rank) and ``slices_per_s`` (all ranks' slices / seconds).
    """
    ctx, device, dist = run.ctx, run.device, run.dist
    batch_size = cfg.batch_size
    steps_per_epoch = _steps_per_epoch(num_slices, batch_size, min_batch, dist)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{run.stage}: {num_slices} training slices over {dist.world} rank(s) give no batch of "
            f">= {min_batch} slices (batch_size {batch_size})"
        )
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    last_epoch = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(run.start_epoch, last_epoch + 1):
        order = _torch_generator(device, ctx.seed, run.stage, epoch, "order")
        batches = _epoch_batches(num_slices, batch_size, min_batch, order, dist, device)
        done_before = (epoch - 1) * steps_per_epoch
        batches = batches[: total_steps - done_before]
        started = time.perf_counter()
        loss_sum, seen = _train_epoch(
            run, epoch, batches, steps_per_epoch, step_fn, after_step, total_steps
        )
        totals = dist.all_reduce(torch.stack([loss_sum, loss_sum.new_tensor(float(seen))]))
        total_loss, total_seen = totals.tolist()  # the epoch's one host synchronisation
        seconds = dist.all_reduce(
            torch.tensor(time.perf_counter() - started, dtype=torch.float64, device=device), "max"
        ).item()
        mean_loss = total_loss / total_seen
        if not math.isfinite(mean_loss):
            raise FloatingPointError(f"{run.stage}: loss is {mean_loss} in epoch {epoch}")
        run.train_seconds += seconds
        done = done_before + len(batches)
        metrics = {
            "epoch": epoch,
            "steps": done,
            "loss": mean_loss,
            "seconds": seconds,
            "slices_per_s": total_seen / seconds,
        }
        if evaluate_every_steps > 0:
            due_eval = done // evaluate_every_steps > done_before // evaluate_every_steps
        else:
            due_eval = epoch % evaluate_every == 0
        if evaluate is not None and (due_eval or epoch == last_epoch):
            metrics.update(evaluate())
        run.last_metrics = metrics
        due = epoch % ctx.checkpoint_every == 0 or epoch == last_epoch
        if ctx.report is not None:
            ctx.report(dict(metrics), run.checkpoint(epoch) if due else None)


def _final_metrics(run: _Run) -> dict[str, float]:
    return {
        "loss": float(run.last_metrics.get("loss", math.nan)),
        "steps": int(run.last_metrics.get("steps", 0)),
        "train_seconds": run.train_seconds,
    }


# ---------------------------------------------------------------------------------------------
# evaluation


def _predict_and_score(
    model: nn.Module,
    images: Tensor,
    labels: Tensor,
    volume: Tensor,
    num_classes: int,
    device: torch.device,
    batch_size: int,
) -> dict[str, float]:
    """Argmax predictions of ``model`` on ``images`` (S, 1, H, W) in eval mode, batch by batch,
    scored against ``labels`` (S, H, W) with ``evaluate_volumes`` (pooled and per-volume Dice)."""
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    predictions = []
    try:
        with torch.inference_mode(), _autocast(device):
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True)
                predictions.append(
                    module(x.contiguous(memory_format=_memory_format(device))).argmax(1)
                )
    finally:
        module.train(was_training)
    return evaluate_volumes(
        torch.cat(predictions), labels.to(device), volume.to(device), num_classes
    )


def evaluate_model(
    model: nn.Module,
    data: SliceData,
    volumes: tuple[int, ...],
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """Dice of ``model``'s predictions on every slice of ``volumes`` (see ``evaluate_volumes``):
    ``dice_pooled_c{k}``, ``dice_pooled_mean``, ``dice_volume_c{k}``, ``dice_volume_mean``,
    ``n_volumes``. An empty ``volumes`` gives {}. The model's train/eval mode is restored."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not volumes:
        return {}
    index = data.slices_of(volumes)
    images = torch.from_numpy(np.ascontiguousarray(data.images[index])).unsqueeze(1)
    labels = torch.from_numpy(data.labels[index].astype(np.int64))
    volume = torch.from_numpy(data.volume[index].astype(np.int64))
    return _predict_and_score(
        model, images, labels, volume, data.num_classes, torch.device(device), batch_size
    )


def _prefixed(prefix: str, metrics: Mapping[str, float]) -> dict[str, float]:
    return {f"{prefix}_{key}": float(value) for key, value in metrics.items()}


# ---------------------------------------------------------------------------------------------
# the stages


def run_global(cfg: GlobalConfig, model: ModelConfig, ctx: StageContext) -> StageResult:
    """Global contrastive pretraining of encoder + global head on all training slices.

    Per batch x (B, 1, H, W): two ``global_views`` v1, v2; z_i = global_embedding(v_i) (B, D);
    loss ``nt_xent(z1, z2, T)`` or, for loss="partition", ``partition_global_loss(z1, z2, p, T)``
    with partition p = floor(position * n_parts). A last batch of fewer than 2 slices is dropped.
    """
    run = _build("global", cfg, model, ctx)
    volumes = resolve_volumes(global_reads(cfg), ctx.split, ctx.labelled)["train"]
    train = _device_slices(ctx.data, volumes, ctx.device, labels=False)

    def step(s: _Step) -> Tensor:
        v1, v2 = global_views(train.images[s.batch], s.gen, **global_view_args(cfg.augment))
        z1, z2 = run.forward(torch.cat([v1, v2]), output="global").chunk(2)
        if cfg.loss == "ntxent":
            return nt_xent(z1, z2, temperature=cfg.temperature)
        partition = partition_of(train.position[s.batch], cfg.n_parts)
        return partition_global_loss(z1, z2, partition, temperature=cfg.temperature)

    _fit(
        run,
        cfg,
        num_slices=len(train),
        step_fn=step,
        min_batch=2,
    )
    return StageResult(_to_cpu(run.model.state_dict()), _final_metrics(run))


def run_local(cfg: LocalConfig, model: ModelConfig, ctx: StageContext) -> StageResult:
    """Local contrastive pretraining of encoder + decoder + local head.

    supervised: labelled slices x (B, 1, H, W), y (B, H, W); two ``intensity_views``;
    emb = local_embedding(cat(v1, v2)) (2B, D, H, W), labels cat(y, y);
    ``supervised_local_contrastive(emb, labels, T, strategy, stride, block_size, form)``.
    self: all training slices; e1, e2 = the two views' embeddings;
    ``self_local_contrastive(e1, e2, self_regions, T)``.
    """
    cfg.check_image_size(int(ctx.data.images.shape[-1]))
    run = _build("local", cfg, model, ctx)
    supervised = cfg.loss == "supervised"
    volumes = resolve_volumes(local_reads(cfg), ctx.split, ctx.labelled)["train"]
    train = _device_slices(ctx.data, volumes, ctx.device, labels=supervised)

    def step(s: _Step) -> Tensor:
        v1, v2 = intensity_views(train.images[s.batch], s.gen, **intensity_args(cfg.augment))
        emb = run.forward(torch.cat([v1, v2]), output="local")
        if not supervised:
            e1, e2 = emb.chunk(2)
            return self_local_contrastive(e1, e2, cfg.self_regions, temperature=cfg.temperature)
        y = train.labels[s.batch]
        return supervised_local_contrastive(
            emb,
            torch.cat([y, y]),
            temperature=cfg.temperature,
            strategy=cfg.strategy,
            stride=cfg.stride,
            block_size=cfg.block_size,
            form=cfg.form,
        )

    _fit(
        run,
        cfg,
        num_slices=len(train),
        step_fn=step,
    )
    return StageResult(_to_cpu(run.model.state_dict()), _final_metrics(run))


def sigmoid_rampup(progress: float, length: float) -> float:
    """Laine & Aila's ramp exp(-5 (1 - t)^2), t = clip(progress / length, 0, 1); 1 if length == 0."""
    if length <= 0:
        return 1.0
    t = min(max(progress / length, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def _ema_update(teacher: nn.Module, student: nn.Module, decay: float) -> None:
    """teacher <- decay * teacher + (1 - decay) * student for parameters; buffers copied."""
    with torch.no_grad():
        for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
            t.lerp_(s, 1.0 - decay)
        for t, s in zip(teacher.buffers(), student.buffers(), strict=True):
            t.copy_(s)


def run_finetune(cfg: FinetuneConfig, model: ModelConfig, ctx: StageContext) -> StageResult:
    """Supervised fine-tuning on the labelled slices with ``segmentation_loss`` (CE + soft Dice).

    Per batch x (B, 1, H, W), y (B, H, W), after ``spatial_augment`` when ``cfg.augment``:
    - regulariser "none": L(f(x), y).
    - "mixup": lambda ~ Beta(alpha, alpha), pairing permutation pi;
      x' = lambda x + (1 - lambda) x[pi], loss lambda L(f(x'), y) + (1 - lambda) L(f(x'), y[pi]).
    - "mean_teacher": u = ``unlabelled_batch_size`` training slices drawn with replacement,
      (u_s, u_t) = ``intensity_views(u)``; loss L(f(x), y) + w(t) * mean((softmax f(u_s) -
      softmax f_teacher(u_t))^2), w(t) = consistency_weight * exp(-5 (1 - t/rampup)^2);
      after each optimiser step n the teacher's parameters move to the student's by the EMA
      with decay min(ema_decay, 1 - 1/(n + 1)). The *teacher* is evaluated and returned (as is
      usual for Mean Teacher); the student lives on only in checkpoints' "model".

    Every ``cfg.val_every``-th epoch and the last add ``val_dice_mean`` (per-volume mean) and
    ``val_dice_pooled_mean`` on ``split.val`` (skipped when it is empty). Final metrics: ``val_*`` and ``test_*`` from
    ``evaluate_model`` plus ``loss`` and ``train_seconds``. The final model is kept (no
    selection on validation Dice).
    """
    run = _build("finetune", cfg, model, ctx)
    roles = resolve_volumes(finetune_reads(cfg), ctx.split, ctx.labelled)
    train = _device_slices(ctx.data, roles["train"], ctx.device, labels=True)
    num_classes = ctx.data.num_classes

    teacher: UNet | None = None
    unlabelled: _DeviceSlices | None = None
    if cfg.regulariser == "mean_teacher":
        teacher = copy.deepcopy(run.model).requires_grad_(False)
        run.add_extra("teacher", teacher)
        unlabelled = _device_slices(ctx.data, roles["unlabelled"], ctx.device, labels=False)
    evaluated = teacher if teacher is not None else run.model

    def supervised_batch(s: _Step) -> tuple[Tensor, Tensor]:
        x, y = train.images[s.batch], train.labels[s.batch]
        if cfg.augment.spatial:
            x, y = spatial_augment(x, y, s.gen, **spatial_args(cfg.augment))
        if cfg.augment.intensity:
            x = intensity_augment(x, s.gen, **intensity_args(cfg.augment))
        return x, y

    def step(s: _Step) -> Tensor:
        x, y = supervised_batch(s)
        if cfg.regulariser == "mixup":
            lam = float(s.rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
            pair = torch.randperm(x.shape[0], generator=s.gen, device=x.device)
            logits = run.forward(lam * x + (1.0 - lam) * x[pair])
            return lam * segmentation_loss(logits, y, cfg.dice_weight) + (
                1.0 - lam
            ) * segmentation_loss(logits, y[pair], cfg.dice_weight)
        if cfg.regulariser == "mean_teacher":
            draw = torch.randint(
                len(unlabelled), (cfg.unlabelled_batch_size,), generator=s.gen, device=x.device
            )
            u_student, u_teacher = intensity_views(unlabelled.images[draw], s.gen)
            logits = run.forward(torch.cat([x, u_student]))
            with torch.no_grad(), _autocast(ctx.device):
                target = teacher(
                    u_teacher.contiguous(memory_format=_memory_format(ctx.device))
                ).float()
            consistency = F.mse_loss(logits[x.shape[0] :].softmax(1), target.softmax(1))
            ramp = (
                sigmoid_rampup(s.step, cfg.consistency_rampup_steps)
                if cfg.consistency_rampup_steps > 0
                else sigmoid_rampup(s.progress, cfg.consistency_rampup)
            )
            weight = cfg.consistency_weight * ramp
            return (
                segmentation_loss(logits[: x.shape[0]], y, cfg.dice_weight) + weight * consistency
            )
        return segmentation_loss(run.forward(x), y, cfg.dice_weight)

    def ema(step_count: int) -> None:
        _ema_update(teacher, run.model, min(cfg.ema_decay, 1.0 - 1.0 / (step_count + 1)))

    val = None
    if ctx.split.val:
        index = ctx.data.slices_of(ctx.split.val)
        val = _device_slices(ctx.data, ctx.split.val, ctx.device, labels=True)
        val_volume = torch.from_numpy(ctx.data.volume[index].astype(np.int64)).to(ctx.device)

    last_val: dict[str, Any] = {}  # _fit validates after its last epoch: that is the final model

    def validate() -> dict[str, float]:
        if val is None:
            return {}
        scores = _predict_and_score(
            evaluated, val.images, val.labels, val_volume, num_classes, ctx.device, 256
        )
        last_val["scores"] = scores
        # per-epoch names: val_dice_mean / val_dice_pooled_mean (per-volume / pooled, as before),
        # per class val_dice_c{k} (per-volume mean) and val_dice_pooled_c{k}
        out = {
            "val_dice_mean": scores["dice_volume_mean"],
            "val_dice_pooled_mean": scores["dice_pooled_mean"],
        }
        for k in range(1, num_classes):
            out[f"val_dice_c{k}"] = scores[f"dice_volume_c{k}"]
            out[f"val_dice_pooled_c{k}"] = scores[f"dice_pooled_c{k}"]
        return out

    _fit(
        run,
        cfg,
        num_slices=len(train),
        step_fn=step,
        after_step=ema if teacher is not None else None,
        evaluate=validate,
        evaluate_every=cfg.val_every,
        evaluate_every_steps=cfg.val_every_steps,
    )
    metrics = _final_metrics(run)
    if last_val:  # no second pass over the validation volumes
        final_val = last_val["scores"]
    else:
        final_val = evaluate_model(evaluated, ctx.data, ctx.split.val, ctx.device)
    metrics.update(_prefixed("val", final_val))
    metrics.update(
        _prefixed("test", evaluate_model(evaluated, ctx.data, ctx.split.test, ctx.device))
    )
    return StageResult(_to_cpu(evaluated.state_dict()), metrics)
