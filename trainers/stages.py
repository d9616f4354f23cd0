"""The stage loops: global pretraining, local pretraining, fine-tuning (METHOD.md, "Stages").

Every stage function reads as the same few named steps:

1. **build** (``build_run``): seed, model, the parent stage's parts (``transfer_weights``), Adam over
   *all* trainable parameters (projection heads included), DDP when ``torch.distributed`` is up,
   and the state of ``ctx.resume`` when continuing an interrupted run;
2. **load** the stage's slices onto the device once (``_device_slices``);
3. **fit** (``fit``): per epoch one pass over shuffled index batches with the stage's step
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
the same numbers. Validation and test evaluation share the slices out among the ranks: each
predicts its contiguous part and the per-volume confusion counts (integers) are summed, so every
rank gets exactly the Dice of one process predicting all of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
from trainers.data import SliceData
from trainers.loop import (
    Dist,
    StageContext,
    StageResult,
    Step,
    autocast,
    build_run,
    device_memory_format,
    final_metrics,
    fit,
    to_cpu,
)
from trainers.losses import (
    nt_xent,
    partition_global_loss,
    partition_of,
    segmentation_loss,
    self_local_contrastive,
    supervised_local_contrastive,
)
from trainers.metrics import dice_scores, volume_confusion
from trainers.model import UNet, unwrap_model
from trainers.native import finetune_test_metrics
from trainers.registry import finetune_reads, global_reads, local_reads, resolve_volumes


@dataclass
class DeviceSlices:
    """Slices on the training device: images (S, C, H, W) float32, labels (S, H, W) int64 or
    None, position (S,) float32 in [0, 1)."""

    images: Tensor
    labels: Tensor | None
    position: Tensor

    def __len__(self) -> int:
        return self.images.shape[0]


def _device_slices(
    data: SliceData, volumes: tuple[int, ...], device: torch.device, labels: bool
) -> DeviceSlices:
    """Copy the slices of ``volumes`` to ``device`` once (the arrays may be memory-mapped)."""
    index = data.slices_of(volumes)
    if index.size == 0:
        raise ValueError(f"volumes {list(volumes)[:8]} hold no slices")
    images = torch.from_numpy(np.ascontiguousarray(data.images[index])).to(device)
    label_maps = (
        torch.from_numpy(data.labels[index].astype(np.int64)).to(device) if labels else None
    )
    position = torch.from_numpy(np.ascontiguousarray(data.position[index])).to(device)
    return DeviceSlices(images, label_maps, position)


# ---------------------------------------------------------------------------------------------
# evaluation


def eval_batch_size(device: torch.device) -> int:
    """Slices per forward pass of evaluation when the caller names none: 32 on CPU, where one
    batch's activations stay in cache (a base-16 U-Net on 64 x 64 slices ran about 1.5 x slower
    per slice at 256; ``benchmarks/bench_eval.py``), 256 on an accelerator. Predictions do not
    depend on it (logits are bitwise equal at every batch size on CPU)."""
    return 32 if torch.device(device).type == "cpu" else 256


def _shard(num_slices: int, dist: Dist | None) -> tuple[int, int]:
    """This rank's contiguous share [lo, hi) of ``num_slices`` (all of them in one process)."""
    if dist is None or dist.world == 1:
        return 0, num_slices
    return num_slices * dist.rank // dist.world, num_slices * (dist.rank + 1) // dist.world


def _predict_and_score(
    model: nn.Module,
    fetch: Callable[[int, int], tuple[Tensor, Tensor]],
    group: Tensor,
    groups: int,
    num_classes: int,
    device: torch.device,
    batch_size: int,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Dice (``dice_scores``: pooled and per-volume) of ``model``'s argmax predictions on S slices.

    ``fetch(lo, hi)`` gives slices lo .. hi - 1 as images (b, 1, H, W) and integer labels
    (b, H, W) on ``device``; ``group`` (S,) on ``device`` is each slice's volume index in
    [0, groups). Batch by batch, in eval mode under ``torch.inference_mode`` (the model's mode is
    restored), the predictions go straight into per-volume confusion counts
    (``volume_confusion``): memory holds one batch, whatever S. With ``dist`` of world > 1
    (every rank must call), rank r predicts its contiguous share of the slices and the counts,
    integers, are summed across ranks, so every rank gets exactly the numbers of one process
    predicting all of them.
    """
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    lo, hi = _shard(group.shape[0], dist)
    try:
        with torch.inference_mode(), autocast(device):
            counts = torch.zeros(
                (groups, num_classes, num_classes), dtype=torch.int64, device=device
            )
            for start in range(lo, hi, batch_size):
                stop = min(start + batch_size, hi)
                x, y = fetch(start, stop)
                pred = module(x.contiguous(memory_format=device_memory_format(device))).argmax(1)
                counts += volume_confusion(pred, y, group[start:stop], groups, num_classes)
            if dist is not None:
                dist.all_reduce(counts)
    finally:
        module.train(was_training)
    return dice_scores(counts)


def evaluate_model(
    model: nn.Module,
    data: SliceData,
    volumes: tuple[int, ...],
    device: torch.device,
    batch_size: int | None = None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """Dice of ``model``'s predictions on every slice of ``volumes`` (see ``evaluate_volumes``):
    ``dice_pooled_c{k}``, ``dice_pooled_mean``, ``dice_volume_c{k}``, ``dice_volume_mean``,
    ``n_volumes``. An empty ``volumes`` gives {}. The model's train/eval mode is restored.

    Slices are read from ``data`` (memory-mapped) one batch of ``batch_size`` at a time (default
    ``eval_batch_size(device)``); with ``dist`` the ranks share the slices (``_predict_and_score``).
    """
    device = torch.device(device)
    if batch_size is None:
        batch_size = eval_batch_size(device)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not volumes:
        return {}
    index = data.slices_of(volumes)
    ids, group = np.unique(data.volume[index], return_inverse=True)

    def fetch(lo: int, hi: int) -> tuple[Tensor, Tensor]:
        rows = index[lo:hi]
        images = torch.from_numpy(np.ascontiguousarray(data.images[rows]))
        labels = torch.from_numpy(np.ascontiguousarray(data.labels[rows]))
        return images.to(device), labels.to(device).long()

    return _predict_and_score(
        model,
        fetch,
        torch.from_numpy(group.astype(np.int64)).to(device),
        len(ids),
        data.num_classes,
        device,
        batch_size,
        dist,
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
    run = build_run("global", cfg, model, ctx)
    volumes = resolve_volumes(global_reads(cfg), ctx.split, ctx.labelled)["train"]
    train = _device_slices(ctx.data, volumes, ctx.device, labels=False)

    def step(s: Step) -> Tensor:
        v1, v2 = global_views(train.images[s.batch], s.gen, **global_view_args(cfg.augment))
        z1, z2 = run.forward(torch.cat([v1, v2]), output="global").chunk(2)
        if cfg.loss == "ntxent":
            return nt_xent(z1, z2, temperature=cfg.temperature)
        partition = partition_of(train.position[s.batch], cfg.n_parts)
        return partition_global_loss(z1, z2, partition, temperature=cfg.temperature)

    fit(
        run,
        cfg,
        num_slices=len(train),
        step_fn=step,
        min_batch=2,
    )
    return StageResult(to_cpu(run.model.state_dict()), final_metrics(run))


def run_local(cfg: LocalConfig, model: ModelConfig, ctx: StageContext) -> StageResult:
    """Local contrastive pretraining of encoder + decoder + local head.

    supervised: labelled slices x (B, 1, H, W), y (B, H, W); two ``intensity_views``;
    emb = local_embedding(cat(v1, v2)) (2B, D, H, W), labels cat(y, y);
    ``supervised_local_contrastive(emb, labels, T, strategy, stride, block_size, form)``.
    self: all training slices; e1, e2 = the two views' embeddings;
    ``self_local_contrastive(e1, e2, self_regions, T)``.
    """
    cfg.check_image_size(int(ctx.data.images.shape[-1]))
    run = build_run("local", cfg, model, ctx)
    supervised = cfg.loss == "supervised"
    volumes = resolve_volumes(local_reads(cfg), ctx.split, ctx.labelled)["train"]
    train = _device_slices(ctx.data, volumes, ctx.device, labels=supervised)

    def step(s: Step) -> Tensor:
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

    fit(
        run,
        cfg,
        num_slices=len(train),
        step_fn=step,
    )
    return StageResult(to_cpu(run.model.state_dict()), final_metrics(run))


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


def finetune_batch(cfg: FinetuneConfig, train: DeviceSlices, s: Step) -> tuple[Tensor, Tensor]:
    """The step's labelled batch: images (b, 1, H, W) and labels (b, H, W) of ``s.batch``,
    through ``spatial_augment`` / ``intensity_augment`` (``cfg.augment``) drawing on ``s.gen``."""
    x, y = train.images[s.batch], train.labels[s.batch]
    if cfg.augment.spatial:
        x, y = spatial_augment(x, y, s.gen, **spatial_args(cfg.augment))
    if cfg.augment.intensity:
        x = intensity_augment(x, s.gen, **intensity_args(cfg.augment))
    return x, y


Targets = list[tuple[float, Tensor]]


def mixed_inputs(cfg: FinetuneConfig, x: Tensor, y: Tensor, s: Step) -> tuple[Tensor, Targets]:
    """The network's input and the weighted label maps its loss compares with: (x, [(1, y)])
    for regulariser "none"; for "mixup" lambda ~ Beta(alpha, alpha) from ``s.rng``, a pairing
    permutation pi from ``s.gen`` and (lambda x + (1 - lambda) x[pi], [(lambda, y),
    (1 - lambda, y[pi])])."""
    if cfg.regulariser != "mixup":
        return x, [(1.0, y)]
    lam = float(s.rng.beta(cfg.mixup_alpha, cfg.mixup_alpha))
    pair = torch.randperm(x.shape[0], generator=s.gen, device=x.device)
    return lam * x + (1.0 - lam) * x[pair], [(lam, y), (1.0 - lam, y[pair])]


def targets_loss(logits: Tensor, targets: Targets, dice_weight: float) -> Tensor:
    """sum_i w_i * segmentation_loss(logits, y_i) over ``targets`` [(w_i, y_i)]."""
    if len(targets) == 1 and targets[0][0] == 1.0:
        return segmentation_loss(logits, targets[0][1], dice_weight)
    first, *rest = (w * segmentation_loss(logits, y, dice_weight) for w, y in targets)
    return sum(rest, first)


class Validation:
    """The per-epoch validation of a fine-tuning: Dice on the slices of ``split.val`` (loaded
    onto the device once), nothing when the split has no validation volumes. ``last`` keeps
    the scores of the latest call (the final model's, after ``fit``'s last epoch)."""

    def __init__(self, ctx: StageContext) -> None:
        self.ctx = ctx
        self.num_classes = ctx.data.num_classes
        self.val: DeviceSlices | None = None
        self.last: dict[str, float] | None = None
        if ctx.split.val:
            index = ctx.data.slices_of(ctx.split.val)
            self.val = _device_slices(ctx.data, ctx.split.val, ctx.device, labels=True)
            ids, group = np.unique(ctx.data.volume[index], return_inverse=True)
            self.groups = len(ids)
            self.group = torch.from_numpy(group.astype(np.int64)).to(ctx.device)

    def __call__(self, model: nn.Module, dist: Dist | None) -> dict[str, float]:
        val = self.val
        if val is None:
            return {}
        scores = _predict_and_score(
            model,
            lambda lo, hi: (val.images[lo:hi], val.labels[lo:hi]),
            self.group,
            self.groups,
            self.num_classes,
            self.ctx.device,
            eval_batch_size(self.ctx.device),
            dist,
        )
        self.last = scores
        # per-epoch names: val_dice_mean / val_dice_pooled_mean (per-volume / pooled, as before),
        # per class val_dice_c{k} (per-volume mean) and val_dice_pooled_c{k}
        out = {
            "val_dice_mean": scores["dice_volume_mean"],
            "val_dice_pooled_mean": scores["dice_pooled_mean"],
        }
        for k in range(1, self.num_classes):
            out[f"val_dice_c{k}"] = scores[f"dice_volume_c{k}"]
            out[f"val_dice_pooled_c{k}"] = scores[f"dice_pooled_c{k}"]
        return out


def finish_finetune(
    model: nn.Module,
    ctx: StageContext,
    dist: Dist | None,
    metrics: Mapping[str, float],
    last_val: Mapping[str, float] | None,
    cfg: FinetuneConfig,
) -> dict[str, float]:
    """The final metrics of a fine-tuning, the one place that decides them (``run_finetune``
    and ``trainers.fused`` both end here): ``metrics`` (``final_metrics``: loss, steps,
    train_seconds) plus ``val_*`` from ``evaluate_model`` of the final ``model`` and the test
    metrics of ``trainers.native.finetune_test_metrics`` (Dice at the model's input size,
    ``test_*``, and on each volume's own grid, ``test_native_*``, one pass over the test
    slices). ``last_val``: the validation scores of the final model when training already
    computed them (no second pass over the validation volumes)."""
    out = dict(metrics)
    if last_val is not None:
        final_val = last_val
    else:
        final_val = evaluate_model(model, ctx.data, ctx.split.val, ctx.device, dist=dist)
    out.update(_prefixed("val", final_val))
    out.update(finetune_test_metrics(cfg, model, ctx, dist))
    return out


def finetune_train_slices(cfg: FinetuneConfig, ctx: StageContext) -> DeviceSlices:
    """The labelled training slices of a fine-tuning on ``ctx.device``."""
    volumes = resolve_volumes(finetune_reads(cfg), ctx.split, ctx.labelled)["train"]
    return _device_slices(ctx.data, volumes, ctx.device, labels=True)


def run_finetune(cfg: FinetuneConfig, model: ModelConfig, ctx: StageContext) -> StageResult:
    """Supervised fine-tuning on the labelled slices with ``segmentation_loss`` (CE + soft Dice).

    Per batch x (B, 1, H, W), y (B, H, W), after ``spatial_augment`` when ``cfg.augment``
    (``finetune_batch``):
    - regulariser "none": L(f(x), y).
    - "mixup" (``mixed_inputs``): lambda ~ Beta(alpha, alpha), pairing permutation pi;
      x' = lambda x + (1 - lambda) x[pi], loss lambda L(f(x'), y) + (1 - lambda) L(f(x'), y[pi]).
    - "mean_teacher": u = ``unlabelled_batch_size`` training slices drawn with replacement,
      (u_s, u_t) = ``intensity_views(u)``; loss L(f(x), y) + w(t) * mean((softmax f(u_s) -
      softmax f_teacher(u_t))^2), w(t) = consistency_weight * exp(-5 (1 - t/rampup)^2);
      after each optimiser step n the teacher's parameters move to the student's by the EMA
      with decay min(ema_decay, 1 - 1/(n + 1)). The *teacher* is evaluated and returned (as is
      usual for Mean Teacher); the student lives on only in checkpoints' "model".

    Every ``cfg.val_every``-th epoch and the last add ``val_dice_mean`` (per-volume mean) and
    ``val_dice_pooled_mean`` on ``split.val`` (skipped when it is empty; ``Validation``).
    Final metrics (``finish_finetune``): ``val_*``, ``test_*`` and ``test_native_*`` plus
    ``loss`` and ``train_seconds``. The final model is kept (no selection on validation Dice).
    Several fine-tunings of one config can also train as one fused model (``trainers.fused``).
    """
    run = build_run("finetune", cfg, model, ctx)
    train = finetune_train_slices(cfg, ctx)

    teacher: UNet | None = None
    unlabelled: DeviceSlices | None = None
    if cfg.regulariser == "mean_teacher":
        teacher = copy.deepcopy(run.model).requires_grad_(False)
        run.add_extra("teacher", teacher)
        roles = resolve_volumes(finetune_reads(cfg), ctx.split, ctx.labelled)
        unlabelled = _device_slices(ctx.data, roles["unlabelled"], ctx.device, labels=False)
    evaluated = teacher if teacher is not None else run.model

    def step(s: Step) -> Tensor:
        x, y = finetune_batch(cfg, train, s)
        if cfg.regulariser != "mean_teacher":
            x_in, targets = mixed_inputs(cfg, x, y, s)
            return targets_loss(run.forward(x_in), targets, cfg.dice_weight)
        draw = torch.randint(
            len(unlabelled), (cfg.unlabelled_batch_size,), generator=s.gen, device=x.device
        )
        u_student, u_teacher = intensity_views(unlabelled.images[draw], s.gen)
        logits = run.forward(torch.cat([x, u_student]))
        with torch.no_grad(), autocast(ctx.device):
            target = teacher(
                u_teacher.contiguous(memory_format=device_memory_format(ctx.device))
            ).float()
        consistency = F.mse_loss(logits[x.shape[0] :].softmax(1), target.softmax(1))
        ramp = (
            sigmoid_rampup(s.step, cfg.consistency_rampup_steps)
            if cfg.consistency_rampup_steps > 0
            else sigmoid_rampup(s.progress, cfg.consistency_rampup)
        )
        weight = cfg.consistency_weight * ramp
        return segmentation_loss(logits[: x.shape[0]], y, cfg.dice_weight) + weight * consistency

    def ema(step_count: int) -> None:
        _ema_update(teacher, run.model, min(cfg.ema_decay, 1.0 - 1.0 / (step_count + 1)))

    validation = Validation(ctx)  # fit validates after its last epoch: that is the final model
    fit(
        run,
        cfg,
        num_slices=len(train),
        step_fn=step,
        after_step=ema if teacher is not None else None,
        evaluate=lambda: validation(evaluated, run.dist),
        evaluate_every=cfg.val_every,
        evaluate_every_steps=cfg.val_every_steps,
    )
    metrics = finish_finetune(evaluated, ctx, run.dist, final_metrics(run), validation.last, cfg)
    return StageResult(to_cpu(evaluated.state_dict()), metrics)
