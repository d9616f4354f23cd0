"""The stage loops (trainers/stages.py) on tiny synthetic data: reporting, learning, resuming,
weight flow, and which volumes each stage may read."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.trainers.dice_reference import random_case, reference_scores
from trainers import loop, native, seed_everything, stages
from trainers.augment import global_views
from trainers.config import (
    DataConfig,
    FinetuneConfig,
    GlobalConfig,
    LocalConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
)
from trainers.data import SliceData, Split, labelled_subset, make_split
from trainers.loop import StageContext, StageResult, lr_factor
from trainers.methods import METHODS
from trainers.model import UNet
from trainers.pipeline import PipelineConfig, run_pipeline
from trainers.registry import STAGE_KINDS, stage_volumes
from trainers.stages import (
    evaluate_model,
    run_finetune,
    run_global,
    run_local,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
TINY = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=16, local_hidden=8)
TIMING_KEYS = {"seconds", "slices_per_s", "train_seconds", "eval_seconds", "native_eval_seconds"}


@pytest.fixture(scope="module")
def split(synthetic_slices: SliceData) -> Split:
    return make_split(synthetic_slices.num_volumes, SplitConfig(), 0)


@pytest.fixture(scope="module")
def labelled(split: Split) -> tuple[int, ...]:
    return labelled_subset(split, 0.2)


def _context(
    data: SliceData, split: Split, labelled: tuple[int, ...], **kwargs: Any
) -> StageContext:
    return StageContext(data=data, split=split, labelled=labelled, seed=0, device=CPU, **kwargs)


def _without_timing(metrics: dict[str, float]) -> dict[str, float]:
    """The metrics less timings, NaN (e.g. an HD95 of a class never predicted) as "nan" so
    that equal runs compare equal."""
    return {k: _nan_text(v) for k, v in metrics.items() if k not in TIMING_KEYS}


def _nan_text(value: Any) -> Any:
    return "nan" if isinstance(value, float) and math.isnan(value) else value


def _subset(data: SliceData, index: np.ndarray, images: np.ndarray | None = None) -> SliceData:
    """A SliceData holding only the slices ``index`` of ``data`` (volume ids unchanged)."""
    return SliceData(
        images=np.ascontiguousarray(data.images[index] if images is None else images),
        labels=np.ascontiguousarray(data.labels[index]),
        volume=np.ascontiguousarray(data.volume[index]),
        position=np.ascontiguousarray(data.position[index]),
        cases=data.cases,
        num_classes=data.num_classes,
        fingerprint=f"{data.fingerprint}-subset",
    )


def _foreground_slices(data: SliceData, volumes: tuple[int, ...], per_volume: int) -> np.ndarray:
    """The ``per_volume`` slices of each volume with the most foreground pixels."""
    chosen = []
    for v in volumes:
        index = data.slices_of([v])
        foreground = (data.labels[index] > 0).sum(axis=(1, 2))
        chosen.extend(index[np.argsort(-foreground, kind="stable")[:per_volume]])
    return np.sort(np.asarray(chosen, dtype=np.int64))


def _stage_config(stage: str, **overrides: Any) -> Any:
    defaults = {
        "global": GlobalConfig(epochs=2, batch_size=64, lr=1e-3),
        "local": LocalConfig(epochs=2, batch_size=4, block_size=8, lr=1e-3),
        "local_self": LocalConfig(loss="self", epochs=2, batch_size=32, self_regions=4, lr=1e-3),
        "finetune": FinetuneConfig(epochs=2, batch_size=8, lr=1e-3),
    }
    return dataclasses.replace(defaults[stage], **overrides)


# ---------------------------------------------------------------------------------------------
# reporting


@pytest.mark.parametrize("stage", ["global", "local", "local_self", "finetune"])
def test_stage_reports_once_per_epoch_and_checkpoints_when_due(
    stage: str, synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    calls: list[tuple[dict[str, float], dict[str, Any] | None]] = []
    ctx = _context(
        synthetic_slices,
        split,
        labelled,
        report=lambda m, c: calls.append((m, c)),
        checkpoint_every=2,
    )
    cfg = _stage_config(stage, epochs=3)
    result = STAGE_KINDS[stage.split("_")[0]].run(cfg, TINY, ctx)

    assert isinstance(result, StageResult)
    assert [m["epoch"] for m, _ in calls] == [1, 2, 3]
    for metrics, _ in calls:
        assert {"epoch", "loss", "seconds", "slices_per_s"} <= set(metrics)
        assert math.isfinite(metrics["loss"]) and metrics["slices_per_s"] > 0
    # checkpoints every 2 epochs and at the last one
    assert [c is not None for _, c in calls] == [False, True, True]
    checkpoint = calls[-1][1]
    assert checkpoint["epoch"] == 3 and checkpoint["stage"] == stage.split("_")[0]
    assert set(checkpoint["model"]) == set(UNet(TINY).state_dict())
    assert all(t.device.type == "cpu" for t in result.state.values())
    assert result.metrics["loss"] == calls[-1][0]["loss"]
    if stage == "finetune":
        assert all(0 <= m["val_dice_mean"] <= 1 for m, _ in calls)
        for prefix in ("val", "test"):
            for key in ("dice_pooled_mean", "dice_volume_mean", "dice_pooled_c1", "dice_volume_c2"):
                assert 0 <= result.metrics[f"{prefix}_{key}"] <= 1


def test_evaluate_model_scores_a_perfect_predictor_one(
    synthetic_slices: SliceData, split: Split
) -> None:
    class Oracle(torch.nn.Module):
        """Predicts the true labels of the slices it is given (looked up by image content)."""

        def __init__(self) -> None:
            super().__init__()
            self.lookup = {
                synthetic_slices.images[i].tobytes(): int(i)
                for i in synthetic_slices.slices_of(split.test)
            }

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            labels = [synthetic_slices.labels[self.lookup[img[0].numpy().tobytes()]] for img in x]
            y = torch.from_numpy(np.stack(labels)).long()
            return torch.nn.functional.one_hot(y, 3).permute(0, 3, 1, 2).float()

    scores = evaluate_model(Oracle(), synthetic_slices, split.test, CPU, batch_size=7)
    assert scores["dice_pooled_mean"] == pytest.approx(1.0)
    assert scores["dice_volume_mean"] == pytest.approx(1.0)
    assert scores["n_volumes"] == len(split.test)
    assert evaluate_model(Oracle(), synthetic_slices, (), CPU) == {}


class _Lookup(torch.nn.Module):
    """Predicts fixed labels: slice i's image holds i in every pixel; logits are the one-hot
    ``predictions[i]`` (ties impossible), so evaluate_model's scores can be checked exactly."""

    def __init__(self, predictions: np.ndarray, num_classes: int) -> None:
        super().__init__()
        self.predictions = torch.from_numpy(predictions).long()
        self.num_classes = num_classes
        self.seen = 0  # slices predicted

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen += x.shape[0]
        rows = self.predictions[x[:, 0, 0, 0].round().long()]
        return torch.nn.functional.one_hot(rows, self.num_classes).permute(0, 3, 1, 2).float()


def _lookup_case(seed: int) -> tuple[SliceData, _Lookup, np.ndarray, tuple[int, ...]]:
    """A SliceData of ``random_case``'s slices (4 classes) plus volumes holding nothing
    evaluated, the model predicting its predictions, and the reference scores' inputs."""
    pred, target, volume = random_case(seed)
    count = len(volume)
    images = np.broadcast_to(np.arange(count, dtype=np.float32)[:, None, None], target.shape).copy()
    data = SliceData(
        images=images,
        labels=target.astype(np.uint8),
        volume=volume.astype(np.int32),
        position=np.zeros(count, dtype=np.float32),
        cases=tuple(f"case{i}" for i in range(100)),
        num_classes=4,
        fingerprint=f"lookup-{seed}",
    )
    return data, _Lookup(pred, 4), pred, tuple(sorted(set(volume.tolist())))


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("batch_size", [None, 1, 7, 32, 1000])
def test_evaluate_model_equals_the_reference_loop_at_any_batch_size(
    seed: int, batch_size: int | None
) -> None:
    """Streamed evaluation (batches of predictions into per-volume counts) against the plain
    loop over volumes, on random predictions with a volume missing a class in prediction and
    truth (NaN, skipped) and one missing it in the truth only (0)."""
    data, model, pred, volumes = _lookup_case(seed)
    subset = volumes[1:]  # not every volume of the data: ids are regrouped
    rows = np.isin(data.volume, subset)
    expected = reference_scores(pred[rows], data.labels[rows], data.volume[rows], 4)
    got = evaluate_model(model, data, subset, CPU, batch_size=batch_size)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if math.isnan(value):
            assert math.isnan(got[key]), key
        else:
            assert got[key] == pytest.approx(value, abs=1e-12, rel=0), key


def _sharded_eval_worker(rank: int, world: int, port: int, seed: int, out: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        data, model, _, volumes = _lookup_case(seed)
        scores = evaluate_model(model, data, volumes, CPU, batch_size=4, dist=loop.Dist.current())
        torch.save({"scores": scores, "seen": model.seen}, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_the_evaluation_and_agree_with_one_process(tmp_path: Path) -> None:
    """Under torch.distributed each rank predicts its share of the slices; the summed counts
    give every rank exactly the scores of one process predicting them all."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    torch.multiprocessing.spawn(_sharded_eval_worker, args=(3, port, 0, str(tmp_path)), nprocs=3)
    data, model, _, volumes = _lookup_case(0)
    alone = evaluate_model(model, data, volumes, CPU)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(3)]
    assert sum(r["seen"] for r in ranks) == model.seen == len(data.volume)  # each slice once
    assert all(0 < r["seen"] < model.seen for r in ranks)
    for rank, result in enumerate(ranks):
        got = result["scores"]
        assert got.keys() == alone.keys()
        assert all(
            got[k] == alone[k] or (math.isnan(got[k]) and math.isnan(alone[k])) for k in alone
        ), rank


# ---------------------------------------------------------------------------------------------
# learning on a tiny fixed batch


@pytest.mark.parametrize(
    ("stage", "cfg"),
    [
        ("global", GlobalConfig(epochs=12, batch_size=8, lr=1e-2, temperature=0.5)),
        ("local", LocalConfig(strategy="block", block_size=8, epochs=12, batch_size=4, lr=1e-2)),
        ("local", LocalConfig(strategy="full", epochs=12, batch_size=4, lr=1e-2)),
        ("finetune", FinetuneConfig(epochs=12, batch_size=4, lr=1e-2, augment=False)),
    ],
    ids=["global", "local_block", "local_full", "finetune"],
)
def test_loss_decreases_on_a_tiny_fixed_batch(
    stage: str, cfg: Any, synthetic_slices: SliceData, monkeypatch: pytest.MonkeyPatch
) -> None:
    # one labelled volume of 4 slices, one more unlabelled one for global: one batch per epoch
    if stage == "global":
        # The full SimCLR views (rotation, zoom, shift, flips) make a task that a 4-channel U-Net
        # does not start to solve within a dozen steps (its pooled embeddings begin almost
        # identical); intensity-only views keep the task, and the test, small.
        mild = functools.partial(
            global_views, p_flip=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0), max_translate=0.0
        )
        monkeypatch.setattr(stages, "global_views", mild)
    tiny_split = Split(index=0, train=(0, 1), val=(2,), test=(3,))
    volumes = (0, 1) if stage == "global" else (0,)
    data = _subset(synthetic_slices, _foreground_slices(synthetic_slices, (*volumes, 2, 3), 4))
    losses: list[float] = []
    ctx = _context(data, tiny_split, (0,), report=lambda m, c: losses.append(m["loss"]))
    STAGE_KINDS[stage].run(cfg, TINY, ctx)
    assert len(losses) == cfg.epochs
    # contrastive losses cannot fall below about log(number of negatives): compare relatively
    first, last = np.mean(losses[:3]), np.mean(losses[-3:])
    assert last < 0.95 * first, losses


# ---------------------------------------------------------------------------------------------
# resuming


@pytest.mark.parametrize(
    "regulariser, lr_schedule",
    [("none", "constant"), ("mixup", "constant"), ("mean_teacher", "constant"), ("none", "poly")],
)
def test_interrupted_and_resumed_finetune_equals_uninterrupted(
    regulariser: str,
    lr_schedule: str,
    synthetic_slices: SliceData,
    split: Split,
    labelled: tuple[int, ...],
) -> None:
    cfg = _stage_config(
        "finetune",
        epochs=3,
        regulariser=regulariser,
        consistency_rampup=2,
        lr_schedule=lr_schedule,
    )
    full_log: list[dict[str, float]] = []
    last: dict[str, Any] = {}
    full = run_finetune(
        cfg,
        TINY,
        _context(
            synthetic_slices,
            split,
            labelled,
            report=lambda m, c: (full_log.append(m), last.update(c)),
        ),
    )

    saved: dict[str, Any] = {}

    class Interrupted(Exception):
        pass

    def crash_after_first_epoch(
        metrics: dict[str, float], checkpoint: dict[str, Any] | None
    ) -> None:
        saved.update(checkpoint)
        raise Interrupted

    with pytest.raises(Interrupted):
        run_finetune(
            cfg, TINY, _context(synthetic_slices, split, labelled, report=crash_after_first_epoch)
        )
    assert saved["epoch"] == 1 and ("teacher" in saved) == (regulariser == "mean_teacher")

    resumed_log: list[dict[str, float]] = []
    resumed = run_finetune(
        cfg,
        TINY,
        _context(
            synthetic_slices,
            split,
            labelled,
            report=lambda m, c: resumed_log.append(m),
            resume=saved,
        ),
    )
    assert [_without_timing(m) for m in resumed_log] == [_without_timing(m) for m in full_log[1:]]
    assert _without_timing(resumed.metrics) == _without_timing(full.metrics)
    assert resumed.state.keys() == full.state.keys()
    for key, value in full.state.items():
        assert torch.equal(resumed.state[key], value), key

    # resuming from the last epoch's checkpoint trains nothing and evaluates the same model
    calls: list[dict[str, float]] = []
    done = run_finetune(
        cfg,
        TINY,
        _context(
            synthetic_slices, split, labelled, report=lambda m, c: calls.append(m), resume=last
        ),
    )
    assert calls == [] and last["epoch"] == cfg.epochs
    assert _without_timing(done.metrics) == _without_timing(full.metrics)


def test_resume_rejects_another_stages_checkpoint(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    checkpoints: list[dict[str, Any]] = []
    ctx = _context(synthetic_slices, split, labelled, report=lambda m, c: checkpoints.append(c))
    run_global(_stage_config("global", epochs=1), TINY, ctx)
    with pytest.raises(ValueError, match="resume: checkpoint is of stage 'global'"):
        run_finetune(
            _stage_config("finetune"),
            TINY,
            _context(synthetic_slices, split, labelled, resume=checkpoints[-1]),
        )


# ---------------------------------------------------------------------------------------------
# weight flow: heads are trained, only the requested parts are transferred


def _fresh_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """The UNet a stage builds before training (stages seed with seed_everything first)."""
    seed_everything(seed)
    return UNet(TINY).state_dict()


def _part_changed(
    before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], part: str
) -> bool:
    return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(f"{part}."))


def test_global_stage_trains_encoder_and_head_only(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    result = run_global(
        _stage_config("global", epochs=1), TINY, _context(synthetic_slices, split, labelled)
    )
    initial = _fresh_state()
    assert _part_changed(initial, result.state, "encoder")
    assert _part_changed(initial, result.state, "global_head")  # the head is in the optimiser
    for part in ("decoder", "local_head", "seg_head"):
        assert not _part_changed(initial, result.state, part), part


def test_local_stage_trains_local_head(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    result = run_local(
        _stage_config("local", epochs=1), TINY, _context(synthetic_slices, split, labelled)
    )
    initial = _fresh_state()
    for part in ("encoder", "decoder", "local_head"):
        assert _part_changed(initial, result.state, part), part
    assert not _part_changed(initial, result.state, "global_head")


def test_finetune_starts_from_transferred_parts_and_fresh_heads(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    parent = run_global(
        _stage_config("global", epochs=1), TINY, _context(synthetic_slices, split, labelled)
    )
    # a vanishing learning rate keeps the weights where they started
    ctx = _context(
        synthetic_slices, split, labelled, init_state=parent.state, init_parts=("encoder",)
    )
    child = run_finetune(_stage_config("finetune", epochs=1, lr=1e-12), TINY, ctx)
    fresh = _fresh_state()
    for key, value in child.state.items():
        expected = parent.state[key] if key.startswith("encoder.") else fresh[key]
        torch.testing.assert_close(value, expected, atol=1e-8, rtol=0, msg=key)
    assert _part_changed(fresh, parent.state, "global_head")


def test_init_parts_without_state_is_an_error(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    with pytest.raises(ValueError, match="init_parts"):
        _context(synthetic_slices, split, labelled, init_parts=("encoder",))
    with pytest.raises(ValueError, match="labelled"):
        _context(synthetic_slices, split, (split.test[0],))


# ---------------------------------------------------------------------------------------------
# data use: val and test volumes never reach training


def _poisoned(data: SliceData, volumes: tuple[int, ...]) -> SliceData:
    """``data`` with every slice of ``volumes`` set to NaN: training on any of them makes the
    loss non-finite (the stages raise FloatingPointError)."""
    images = np.array(data.images)
    images[np.isin(data.volume, volumes)] = np.nan
    return _subset(data, np.arange(len(images)), images)


STAGE_CASES = [
    ("global", GlobalConfig(epochs=1, batch_size=64)),
    ("global", GlobalConfig(loss="partition", epochs=1, batch_size=64)),
    ("local", LocalConfig(epochs=1, batch_size=4, block_size=8)),
    ("local", LocalConfig(loss="self", epochs=1, batch_size=16, self_regions=4)),
    ("finetune", FinetuneConfig(epochs=1, batch_size=8)),
    ("finetune", FinetuneConfig(epochs=1, batch_size=8, regulariser="mean_teacher")),
]
STAGE_IDS = ["global", "partition", "local_block", "local_self", "finetune", "mean_teacher"]


@pytest.mark.parametrize(("stage", "cfg"), STAGE_CASES, ids=STAGE_IDS)
def test_stages_never_train_on_validation_or_test_volumes(
    stage: str, cfg: Any, synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    roles = stage_volumes(stage, cfg, split, labelled)
    used = set().union(*roles.values())
    assert used <= set(split.train)
    reads_unlabelled = (
        stage == "global" or getattr(cfg, "loss", "") == "self" or "unlabelled" in roles
    )
    assert (used == set(split.train)) if reads_unlabelled else (used == set(labelled))

    # behaviourally: every volume the stage must not train on is NaN, yet training stays finite
    forbidden = tuple(v for v in range(synthetic_slices.num_volumes) if v not in used)
    data = _poisoned(synthetic_slices, forbidden)
    losses: list[float] = []
    result = STAGE_KINDS[stage].run(
        cfg, TINY, _context(data, split, labelled, report=lambda m, c: losses.append(m["loss"]))
    )
    assert losses and all(math.isfinite(x) for x in losses)
    assert all(torch.isfinite(t).all() for t in result.state.values() if t.is_floating_point())


def test_poisoning_detects_a_stage_that_reads_a_volume(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    # the check above can fail: a NaN training volume is caught
    data = _poisoned(synthetic_slices, (split.train[0],))
    with pytest.raises(FloatingPointError, match="global: loss is nan"):
        run_global(_stage_config("global", epochs=1), TINY, _context(data, split, labelled))


# ---------------------------------------------------------------------------------------------
# every method end to end


@pytest.fixture(scope="module")
def pipeline_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-cache")


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_runs_end_to_end(
    method: str, synthetic_data_config: DataConfig, pipeline_cache: Path
) -> None:
    stages = StageConfigs(
        global_=GlobalConfig(epochs=1, batch_size=64),
        local=LocalConfig(epochs=1, batch_size=8, block_size=8, stride=4, self_regions=4),
        finetune=FinetuneConfig(epochs=1, batch_size=8, unlabelled_batch_size=8),
    )
    cfg = PipelineConfig(
        data=synthetic_data_config,
        method=method,
        label_fraction=0.2,
        model=TINY,
        stages=stages,
        cache_dir=str(pipeline_cache),
    )
    out = run_pipeline(cfg, device="cpu")
    assert tuple(out["stages"]) == METHODS[method].stages
    assert [r["stage"] for r in out["epochs"]] == list(METHODS[method].stages)
    assert 0 <= out["metrics"]["test_dice_volume_mean"] <= 1
    assert 0 <= out["metrics"]["test_dice_pooled_mean"] <= 1
    assert all(math.isfinite(r["loss"]) for r in out["epochs"])


@pytest.mark.parametrize(
    ("num_slices", "batch_size", "min_batch"), [(23, 4, 1), (23, 4, 2), (9, 2, 2), (7, 8, 1)]
)
def test_epoch_batches_shard_one_permutation_across_ranks(
    num_slices: int, batch_size: int, min_batch: int
) -> None:
    world = 2
    shards = []
    for rank in range(world):
        dist = loop.Dist(rank, world)
        order = torch.Generator().manual_seed(5)
        batches = loop.epoch_batches(num_slices, batch_size, min_batch, order, dist, CPU)
        assert len(batches) == loop.batches_per_epoch(num_slices, batch_size, min_batch, dist)
        assert all(min_batch <= len(b) <= batch_size for b in batches)
        shards.append(torch.cat(batches).tolist() if batches else [])
    assert not set(shards[0]) & set(shards[1])  # ranks never share a slice in an epoch
    permutation = torch.randperm(num_slices, generator=torch.Generator().manual_seed(5)).tolist()
    usable = permutation[: num_slices // world * world]
    assert shards[0] == usable[0::world][: len(shards[0])]
    assert shards[1] == usable[1::world][: len(shards[1])]


# ---------------------------------------------------------------------------------------------
# torch.distributed: two CPU ranks (gloo) agree on every reported number and on the final model


def _ddp_worker(
    rank: int,
    world: int,
    port: int,
    data: SliceData,
    split: Split,
    labelled: tuple[int, ...],
    out: str,
) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        results = {}
        for stage, cfg in [
            ("global", GlobalConfig(epochs=1, batch_size=16)),
            (
                "finetune",
                FinetuneConfig(
                    epochs=2, batch_size=4, regulariser="mean_teacher", unlabelled_batch_size=4
                ),
            ),
        ]:
            log: list[dict[str, float]] = []
            result = STAGE_KINDS[stage].run(
                cfg,
                TINY,
                _context(data, split, labelled, report=lambda m, c, log=log: log.append(m)),
            )
            results[stage] = {"log": log, "metrics": result.metrics, "state": result.state}
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_two_ranks_report_the_same_numbers_and_model(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...], tmp_path: Path
) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # in-memory copies: memory-mapped arrays are pickled into the workers as plain arrays anyway
    data = _subset(synthetic_slices, np.arange(len(synthetic_slices.images)))
    torch.multiprocessing.spawn(
        _ddp_worker, args=(2, port, data, split, labelled, str(tmp_path)), nprocs=2
    )
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for stage in ("global", "finetune"):
        first, second = ranks[0][stage], ranks[1][stage]
        assert [_without_timing(m) for m in first["log"]] == [
            _without_timing(m) for m in second["log"]
        ]
        assert _without_timing(first["metrics"]) == _without_timing(second["metrics"])
        for key, value in first["state"].items():
            assert torch.equal(value, second["state"][key]), (stage, key)
        assert all(math.isfinite(m["loss"]) for m in first["log"])


def test_validation_every_k_epochs_and_at_the_last(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    reports: list[dict[str, float]] = []
    cfg = _stage_config("finetune", epochs=5, val_every=2)
    run_finetune(
        cfg,
        TINY,
        _context(synthetic_slices, split, labelled, report=lambda m, c: reports.append(m)),
    )
    assert [r["epoch"] for r in reports if "val_dice_mean" in r] == [2, 4, 5]


@pytest.mark.parametrize("stage", ["global", "local", "finetune"])
def test_step_budget_runs_exactly_that_many_updates(
    stage: str, synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    """steps: N stops after N optimiser steps, cutting the last epoch short, whatever the
    number of slices (equal updates at every label fraction)."""
    reports: list[dict[str, float]] = []
    cfg = dataclasses.replace(_stage_config(stage), epochs=None, steps=7, batch_size=4)
    steps_taken: list[int] = []
    original = torch.optim.Adam.step

    def counting_step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        steps_taken.append(1)
        return original(self, *args, **kwargs)

    ctx = _context(synthetic_slices, split, labelled, report=lambda m, c: reports.append(m))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", counting_step)
        result = STAGE_KINDS[stage].run(cfg, TINY, ctx)
    assert len(steps_taken) == 7
    assert result.metrics["steps"] == 7
    assert reports[-1]["steps"] == 7
    assert [r["steps"] for r in reports] == sorted(r["steps"] for r in reports)


@pytest.mark.parametrize("schedule", ["constant", "poly", "cosine"])
def test_lr_schedule_sets_every_steps_learning_rate(
    schedule: str, synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    """The learning rate of step i of N is lr * lr_factor(schedule, i, N), across epochs."""
    cfg = dataclasses.replace(
        _stage_config("finetune"),
        epochs=None,
        steps=7,
        batch_size=4,
        lr=1e-3,
        lr_schedule=schedule,
    )
    rates: list[float] = []
    original = torch.optim.Adam.step

    def recording_step(self: torch.optim.Adam, *args: Any, **kwargs: Any) -> Any:
        rates.append(self.param_groups[0]["lr"])
        return original(self, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.optim.Adam, "step", recording_step)
        run_finetune(cfg, TINY, _context(synthetic_slices, split, labelled))
    expected = {
        "constant": [1e-3] * 7,
        "poly": [1e-3 * (1 - i / 7) ** 0.9 for i in range(7)],
        "cosine": [1e-3 * (1 + math.cos(math.pi * i / 7)) / 2 for i in range(7)],
    }[schedule]
    assert rates == pytest.approx(expected, rel=1e-12)


def test_lr_factor_hand_values() -> None:
    assert lr_factor("poly", 0, 10) == 1.0 and lr_factor("cosine", 0, 10) == 1.0
    assert lr_factor("poly", 5, 10) == pytest.approx(0.5**0.9)  # 0.5359
    assert lr_factor("cosine", 5, 10) == pytest.approx(0.5)
    assert lr_factor("cosine", 10, 10) == pytest.approx(0.0)
    assert lr_factor("constant", 9, 10) == 1.0


def test_validation_every_k_steps_per_class_and_never_twice(
    synthetic_slices: SliceData, split: Split, labelled: tuple[int, ...]
) -> None:
    reports: list[dict[str, float]] = []
    cfg = dataclasses.replace(
        _stage_config("finetune"), epochs=None, steps=20, batch_size=4, val_every_steps=6
    )
    ctx = _context(synthetic_slices, split, labelled, report=lambda m, c: reports.append(m))
    calls: list[int] = []
    original = stages._predict_and_score

    def counting(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        return original(*args, **kwargs)

    original_test = native.score_test_volumes

    def counting_test(*args: Any, **kwargs: Any) -> dict[str, float]:
        calls.append(1)
        return original_test(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "_predict_and_score", counting)
        patch.setattr(native, "score_test_volumes", counting_test)  # the test pass
        result = run_finetune(cfg, TINY, ctx)
    validated = [r for r in reports if "val_dice_mean" in r]
    per_epoch = reports[0]["steps"]
    # an epoch is validated when its steps pass a multiple of 6, and the last one always
    expected = [r["steps"] for r in reports if r["steps"] // 6 > (r["steps"] - per_epoch) // 6]
    assert [r["steps"] for r in validated] == sorted(set(expected) | {20})
    assert all({"val_dice_c1", "val_dice_c2", "val_dice_pooled_c1"} <= set(r) for r in validated)
    # final metrics reuse the last epoch's validation: one pass per validated epoch + one test
    assert len(calls) == len(validated) + 1
    assert result.metrics["val_dice_volume_mean"] == validated[-1]["val_dice_mean"]
