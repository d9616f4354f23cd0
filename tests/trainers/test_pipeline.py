"""The method registry (trainers/methods.py) and the in-process pipeline (trainers/pipeline.py)."""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from trainers import stages
from trainers.augment import global_views
from trainers.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    GlobalConfig,
    LocalConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
)
from trainers.methods import METHODS, Method, resolve_stages
from trainers.pipeline import PipelineConfig, run_pipeline
from trainers.registry import get_stage

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=16, local_hidden=8)
TIMING_KEYS = {"seconds", "slices_per_s", "train_seconds", "eval_seconds", "native_eval_seconds"}


# ---------------------------------------------------------------------------------------------
# the registry


def test_registry_holds_the_papers_methods_and_ours() -> None:
    expected = {
        "random": ("finetune",),
        "global": ("global", "finetune"),
        "global+local_self": ("global", "local", "finetune"),
        "local_stride": ("local", "finetune"),
        "local_block": ("local", "finetune"),
        "local_full": ("local", "finetune"),
        "global+local_stride": ("global", "local", "finetune"),
        "global+local_block": ("global", "local", "finetune"),
        "global+local_full": ("global", "local", "finetune"),
        "mixup": ("finetune",),
        "mean_teacher": ("finetune",),
    }
    assert {name: m.stages for name, m in METHODS.items()} == expected
    assert all(name == m.name and m.description for name, m in METHODS.items())


def test_resolve_stages_applies_overrides_and_keeps_user_settings() -> None:
    user = StageConfigs(
        global_=GlobalConfig(loss="partition", temperature=0.3),
        local=LocalConfig(loss="self", strategy="stride", block_size=8, temperature=0.05),
        finetune=FinetuneConfig(regulariser="mixup", epochs=7),
    )
    resolved = resolve_stages("global+local_block", user)
    assert list(resolved) == ["global", "local", "finetune"]
    assert resolved["global"] == GlobalConfig(loss="ntxent", temperature=0.3)
    assert resolved["local"] == dataclasses.replace(user.local, loss="supervised", strategy="block")
    assert resolved["finetune"] == FinetuneConfig(regulariser="none", epochs=7)

    chaitanya = resolve_stages("global+local_self", user)
    assert chaitanya["global"].loss == "partition" and chaitanya["local"].loss == "self"
    assert list(resolve_stages("random", user)) == ["finetune"]
    assert resolve_stages("mean_teacher", user)["finetune"].regulariser == "mean_teacher"
    assert resolve_stages("local_full", user)["local"].strategy == "full"


def test_unknown_method_lists_the_known_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown method 'simclr'.*global\+local_block"):
        resolve_stages("simclr", StageConfigs())


def test_method_definitions_are_checked() -> None:
    with pytest.raises(ValueError, match="must end with 'finetune'"):
        Method("x", ("global",))
    with pytest.raises(ValueError, match="cannot start from a 'local' stage"):
        Method("x", ("local", "global", "finetune"))
    with pytest.raises(ValueError, match="local.strategi is not a local setting"):
        Method("x", ("local", "finetune"), {"local": {"strategi": "block"}})
    with pytest.raises(ValueError, match="does not run"):
        Method("x", ("finetune",), {"global": {"loss": "ntxent"}})


def test_label_use_and_weight_flow() -> None:
    assert not get_stage("global").uses_labels(GlobalConfig())
    assert get_stage("local").uses_labels(LocalConfig(loss="supervised"))
    assert not get_stage("local").uses_labels(LocalConfig(loss="self"))
    assert get_stage("finetune").uses_labels(FinetuneConfig(regulariser="mean_teacher"))
    assert get_stage("local").init_parts("global") == ("encoder",)
    assert get_stage("finetune").init_parts("local") == ("encoder", "decoder")
    assert get_stage("finetune").init_parts("global") == ("encoder",)
    assert get_stage("global").init_parts(None) == ()
    for stage, parent in [("global", "local"), ("local", "finetune")]:
        with pytest.raises(ValueError, match="cannot start from"):
            get_stage(stage).init_parts(parent)


# ---------------------------------------------------------------------------------------------
# configuration errors


def _config(data: DataConfig, cache: Path, **changes: Any) -> PipelineConfig:
    stages = StageConfigs(
        global_=GlobalConfig(epochs=3, batch_size=32, lr=1e-2),
        local=LocalConfig(epochs=3, batch_size=4, block_size=8, lr=3e-3),
        finetune=FinetuneConfig(epochs=3, batch_size=8, lr=3e-3),
    )
    base = {
        "data": data,
        "method": "global+local_block",
        "label_fraction": 0.2,
        "model": TINY,
        "stages": stages,
        "cache_dir": str(cache),
    }
    return PipelineConfig(**{**base, **changes})


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"label_fraction": 0}, "label_fraction"),
        ({"label_fraction": 1.5}, "label_fraction"),
        ({"method": "simclr"}, "method"),
        ({"seed": -1}, "seed"),
        ({"split_index": 1}, "split_index"),
        ({"stages": StageConfigs(local=LocalConfig(block_size=12))}, "local.block_size"),
        ({"model": ModelConfig(depth=6)}, "model.depth"),
    ],
)
def test_bad_configuration_names_the_key(changes: dict[str, Any], key: str, tmp_path: Path) -> None:
    data = DataConfig(kind="synthetic", root=str(tmp_path / "synthetic"), image_size=32)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        _config(data, tmp_path, **changes)
    assert not (tmp_path / "synthetic").exists()  # rejected before touching any data


def test_split_index_within_repeats_is_accepted(tmp_path: Path) -> None:
    data = DataConfig(kind="synthetic", root=str(tmp_path / "synthetic"), image_size=32)
    cfg = _config(data, tmp_path, split=SplitConfig(repeats=4), split_index=3)
    assert cfg.split_index == 3


# ---------------------------------------------------------------------------------------------
# whole pipelines


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pipeline-cache")


@pytest.fixture(scope="module")
def seed0_runs(
    synthetic_data_config: DataConfig, cache: Path
) -> list[tuple[dict[str, Any], list[tuple[str, dict]]]]:
    """global+local_block with seed 0, run twice, each with its report calls.

    The global stage gets intensity-only views: with the full SimCLR views a 4-channel U-Net
    needs far more than three epochs before its NT-Xent loss leaves log(2B - 1).
    """
    mild = functools.partial(
        global_views, p_flip=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0), max_translate=0.0
    )
    runs = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(stages, "global_views", mild)
        for _ in range(2):
            calls: list[tuple[str, dict]] = []
            cfg = _config(synthetic_data_config, cache)
            out = run_pipeline(
                cfg, report=lambda s, m, calls=calls: calls.append((s, m)), device="cpu"
            )
            runs.append((out, calls))
    return runs


def _strip(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    def same(v: Any) -> Any:  # NaN (an undefined metric) compares equal to itself here
        return "nan" if isinstance(v, float) and math.isnan(v) else v

    return [{k: same(v) for k, v in r.items() if k not in TIMING_KEYS} for r in records]


def test_same_seed_gives_identical_results(seed0_runs: list) -> None:
    (first, _), (second, _) = seed0_runs
    assert _strip([first["metrics"]]) == _strip([second["metrics"]])
    assert _strip(first["epochs"]) == _strip(second["epochs"])
    for key, value in first["state"].items():
        assert torch.equal(value, second["state"][key]), key


def test_different_seed_gives_different_results(
    seed0_runs: list, synthetic_data_config: DataConfig, cache: Path
) -> None:
    (first, _), _ = seed0_runs
    other = run_pipeline(
        _config(synthetic_data_config, cache, seed=1, method="global"), device="cpu"
    )
    assert other["split"] == first["split"]  # the split depends on split_index, not on the seed
    first_global = [r["loss"] for r in first["epochs"] if r["stage"] == "global"]
    other_global = [r["loss"] for r in other["epochs"] if r["stage"] == "global"]
    assert first_global != other_global


def test_pipeline_reports_every_epoch_in_stage_order_and_learns(seed0_runs: list) -> None:
    out, calls = seed0_runs[0]
    assert [(s, m["epoch"]) for s, m in calls] == [
        (stage, epoch) for stage in ("global", "local", "finetune") for epoch in (1, 2, 3)
    ]
    assert [{"stage": s, **m} for s, m in calls] == out["epochs"]
    assert list(out["stages"]) == ["global", "local", "finetune"]
    assert out["metrics"] == out["stages"]["finetune"]
    assert set(out["labelled"]) <= set(out["split"].train)
    for stage in ("global", "local", "finetune"):
        losses = [r["loss"] for r in out["epochs"] if r["stage"] == stage]
        assert losses[-1] < 0.97 * losses[0], (stage, losses)
    for key in (
        "test_dice_pooled_mean",
        "test_dice_volume_mean",
        "val_dice_volume_mean",
        "test_dice_pooled_c1",
    ):
        assert 0 <= out["metrics"][key] <= 1
