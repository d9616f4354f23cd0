"""Fused fine-tunings: K fine-tunings of one config and one architecture trained as one
horizontally fused model in one process (the idea of Wang et al.'s "Horizontally Fused Training
Array", MLSys 2021), each giving what ``trainers.stages.run_finetune`` gives it alone.

The K members' parameters are stacked along a new leading dimension
(``torch.func.stack_module_state``) and one forward pass runs all of them:
``torch.func.vmap`` over ``functional_call`` of the U-Net, which batches each convolution of
the K members into one grouped convolution (the "vmap" pass, the default on CUDA; on CPU, where
grouped convolutions are slower than K plain ones, the "loop" pass runs one ``functional_call``
per member instead, still with one backward and one optimiser step). The loss is the sum of the members' losses; as no
tensor mixes members, its gradient with respect to member k's slice is member k's own gradient.
Adam is elementwise, so one Adam over the stacked parameters is K Adams (same ``lr``,
``weight_decay`` and step count for all: the members share the config and run the same number of
optimiser steps, so the learning-rate schedule is the same at every step).

Each member keeps everything a separate run has of its own: the seed before its U-Net is built
(so its initial weights are a separate run's), its labelled slices, and per epoch its order,
augment and host generators derived from (seed, "finetune", epoch) as ``trainers.loop.fit``
derives them. Members may hold different numbers of labelled slices, hence different steps per
epoch and last-batch sizes: training is driven by the global optimiser step, each member walking
its own epochs. When all members' batches of a step have one size they run through ``vmap``
(with that pass); otherwise each member runs ``functional_call`` on its slice of the stacked parameters (the same
gradients, K smaller passes). At its own epoch boundaries a member reports the metrics and
checkpoint state ``fit`` reports (``StageContext.report``; a checkpoint resumes a separate run
as well as a fused one), validates at the epochs a separate run validates, and at the end gets
its final metrics from ``trainers.stages.finish_finetune``.

Per-epoch ``seconds`` of a member is the wall time of the fused steps of its epoch (all members'
work) less other members' validation and reporting in that window, so ``slices_per_s`` is the
member's slices over shared time; the sum over members is the fused throughput.

``fusable`` decides whether a set of fine-tunings can be fused (with a reason when not):
Mean Teacher (a teacher per member, not stacked here), batch norm (running statistics under
``vmap``) and DDP (world size > 1) are refused, as are members with different step budgets,
devices, image sizes or class counts, and members resuming from different optimiser steps.
Channels-last inputs are not used in the fused pass (5-D stacked inputs).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.func import functional_call, stack_module_state, vmap

from trainers.config import FinetuneConfig, ModelConfig
from trainers.loop import (
    Dist,
    Run,
    StageContext,
    StageResult,
    Step,
    autocast,
    batches_per_epoch,
    build_run,
    derived_seed,
    epoch_batches,
    final_metrics,
    lr_factor,
    to_cpu,
    torch_generator,
)
from trainers.registry import finetune_reads, resolve_volumes
from trainers.stages import (
    DeviceSlices,
    Targets,
    Validation,
    finetune_batch,
    finetune_train_slices,
    finish_finetune,
    mixed_inputs,
    targets_loss,
)

STAGE = "finetune"
# "vmap": one vmapped pass (grouped convolutions) when the members' batches have one size;
# "loop": one functional_call per member (K passes, one backward, one Adam step); "auto": vmap
# on CUDA, loop on CPU, where the vmapped pass was the slower (a base-16 U-Net, batch 8,
# 64 x 64, one thread: forward + backward alone 2.5-3 x slower at K = 4, whole training steps
# 4-12 % slower than separate runs, the loop pass even; benchmarks/bench_fused.py).
FUSED_PASSES = ("auto", "vmap", "loop")


class FusedRunError(RuntimeError):
    """Some members failed (e.g. a non-finite loss); the others completed.

    ``results[k]``: member k's ``StageResult`` or None; ``failures``: member index -> error."""

    def __init__(self, results: list[StageResult | None], failures: dict[int, BaseException]):
        self.results = results
        self.failures = failures
        listed = ", ".join(f"member {k}: {err}" for k, err in sorted(failures.items()))
        super().__init__(f"{len(failures)} of {len(results)} fused fine-tunings failed ({listed})")


# ---------------------------------------------------------------------------------------------
# whether to fuse


def _budget(cfg: FinetuneConfig, ctx: StageContext) -> tuple[int, int]:
    """(steps per epoch, total optimiser steps) of a separate run of ``ctx`` (as ``fit``)."""
    volumes = resolve_volumes(finetune_reads(cfg), ctx.split, ctx.labelled)["train"]
    num_slices = int(ctx.data.slices_of(volumes).size)
    per_epoch = batches_per_epoch(num_slices, cfg.batch_size, 1, Dist())
    if per_epoch == 0:
        return 0, 0
    total = cfg.steps if cfg.steps is not None else cfg.epochs * per_epoch
    return per_epoch, total


def _resume_step(resume: Any, per_epoch: int, total: int) -> int:
    """The optimiser steps done at a checkpoint (0 without one)."""
    if resume is None:
        return 0
    return min(int(resume["epoch"]) * per_epoch, total)


def fusable(
    cfg: FinetuneConfig, model_cfg: ModelConfig, ctxs: Sequence[StageContext]
) -> str | None:
    """None when the fine-tunings ``ctxs`` (one config ``cfg``, one ``model_cfg``) can train
    fused; else the reason they must run separately."""
    if len(ctxs) < 2:
        return "fewer than 2 members"
    if cfg.regulariser == "mean_teacher":
        return "regulariser mean_teacher (a teacher per member) is not fused"
    if model_cfg.norm == "batch":
        return "batch norm (running statistics under vmap) is not fused"
    if Dist.current().world > 1:
        return "torch.distributed is initialised (DDP, world size > 1)"
    first = ctxs[0]
    for ctx in ctxs[1:]:
        if ctx.device != first.device:
            return f"members on different devices ({first.device}, {ctx.device})"
        if ctx.data.num_classes != first.data.num_classes:
            return "members with different class counts"
        if ctx.data.images.shape[1:] != first.data.images.shape[1:]:
            return "members with different image sizes"
    budgets = [_budget(cfg, ctx) for ctx in ctxs]
    if any(per_epoch == 0 for per_epoch, _ in budgets):
        return "a member has no training batch"
    totals = {total for _, total in budgets}
    if len(totals) > 1:
        return f"members with different step budgets {sorted(totals)}"
    starts = {
        _resume_step(ctx.resume, per_epoch, total)
        for ctx, (per_epoch, total) in zip(ctxs, budgets, strict=True)
    }
    if len(starts) > 1:
        return f"members resuming from different optimiser steps {sorted(starts)}"
    return None


# ---------------------------------------------------------------------------------------------
# the members


@dataclass
class _Member:
    """One fine-tuning of the fused run: its ``Run`` (model and optimiser hold its state only at
    reports and at the end), slices, validation and the state of its current epoch."""

    index: int
    run: Run
    train: DeviceSlices
    validation: Validation
    batch_size: int
    per_epoch: int
    total: int
    last_epoch: int
    epoch: int = 0
    batches: list[Tensor] = field(default_factory=list)
    done_before: int = 0
    gen: torch.Generator | None = None
    rng: np.random.Generator | None = None
    loss_sum: Tensor | None = None
    seen: int = 0
    started: float = 0.0
    paused_at_start: float = 0.0
    failed: BaseException | None = None

    def begin_epoch(self, epoch: int) -> None:
        """The epoch's batches and generators, exactly as ``fit`` / ``_train_epoch`` make them."""
        ctx, device, rank = self.run.ctx, self.run.device, self.run.dist.rank
        self.epoch = epoch
        order = torch_generator(device, ctx.seed, STAGE, epoch, "order")
        batches = epoch_batches(len(self.train), self.batch_size, 1, order, self.run.dist, device)
        self.done_before = (epoch - 1) * self.per_epoch
        self.batches = batches[: self.total - self.done_before]
        self.gen = torch_generator(device, ctx.seed, STAGE, epoch, "augment", rank)
        self.rng = np.random.default_rng(derived_seed(ctx.seed, STAGE, epoch, "host", rank))
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.seen = 0


class _Fused:
    """The stacked parameters, their Adam and the fused forward passes."""

    def __init__(self, cfg: FinetuneConfig, members: list[_Member], fused_pass: str) -> None:
        models = [m.run.model for m in members]
        params, buffers = stack_module_state(models)
        self.params: dict[str, Tensor] = params
        self.buffers: dict[str, Tensor] = buffers
        self.base = copy.deepcopy(models[0]).to("meta")  # the structure; weights come stacked
        self.device = members[0].run.device
        if fused_pass not in FUSED_PASSES:
            raise ValueError(f"fused_pass: must be one of {FUSED_PASSES}, got {fused_pass!r}")
        if fused_pass == "auto":
            fused_pass = "vmap" if self.device.type == "cuda" else "loop"
        self.fused_pass = fused_pass
        self.optimizer = torch.optim.Adam(
            list(params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay
        )
        self.names = list(params)
        self._load_member_optimisers([m.run.optimizer.state_dict() for m in members])

        def one(p: dict[str, Tensor], b: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(self.base, (p, b), (x,))

        self._batched = vmap(one)

    def _load_member_optimisers(self, states: list[dict[str, Any]]) -> None:
        """Stack the members' Adam states (all empty for a fresh start, all at one step when
        resuming) into the fused Adam's."""
        stacked = self.optimizer.state_dict()
        state: dict[int, dict[str, Any]] = {}
        for i in range(len(self.names)):
            per = [s["state"].get(i) for s in states]
            if any(p is None for p in per):
                continue
            state[i] = {
                key: torch.stack([p[key] for p in per]) if value.dim() > 0 else value
                for key, value in per[0].items()
            }
        stacked["state"] = state
        stacked["param_groups"][0]["lr"] = states[0]["param_groups"][0]["lr"]
        self.optimizer.load_state_dict(stacked)

    def member_optimiser_state(self, k: int) -> dict[str, Any]:
        """Member k's share of the fused Adam, as its own Adam's ``state_dict``."""
        stacked = self.optimizer.state_dict()
        state = {
            i: {key: value[k] if value.dim() > 0 else value for key, value in s.items()}
            for i, s in stacked["state"].items()
        }
        return {"state": state, "param_groups": stacked["param_groups"]}

    def sync(self, member: _Member) -> None:
        """Copy member's slice of the stacked parameters (and its optimiser state) into its own
        model and Adam, for evaluation, checkpoints and the result."""
        k = member.index
        with torch.no_grad():
            for name, p in member.run.model.named_parameters():
                p.copy_(self.params[name][k])
            for name, b in member.run.model.named_buffers():
                b.copy_(self.buffers[name][k])
        member.run.optimizer.load_state_dict(self.member_optimiser_state(k))

    def logits(self, inputs: list[Tensor]) -> list[Tensor]:
        """Each member's logits (float32) of its input: with the "vmap" pass one vmapped pass
        when all inputs have one shape, else one ``functional_call`` per member on its
        parameter slice."""
        with autocast(self.device):
            if self.fused_pass == "vmap" and len({tuple(x.shape) for x in inputs}) == 1:
                out = self._batched(self.params, self.buffers, torch.stack(inputs)).float()
                return list(out.unbind(0))
            # unbind: one view per member of each stacked tensor, whose backward stacks the
            # members' gradients once (indexing p[k] per member would scatter into a full-size
            # zero tensor K times)
            params = {n: p.unbind(0) for n, p in self.params.items()}
            buffers = {n: b.unbind(0) for n, b in self.buffers.items()}
            return [
                functional_call(
                    self.base,
                    ({n: p[k] for n, p in params.items()}, {n: b[k] for n, b in buffers.items()}),
                    (x,),
                ).float()
                for k, x in enumerate(inputs)
            ]


# ---------------------------------------------------------------------------------------------
# the fused run


def run_finetunes_fused(
    cfg: FinetuneConfig,
    model_cfg: ModelConfig,
    ctxs: Sequence[StageContext],
    fused_pass: str = "auto",
) -> list[StageResult]:
    """Train the fine-tunings ``ctxs`` fused (module docstring); ``results[k]`` equals
    ``run_finetune(cfg, model_cfg, ctxs[k])`` to float tolerance, and each ``ctxs[k].report``
    gets the reports a separate run would make.

    Raises ``ValueError`` with ``fusable``'s reason when they cannot be fused, and
    ``FusedRunError`` (holding the others' results) when members fail; an exception raised by a
    ``report`` callback ends the whole run (as it ends a separate one). ``fused_pass``: how
    the members' forward passes run (``FUSED_PASSES``).
    """
    reason = fusable(cfg, model_cfg, ctxs)
    if reason is not None:
        raise ValueError(f"fine-tunings cannot be fused: {reason}")
    members: list[_Member] = []
    for k, ctx in enumerate(ctxs):
        run = build_run(STAGE, cfg, model_cfg, ctx)  # seeds, so the weights are a separate run's
        per_epoch, total = _budget(cfg, ctx)
        member = _Member(
            k,
            run,
            finetune_train_slices(cfg, ctx),
            Validation(ctx),
            cfg.batch_size,
            per_epoch,
            total,
            math.ceil(total / per_epoch),
        )
        members.append(member)
    fused = _Fused(cfg, members, fused_pass)
    total = members[0].total
    step = _resume_step(ctxs[0].resume, members[0].per_epoch, total)
    paused = 0.0  # seconds spent in members' validation and reports: not training time

    while step < total and any(m.failed is None for m in members):
        inputs: list[Tensor] = []
        targets: list[Targets] = []
        for m in members:
            if step == m.epoch * m.per_epoch or m.epoch == 0:
                m.begin_epoch(step // m.per_epoch + 1)
                m.started, m.paused_at_start = time.perf_counter(), paused
            i = step - m.done_before
            s = Step(m.batches[i], m.gen, m.rng, step, (m.epoch - 1) + i / len(m.batches))
            x, y = finetune_batch(cfg, m.train, s)
            x_in, t = mixed_inputs(cfg, x, y, s)
            inputs.append(x_in)
            targets.append(t)
        losses = [
            targets_loss(logits, t, cfg.dice_weight)
            for logits, t in zip(fused.logits(inputs), targets, strict=True)
        ]
        if cfg.lr_schedule != "constant":
            for group in fused.optimizer.param_groups:
                group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, total)
        fused.optimizer.zero_grad(set_to_none=True)
        live = [loss for m, loss in zip(members, losses, strict=True) if m.failed is None]
        if live:
            torch.stack(live).sum().backward()
        fused.optimizer.step()
        step += 1
        for m, loss in zip(members, losses, strict=True):
            batch = len(m.batches[step - 1 - m.done_before])
            m.loss_sum += loss.detach().double() * batch
            m.seen += batch
        for m in members:
            if step - m.done_before == len(m.batches) and m.failed is None:
                entered = time.perf_counter()
                _end_epoch(cfg, fused, m, step, paused)
                paused += time.perf_counter() - entered

    results: list[StageResult | None] = []
    failures: dict[int, BaseException] = {}
    for m in members:
        if m.failed is not None:
            failures[m.index] = m.failed
            results.append(None)
            continue
        fused.sync(m)
        run = m.run
        metrics = finish_finetune(
            run.model, run.ctx, run.dist, final_metrics(run), m.validation.last, cfg
        )
        results.append(StageResult(to_cpu(run.model.state_dict()), metrics))
    if failures:
        raise FusedRunError(results, failures)
    return [r for r in results if r is not None]


def _end_epoch(cfg: FinetuneConfig, fused: _Fused, m: _Member, step: int, paused: float) -> None:
    """Member ``m``'s epoch ends at ``step`` optimiser steps: what ``fit`` does after an epoch
    (loss check, metrics, validation when due, report with a checkpoint when due)."""
    run, ctx, epoch = m.run, m.run.ctx, m.epoch
    mean_loss = float(m.loss_sum.item()) / m.seen  # the epoch's one host synchronisation
    seconds = time.perf_counter() - m.started - (paused - m.paused_at_start)
    if not math.isfinite(mean_loss):
        m.failed = FloatingPointError(f"{STAGE}: loss is {mean_loss} in epoch {epoch}")
        return
    run.train_seconds += seconds
    metrics: dict[str, Any] = {
        "epoch": epoch,
        "steps": step,
        "loss": mean_loss,
        "seconds": seconds,
        "slices_per_s": m.seen / seconds,
    }
    if cfg.val_every_steps > 0:
        due_eval = step // cfg.val_every_steps > m.done_before // cfg.val_every_steps
    else:
        due_eval = epoch % cfg.val_every == 0
    due_checkpoint = epoch % ctx.checkpoint_every == 0 or epoch == m.last_epoch
    if due_eval or epoch == m.last_epoch or due_checkpoint:
        fused.sync(m)
    if due_eval or epoch == m.last_epoch:
        evaluated_at = time.perf_counter()
        metrics.update(m.validation(run.model, run.dist))
        metrics["eval_seconds"] = time.perf_counter() - evaluated_at
    run.last_metrics = metrics
    if ctx.report is not None:
        ctx.report(dict(metrics), run.checkpoint(epoch) if due_checkpoint else None)
