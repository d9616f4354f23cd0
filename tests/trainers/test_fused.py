"""Fused fine-tunings (trainers/fused.py) against separate ``run_finetune`` runs on tiny
synthetic data: weights, per-epoch reports and final Dice equal to float tolerance, members with
different labelled counts, Mixup, resuming, and the reasons not to fuse."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

from trainers.config import FinetuneConfig, ModelConfig, SplitConfig
from trainers.data import SliceData, Split, labelled_subset, make_split
from trainers.fused import FusedRunError, fusable, run_finetunes_fused
from trainers.loop import StageContext, StageResult
from trainers.stages import run_finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
TINY = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=16, local_hidden=8)
TIMING_KEYS = {"seconds", "slices_per_s", "train_seconds", "eval_seconds", "native_eval_seconds"}
# Float tolerance: the vmapped pass sums in another order than a separate run's convolutions;
# instance norm of near-constant channels and Adam's normalised steps amplify such rounding
# differences (a separate run on 2 threads instead of 1 moves some weights by ~1e-5 here too).
# Weights move by up to lr = 1e-3 per step; they must agree to a tenth of one step.
TOL = {"rtol": 1e-3, "atol": 1e-4}
METRIC_TOL = {"rel": 1e-4, "abs": 1e-4}


@pytest.fixture(scope="module")
def split(synthetic_slices: SliceData) -> Split:
    return make_split(synthetic_slices.num_volumes, SplitConfig(), 0)


# (seed, label fraction) of the members: two labelled counts, so different steps per epoch
# and last-batch sizes
MEMBERS = [(0, 0.2), (1, 0.2), (2, 0.4)]


def _contexts(
    data: SliceData, split: Split, logs: list[list[tuple[dict, Any]]] | None = None, **kwargs: Any
) -> list[StageContext]:
    ctxs = []
    for k, (seed, fraction) in enumerate(MEMBERS):
        report = None
        if logs is not None:
            log = logs[k]
            report = lambda m, c, log=log: log.append((m, c))  # noqa: E731
        ctxs.append(
            StageContext(
                data=data,
                split=split,
                labelled=labelled_subset(split, fraction),
                seed=seed,
                device=CPU,
                report=report,
                **kwargs,
            )
        )
    return ctxs


def _assert_same(fused: StageResult, alone: StageResult) -> None:
    assert fused.state.keys() == alone.state.keys()
    for name in alone.state:
        torch.testing.assert_close(fused.state[name], alone.state[name], **TOL, msg=name)
    assert fused.metrics.keys() == alone.metrics.keys()
    for name, value in alone.metrics.items():
        if name not in TIMING_KEYS:
            assert fused.metrics[name] == pytest.approx(value, nan_ok=True, **METRIC_TOL), name


def _assert_same_reports(fused: list[tuple[dict, Any]], alone: list[tuple[dict, Any]]) -> None:
    assert [m["epoch"] for m, _ in fused] == [m["epoch"] for m, _ in alone]
    for (fm, fc), (am, ac) in zip(fused, alone, strict=True):
        assert fm.keys() == am.keys()
        for name, value in am.items():
            if name not in TIMING_KEYS:
                assert fm[name] == pytest.approx(value, nan_ok=True, **METRIC_TOL), name
        assert (fc is None) == (ac is None)
        if ac is not None:
            assert fc.keys() == ac.keys()
            assert fc["epoch"] == ac["epoch"]
            for name in ac["model"]:
                torch.testing.assert_close(fc["model"][name], ac["model"][name], **TOL)
            for i, state in ac["optimizer"]["state"].items():
                for key, value in state.items():
                    torch.testing.assert_close(fc["optimizer"]["state"][i][key], value, **TOL)


@pytest.mark.parametrize("fused_pass", ["vmap", "loop"])
@pytest.mark.parametrize("regulariser, lr_schedule", [("none", "poly"), ("mixup", "constant")])
def test_fused_equals_separate_runs(
    regulariser: str, lr_schedule: str, fused_pass: str, synthetic_slices: SliceData, split: Split
) -> None:
    cfg = FinetuneConfig(
        steps=8, batch_size=8, lr=1e-3, regulariser=regulariser, lr_schedule=lr_schedule
    )
    fused_logs: list[list] = [[] for _ in MEMBERS]
    alone_logs: list[list] = [[] for _ in MEMBERS]
    fused = run_finetunes_fused(
        cfg, TINY, _contexts(synthetic_slices, split, fused_logs), fused_pass
    )
    alone = [run_finetune(cfg, TINY, ctx) for ctx in _contexts(synthetic_slices, split, alone_logs)]
    assert len({len(log) for log in alone_logs}) > 1  # members of different epoch counts
    for f, a in zip(fused, alone, strict=True):
        _assert_same(f, a)
        assert "test_dice_volume_mean" in f.metrics and "val_dice_volume_mean" in f.metrics
    for f, a in zip(fused_logs, alone_logs, strict=True):
        _assert_same_reports(f, a)
    if fused_pass == "loop":  # the same kernels on the same tensors: bitwise equal on CPU
        for f, a in zip(fused, alone, strict=True):
            for name in a.state:
                assert torch.equal(f.state[name], a.state[name]), name
    # the members really differ from one another
    assert not torch.allclose(fused[0].state["seg_head.weight"], fused[1].state["seg_head.weight"])


def test_equal_batches_take_the_vmapped_pass_and_equal_separate_runs(
    synthetic_slices: SliceData, split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Members of one labelled subset: every step's batches have one size (the vmap path)."""
    import trainers.fused as fused_module

    calls = {"vmap": 0, "loop": 0}
    original = fused_module._Fused.logits

    def counting(self: Any, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
        calls["vmap" if len({tuple(x.shape) for x in inputs}) == 1 else "loop"] += 1
        return original(self, inputs)

    monkeypatch.setattr(fused_module._Fused, "logits", counting)
    monkeypatch.setattr(
        "tests.trainers.test_fused.MEMBERS", [(0, 0.2), (5, 0.2), (9, 0.2)], raising=True
    )
    cfg = FinetuneConfig(epochs=2, batch_size=8, lr=1e-3, val_every=2)
    fused = run_finetunes_fused(cfg, TINY, _contexts(synthetic_slices, split), "vmap")
    assert calls["vmap"] > 0
    alone = [run_finetune(cfg, TINY, ctx) for ctx in _contexts(synthetic_slices, split)]
    for f, a in zip(fused, alone, strict=True):
        _assert_same(f, a)


def test_resumed_fused_run_equals_uninterrupted(synthetic_slices: SliceData, split: Split) -> None:
    """Interrupted after a report, then resumed fused from the members' checkpoints: the same
    as the uninterrupted fused run, and a member's fused checkpoint resumes a separate run."""
    monkey = [(0, 0.2), (1, 0.2), (4, 0.2)]  # one labelled count: all members checkpoint at once
    cfg = FinetuneConfig(epochs=3, batch_size=8, lr=1e-3, lr_schedule="cosine")
    original = list(MEMBERS)
    MEMBERS[:] = monkey
    try:
        full = run_finetunes_fused(cfg, TINY, _contexts(synthetic_slices, split), "vmap")
        saved: dict[int, Any] = {}

        class Interrupted(Exception):
            pass

        ctxs = _contexts(synthetic_slices, split)
        for k, ctx in enumerate(ctxs):

            def crash_at_epoch_1(m: dict, c: Any, k: int = k) -> None:
                saved[k] = c
                if k == len(ctxs) - 1:
                    raise Interrupted

            ctx.report = crash_at_epoch_1
        with pytest.raises(Interrupted):
            run_finetunes_fused(cfg, TINY, ctxs)
        assert all(saved[k]["epoch"] == 1 for k in range(len(ctxs)))
        resumed_ctxs = [
            dataclasses.replace(ctx, report=None, resume=saved[k])
            for k, ctx in enumerate(_contexts(synthetic_slices, split))
        ]
        resumed = run_finetunes_fused(cfg, TINY, resumed_ctxs, "vmap")
        for r, f in zip(resumed, full, strict=True):
            _assert_same(r, f)
        alone = run_finetune(cfg, TINY, resumed_ctxs[1])
        _assert_same(alone, full[1])
    finally:
        MEMBERS[:] = original


def test_fusable_reasons(synthetic_slices: SliceData, split: Split) -> None:
    ctxs = _contexts(synthetic_slices, split)
    cfg = FinetuneConfig(steps=8, batch_size=8)
    assert fusable(cfg, TINY, ctxs) is None
    assert "fewer than 2" in fusable(cfg, TINY, ctxs[:1])
    mt = dataclasses.replace(cfg, regulariser="mean_teacher")
    assert "mean_teacher" in fusable(mt, TINY, ctxs)
    assert "batch norm" in fusable(cfg, dataclasses.replace(TINY, norm="batch"), ctxs)
    by_epochs = FinetuneConfig(epochs=2, batch_size=8)  # different labelled counts
    assert "step budgets" in fusable(by_epochs, TINY, ctxs)
    resumed = [dataclasses.replace(ctxs[0], resume={"epoch": 1}), *ctxs[1:]]
    assert "different optimiser steps" in fusable(cfg, TINY, resumed)
    with pytest.raises(ValueError, match="cannot be fused: regulariser mean_teacher"):
        run_finetunes_fused(mt, TINY, ctxs)
    with pytest.raises(ValueError, match="fused_pass"):
        run_finetunes_fused(cfg, TINY, ctxs, "grouped")


def test_a_failing_member_fails_alone(
    synthetic_slices: SliceData, split: Split, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A member whose loss turns non-finite gets its error; the others' results equal their
    separate runs."""
    import trainers.fused as fused_module

    original = fused_module.targets_loss
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, targets: Any, dice_weight: float) -> torch.Tensor:
        loss = original(logits, targets, dice_weight)
        calls["n"] += 1
        # member 1 of 3: every third call from the second on
        return loss * float("nan") if calls["n"] % 3 == 2 else loss

    monkeypatch.setattr(fused_module, "targets_loss", poisoned)
    cfg = FinetuneConfig(steps=4, batch_size=8, lr=1e-3)
    with pytest.raises(FusedRunError) as raised:
        run_finetunes_fused(cfg, TINY, _contexts(synthetic_slices, split))
    err = raised.value
    assert list(err.failures) == [1] and "loss is nan" in str(err.failures[1])
    monkeypatch.setattr(fused_module, "targets_loss", original)
    ctxs = _contexts(synthetic_slices, split)
    for k in (0, 2):
        _assert_same(err.results[k], run_finetune(cfg, TINY, ctxs[k]))
