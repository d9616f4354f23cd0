"""One method's whole pipeline, in-process: the API for users without Ray, notebooks and tests.

``run_pipeline`` prepares the slices (``prepare_slices``, cached under ``cache_dir``), draws
split ``split_index`` and its labelled subset, then runs the method's stages in order
(``trainers.methods``), each starting from its parent's parts (``init_parts``), and returns::

    {
        "metrics": {...},      # the finetune stage's final metrics: val_* / test_* Dice, loss, train_seconds
        "stages": {stage: {...}},                # every stage's final metrics, in order
        "epochs": [{"stage": ..., "epoch": ..., "loss": ..., ...}],   # every epoch of every stage
        "state": {...},        # the final model's state_dict (CPU)
        "split": Split, "labelled": (volume indices, ...),
    }

The orchestrator runs the same stage functions one Ray Train job per stage instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainers.config import (
    ConfigError,
    DataConfig,
    LocalConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
    bind_dataset,
)
from trainers.data import labelled_subset, make_split, prepare_slices
from trainers.methods import METHODS, init_parts, resolve_stages
from trainers.stages import STAGES, StageContext

PipelineReport = Callable[[str, dict[str, float]], None]


def default_cache_dir() -> str:
    """``$SEMICON_CACHE`` if set, else ``~/.cache/semicon-sweep``."""
    return os.environ.get("SEMICON_CACHE") or str(Path.home() / ".cache" / "semicon-sweep")


def _fail(key: str, message: str) -> None:
    raise ConfigError(f"pipeline.{key}: {message}")


@dataclass(frozen=True)
class PipelineConfig:
    """One trial: data, model and stage settings, the method and its label fraction, a seed and
    a split. Validated at construction (``ConfigError``, a ``ValueError``, naming the key)."""

    data: DataConfig
    method: str
    label_fraction: float
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: StageConfigs = field(default_factory=StageConfigs)
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0
    split_index: int = 0
    cache_dir: str = field(default_factory=default_cache_dir)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            _fail("method", f"unknown method {self.method!r} (known: {', '.join(METHODS)})")
        fraction = self.label_fraction
        if (
            isinstance(fraction, bool)
            or not isinstance(fraction, int | float)
            or not 0 < fraction <= 1
        ):
            _fail("label_fraction", f"must be in (0, 1], got {fraction!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            _fail("seed", f"must be an integer >= 0, got {self.seed!r}")
        index = self.split_index
        if (
            isinstance(index, bool)
            or not isinstance(index, int)
            or not 0 <= index < self.split.repeats
        ):
            _fail(
                "split_index",
                f"must be an integer in [0, split.repeats = {self.split.repeats}), got {index!r}",
            )
        for cfg in resolve_stages(self.method, self.stages).values():
            if isinstance(cfg, LocalConfig):
                cfg.check_image_size(self.data.image_size)
        if self.data.image_size % 2**self.model.depth:
            _fail(
                "model.depth",
                f"2**{self.model.depth} must divide dataset.image_size {self.data.image_size}",
            )


def run_pipeline(
    cfg: PipelineConfig,
    report: PipelineReport | None = None,
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """Run ``cfg.method`` end to end; see the module docstring for the returned mapping.

    ``report(stage, metrics)`` is called after every epoch of every stage. ``device`` defaults
    to CUDA when available, else CPU. Stages checkpoint only at their last epoch here (nothing
    in-process resumes).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    data = prepare_slices(cfg.data, cfg.cache_dir)
    split = make_split(data.num_volumes, cfg.split, cfg.split_index)
    labelled = labelled_subset(split, cfg.label_fraction)

    epochs: list[dict[str, Any]] = []
    stage_metrics: dict[str, dict[str, float]] = {}
    parent: str | None = None
    state = None
    for stage, method_cfg in resolve_stages(cfg.method, cfg.stages).items():
        stage_cfg = bind_dataset(method_cfg, cfg.data)

        def stage_report(metrics: dict[str, float], _checkpoint: Any, stage: str = stage) -> None:
            epochs.append({"stage": stage, **metrics})
            if report is not None:
                report(stage, metrics)

        ctx = StageContext(
            data=data,
            split=split,
            labelled=labelled,
            seed=cfg.seed,
            device=device,
            report=stage_report,
            init_state=state,
            init_parts=init_parts(stage, parent),
            checkpoint_every=2**31,  # i.e. only at the last epoch
        )
        result = STAGES[stage](stage_cfg, cfg.model, ctx)
        stage_metrics[stage] = result.metrics
        parent, state = stage, result.state
    return {
        "metrics": stage_metrics["finetune"],
        "stages": stage_metrics,
        "epochs": epochs,
        "state": state,
        "split": split,
        "labelled": labelled,
    }
