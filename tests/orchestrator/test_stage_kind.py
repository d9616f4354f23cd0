"""A fourth stage kind is one declaration plus its function: a toy "probe" stage (fine-tune only
the segmentation head on a frozen pretrained encoder, a linear-probe evaluation) is registered,
and a sweep using it is planned from YAML, run in-process stage node by stage node through the
same ``run_stage`` the Ray worker calls, and tabulated."""

from __future__ import annotations

import dataclasses
import math
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pandas as pd
import pytest
import torch

from orchestrator.plan import build_plan
from orchestrator.spec import SpecError
from orchestrator.store import StageStore
from orchestrator.tables import collect, paper_table
from orchestrator.worker import run_stage
from tests.orchestrator.specs import spec_of
from trainers.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    check_positive,
    check_positive_int,
    from_dict,
)
from trainers.data import prepare_slices
from trainers.loop import StageContext, StageResult
from trainers.losses import segmentation_loss
from trainers.methods import METHODS, Method
from trainers.model import UNet, transfer_weights
from trainers.registry import STAGE_KINDS, StageKind, register_stage
from trainers.stages import evaluate_model, resolve_volumes


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """Train only ``seg_head`` for ``epochs`` passes over the labelled slices."""

    epochs: int = 1
    batch_size: int = 8
    lr: float = 1e-2

    def __post_init__(self) -> None:
        check_positive_int("probe", "epochs", self.epochs)
        check_positive_int("probe", "batch_size", self.batch_size)
        check_positive("probe", "lr", self.lr)


def probe_reads(cfg: ProbeConfig) -> dict[str, str]:
    return {"train": "labelled"}


def run_probe(cfg: ProbeConfig, model_cfg: ModelConfig, ctx: StageContext) -> StageResult:
    torch.manual_seed(ctx.seed)
    model = UNet(model_cfg, in_channels=1, num_classes=ctx.data.num_classes)
    if ctx.init_parts:
        transfer_weights(ctx.init_state, model, ctx.init_parts)
    optimizer = torch.optim.SGD(model.seg_head.parameters(), lr=cfg.lr)
    index = ctx.data.slices_of(resolve_volumes(probe_reads(cfg), ctx.split, ctx.labelled)["train"])
    images = torch.from_numpy(ctx.data.images[index])  # (N, C, H, W)
    labels = torch.from_numpy(ctx.data.labels[index].astype("int64"))
    for epoch in range(1, cfg.epochs + 1):
        total = 0.0
        for start in range(0, len(index), cfg.batch_size):
            loss = segmentation_loss(
                model(images[start : start + cfg.batch_size]),
                labels[start : start + cfg.batch_size],
            )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * len(images[start : start + cfg.batch_size])
        metrics = {"epoch": epoch, "loss": total / len(index), "seconds": 0.0}
        if ctx.report is not None:
            ctx.report(metrics, None)
    final = {"loss": metrics["loss"], "train_seconds": 0.0}
    for prefix, volumes in (("val", ctx.split.val), ("test", ctx.split.test)):
        scores = evaluate_model(model, ctx.data, volumes, ctx.device)
        final.update({f"{prefix}_{name}": float(value) for name, value in scores.items()})
    return StageResult({k: v.detach().clone() for k, v in model.state_dict().items()}, final)


PROBE = StageKind(
    name="probe",
    config=ProbeConfig,
    run=run_probe,
    reads=probe_reads,
    parents={"global": ("encoder",)},
    final=True,
    title="linear probe",
)


@pytest.fixture
def probe_registered(monkeypatch: pytest.MonkeyPatch) -> Iterator[StageKind]:
    kind = register_stage(PROBE)
    try:
        monkeypatch.setitem(
            METHODS, "global+probe", Method("global+probe", ("global", "probe"), {}, "probe")
        )
        yield kind
    finally:
        STAGE_KINDS.pop("probe")


SPEC = """
name: probe-sweep
dataset: {kind: msd, root: "ROOT", image_size: 32}
model: {base_channels: 4, depth: 2, embed_dim: 8, global_hidden: 16, local_hidden: 8}
method: [global, global+probe]
label_fraction: [0.5]
seed: 0
stages:
  global:   {epochs: 1, batch_size: 16}
  finetune: {epochs: 1, batch_size: 8}
  probe:    {epochs: 2}
"""


def spec_text(root: Path) -> str:
    """The sweep over the session's small synthetic MSD folder (10 cases of 24 x 28 x 20)."""
    return textwrap.dedent(SPEC).replace("ROOT", str(root))


def test_a_registered_stage_kind_is_planned_run_and_tabulated(
    probe_registered: StageKind, synthetic_root: Path, tmp_path: Path
) -> None:
    spec = spec_of(tmp_path, spec_text(synthetic_root))
    plan = build_plan(spec)
    # the global pretraining node is shared by both methods; probe reads labels
    assert plan.summary()["stages"] == {
        "global": {"nodes": 1, "to_run": 1},
        "finetune": {"nodes": 1, "to_run": 1},
        "probe": {"nodes": 1, "to_run": 1},
    }
    probe = next(node for node in plan.nodes.values() if node.stage == "probe")
    assert probe.init_parts == ("encoder",) and probe.label_fraction == 0.5
    assert probe.config == {"epochs": 2, "batch_size": 8, "lr": 0.01}

    # run in-process, parents first, through the Ray worker's own run_stage
    store = StageStore(spec.storage)
    store.claim_sweep(spec, plan=plan)
    data = prepare_slices(from_dict(DataConfig, probe.data, "dataset"), store.cache_dir)
    cache = store.cache_dir / data.fingerprint
    for level in plan.levels:
        for key in level:
            node = plan.nodes[key]
            store.write_node(node)

            def record(metrics: dict, _checkpoint: object, key: str = key) -> None:
                store.append_epoch(key, {**metrics, "node": key, "stage": plan.nodes[key].stage})

            result = run_stage(node, cache, store, torch.device("cpu"), report=record)
            store.write_result(key, result.state, result.metrics)

    tables = collect(plan, store)
    trials = tables.trials.set_index("method")
    assert list(trials["status"]) == ["ok", "ok"]
    assert trials.loc["global+probe", "key_probe"] == probe.key
    assert pd.isna(trials.loc["global", "key_probe"])
    assert 0 <= trials.loc["global+probe", "test_dice_pooled_mean"] <= 1
    assert math.isnan(trials.loc["global+probe", "steps_probe"])  # the toy counts no steps
    assert set(tables.epochs["stage"]) == {"global", "finetune", "probe"}
    assert len(tables.epochs[tables.epochs["stage"] == "probe"]) == 2
    assert not paper_table(tables.trials).empty
    assert trials.loc["global+probe", "wall_s_probe"] == 0.0  # the sum of its epochs' seconds


def test_a_stage_kind_is_declared_once(
    probe_registered: StageKind, synthetic_root: Path, tmp_path: Path
) -> None:
    with pytest.raises(ValueError, match="registered already"):
        register_stage(PROBE)
    with pytest.raises(ValueError, match="unknown parent kind 'nope'"):
        register_stage(dataclasses.replace(PROBE, name="other", parents={"nope": ()}))
    # the spec knows the new section and grid paths, and checks them with the config's rules
    bad = spec_text(synthetic_root).replace("probe:    {epochs: 2}", "probe: {epochs: 0}")
    with pytest.raises(SpecError, match=r"stages\.probe\.epochs: must be an integer >= 1"):
        spec_of(tmp_path, bad, "bad.yaml", storage="s")
    with pytest.raises(ConfigError, match="probe.lr"):
        ProbeConfig(lr=-1.0)


def test_unregistered_stage_sections_are_refused(synthetic_root: Path, tmp_path: Path) -> None:
    text = spec_text(synthetic_root).replace("[global, global+probe]", "global")
    with pytest.raises(
        SpecError, match=r"stages\.probe: unknown stage \(known: global, local, finetune\)"
    ):
        spec_of(tmp_path, text, storage="s")
