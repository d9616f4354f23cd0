"""The training loop every stage shares: what a stage run is given (``StageContext``) and
gives back (``StageResult``), and how it trains (``trainers.stages`` holds the stages' own
step functions; its docstring describes the loop's randomness, devices and distribution).

1. ``build_run``: seed, the UNet, the parent stage's parts, Adam over every trainable parameter,
   DDP when ``torch.distributed`` is up, and the state of ``ctx.resume`` when continuing;
2. ``fit``: the stage's budget (epochs or steps) as epochs of shuffled index batches, each batch
   through the stage's step function at the learning rate its schedule gives (``lr_factor``),
   an optional evaluation, one report per epoch and a checkpoint when due;
3. ``final_metrics``: what every stage returns besides its own metrics.
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
from torch import Tensor, nn

from trainers import seed_everything
from trainers.config import ModelConfig
from trainers.data import SliceData, Split
from trainers.model import UNet, transfer_weights

ReportFn = Callable[[dict[str, float], dict[str, Any] | None], None]
StepFn = Callable[["Step"], Tensor]


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


# ---------------------------------------------------------------------------------------------
# device, precision and distribution


@dataclass(frozen=True)
class Dist:
    """This process's place in ``torch.distributed`` (rank 0 of 1 when it is not initialised)."""

    rank: int = 0
    world: int = 1

    @staticmethod
    def current() -> Dist:
        if torch_dist.is_available() and torch_dist.is_initialized():
            return Dist(torch_dist.get_rank(), torch_dist.get_world_size())
        return Dist()

    def all_reduce(self, tensor: Tensor, op: str = "sum") -> Tensor:
        """Sum (or max) ``tensor`` across ranks in place; a no-op in a single process."""
        if self.world > 1:
            torch_dist.all_reduce(
                tensor, op=torch_dist.ReduceOp.SUM if op == "sum" else torch_dist.ReduceOp.MAX
            )
        return tensor


def autocast(device: torch.device) -> AbstractContextManager[Any]:
    """bf16 autocast on CUDA, nothing elsewhere (CPU trains in float32)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def device_memory_format(device: torch.device) -> torch.memory_format:
    return torch.channels_last if device.type == "cuda" else torch.contiguous_format


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from ``parts``, stable across processes and Python versions."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def torch_generator(device: torch.device, *parts: object) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(derived_seed(*parts))
    return generator


def to_cpu(value: Any) -> Any:
    """Deep copy of a (nested) state with every tensor detached, cloned and on CPU."""
    if isinstance(value, Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, Mapping):
        return {k: to_cpu(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(v) for v in value)
    return copy.deepcopy(value)


# ---------------------------------------------------------------------------------------------
# build


@dataclass
class Run:
    """One stage's live training state, shared by the step functions and ``fit``."""

    stage: str
    ctx: StageContext
    model: UNet  # the unwrapped network: states and evaluation
    net: nn.Module  # what training passes call: ``model`` or DDP(model)
    optimizer: torch.optim.Optimizer
    dist: Dist
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
        with autocast(self.device):
            out = self.net(
                x.contiguous(memory_format=device_memory_format(self.device)), output=output
            )
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
            "model": to_cpu(self.model.state_dict()),
            "optimizer": to_cpu(self.optimizer.state_dict()),
            "train_seconds": self.train_seconds,
            "last_metrics": dict(self.last_metrics),
        }
        for name, module in self.extras.items():
            state[name] = to_cpu(module.state_dict())
        return state


def build_run(stage: str, cfg: Any, model_cfg: ModelConfig, ctx: StageContext) -> Run:
    """Seed, build the UNet, load the parent's parts, create Adam (``cfg.lr``,
    ``cfg.weight_decay``; ``cfg.lr_schedule`` applied by ``fit``), wrap in DDP, resume."""
    seed_everything(ctx.seed)
    model = UNet(model_cfg, in_channels=ctx.data.in_channels, num_classes=ctx.data.num_classes)
    if ctx.init_parts:
        transfer_weights(ctx.init_state, model, ctx.init_parts)
    model = model.to(ctx.device, memory_format=device_memory_format(ctx.device))
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    run = Run(stage, ctx, model, model, optimizer, Dist.current(), cfg.lr, cfg.lr_schedule)
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
class Step:
    """What a step function gets: ``batch`` (b,) indices into the stage's device slices, the
    epoch's augment generator ``gen`` (device) and host generator ``rng``, the 0-based optimiser
    step since the stage began, and ``progress`` = epochs completed (fractional)."""

    batch: Tensor
    gen: torch.Generator
    rng: np.random.Generator
    step: int
    progress: float


def batches_per_epoch(num_slices: int, batch_size: int, min_batch: int, dist: Dist) -> int:
    """How many batches ``epoch_batches`` yields per rank (the same every epoch)."""
    full, rest = divmod(num_slices // dist.world, batch_size)
    return full + (1 if rest and rest >= min_batch else 0)


def epoch_batches(
    num_slices: int,
    batch_size: int,
    min_batch: int,
    order: torch.Generator,
    dist: Dist,
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
    run: Run,
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
    gen = torch_generator(device, seed, run.stage, epoch, "augment", rank)
    rng = np.random.default_rng(derived_seed(seed, run.stage, epoch, "host", rank))
    run.net.train()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    seen = 0
    for i, batch in enumerate(batches):
        step = (epoch - 1) * steps_per_epoch + i
        loss = step_fn(Step(batch, gen, rng, step, (epoch - 1) + i / len(batches)))
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


def fit(
    run: Run,
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
    slowest rank) and ``slices_per_s`` (all ranks' slices / seconds); an epoch that evaluated
    adds ``eval_seconds`` (this rank's time in ``evaluate()``).
    """
    ctx, device, dist = run.ctx, run.device, run.dist
    batch_size = cfg.batch_size
    steps_per_epoch = batches_per_epoch(num_slices, batch_size, min_batch, dist)
    if steps_per_epoch == 0:
        raise ValueError(
            f"{run.stage}: {num_slices} training slices over {dist.world} rank(s) give no batch of "
            f">= {min_batch} slices (batch_size {batch_size})"
        )
    total_steps = cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch
    last_epoch = math.ceil(total_steps / steps_per_epoch)
    for epoch in range(run.start_epoch, last_epoch + 1):
        order = torch_generator(device, ctx.seed, run.stage, epoch, "order")
        batches = epoch_batches(num_slices, batch_size, min_batch, order, dist, device)
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
            evaluated_at = time.perf_counter()
            metrics.update(evaluate())
            metrics["eval_seconds"] = time.perf_counter() - evaluated_at
        run.last_metrics = metrics
        due = epoch % ctx.checkpoint_every == 0 or epoch == last_epoch
        if ctx.report is not None:
            ctx.report(dict(metrics), run.checkpoint(epoch) if due else None)


def final_metrics(run: Run) -> dict[str, float]:
    return {
        "loss": float(run.last_metrics.get("loss", math.nan)),
        "steps": int(run.last_metrics.get("steps", 0)),
        "train_seconds": run.train_seconds,
    }
