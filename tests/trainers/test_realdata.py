"""Smoke test of the whole in-process pipeline on the real MSD Hippocampus data, and the streamed
evaluation against scoring all predictions at once there (skipped with a visible reason when
../shared/data/Task04_Hippocampus is absent)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.config import DataConfig, FinetuneConfig, ModelConfig, StageConfigs
from trainers.data import prepare_slices
from trainers.metrics import evaluate_volumes
from trainers.model import UNet
from trainers.pipeline import PipelineConfig, run_pipeline
from trainers.stages import evaluate_model

pytestmark = [pytest.mark.realdata, pytest.mark.usefixtures("one_torch_thread")]


def test_random_init_finetune_on_one_labelled_hippocampus_volume(
    shared_data_root: Path, tmp_path: Path
) -> None:
    cfg = PipelineConfig(
        data=DataConfig(kind="msd", root=str(shared_data_root), image_size=32),
        method="random",
        label_fraction=0.005,  # max(1, round(0.005 * 125 training volumes)) = 1 volume
        model=ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=16, local_hidden=8),
        stages=StageConfigs(finetune=FinetuneConfig(epochs=1, batch_size=8, lr=1e-3)),
        cache_dir=str(tmp_path / "cache"),
    )
    out = run_pipeline(cfg, device="cpu")

    split = out["split"]
    assert len(split.train) + len(split.val) + len(split.test) == 208
    assert len(out["labelled"]) == 1
    assert [(r["stage"], r["epoch"]) for r in out["epochs"]] == [("finetune", 1)]
    assert math.isfinite(out["epochs"][0]["loss"])
    metrics = out["metrics"]
    assert metrics["test_n_volumes"] == len(split.test)
    assert metrics["val_n_volumes"] == len(split.val)
    for key in (
        "test_dice_pooled_mean",
        "test_dice_volume_mean",
        "test_dice_pooled_c1",
        "test_dice_pooled_c2",
    ):
        assert 0 <= metrics[key] <= 1, key


def test_streamed_evaluation_equals_scoring_all_predictions_at_once(
    shared_data_root: Path, tmp_path: Path
) -> None:
    """evaluate_model (batches into per-volume counts) gives exactly the numbers of the former
    evaluation: every slice predicted, the argmax maps concatenated, evaluate_volumes."""
    data = prepare_slices(
        DataConfig(kind="msd", root=str(shared_data_root), image_size=32), tmp_path / "cache"
    )
    torch.manual_seed(0)
    model = UNet(ModelConfig(base_channels=4, depth=2), 1, data.num_classes).eval()
    volumes = tuple(range(0, data.num_volumes, 7))
    index = data.slices_of(volumes)
    with torch.inference_mode():
        images = torch.from_numpy(np.ascontiguousarray(data.images[index]))
        pred = torch.cat([model(x).argmax(1) for x in images.split(256)])
    expected = evaluate_volumes(pred, data.labels[index], data.volume[index], data.num_classes)
    for batch_size in (None, 13):
        got = evaluate_model(model, data, volumes, torch.device("cpu"), batch_size)
        assert got == expected, batch_size
