"""One method's whole pipeline, in-process: the API for users without Ray, notebooks and tests.

``run_pipeline`` prepares the slices (``prepare_slices``, cached under ``cache_dir``), then runs
the method's stages in order (``TrialPoint.stage_configs``), each starting from its parent's
parts (``StageKind.init_parts``) in a context built by ``trainers.point.stage_context``, and
returns::

    {
        "metrics": {...},      # the final stage's metrics: val_* / test_* Dice, loss, train_seconds
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

from trainers.data import labelled_subset, make_split, prepare_slices
from trainers.point import TrialPoint, stage_context
from trainers.registry import get_stage

PipelineReport = Callable[[str, dict[str, float]], None]


def default_cache_dir() -> str:
    """``$SEMICON_CACHE`` if set, else ``~/.cache/semicon-sweep``."""
    return os.environ.get("SEMICON_CACHE") or str(Path.home() / ".cache" / "semicon-sweep")


@dataclass(frozen=True)
class PipelineConfig(TrialPoint):
    """One trial point (``trainers.point.TrialPoint``, validated at construction: a
    ``ConfigError`` naming the key) plus where to cache the preprocessed slices."""

    cache_dir: str = field(default_factory=default_cache_dir)


def run_pipeline(
    cfg: TrialPoint,
    report: PipelineReport | None = None,
    device: torch.device | str | None = None,
    cache_dir: str | None = None,
) -> dict[str, Any]:
    """Run ``cfg.method`` end to end; see the module docstring for the returned mapping.

    ``report(stage, metrics)`` is called after every epoch of every stage. ``device`` defaults
    to CUDA when available, else CPU. ``cache_dir`` defaults to ``cfg.cache_dir`` (a
    ``PipelineConfig``) or ``default_cache_dir()``. Stages checkpoint only at their last epoch
    here (nothing in-process resumes).
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    cache = cache_dir or getattr(cfg, "cache_dir", None) or default_cache_dir()
    data = prepare_slices(cfg.data, cache)

    epochs: list[dict[str, Any]] = []
    stage_metrics: dict[str, dict[str, float]] = {}
    parent: str | None = None
    state = None
    for stage, stage_cfg in cfg.stage_configs.items():
        kind = get_stage(stage)

        def stage_report(metrics: dict[str, float], _checkpoint: Any, stage: str = stage) -> None:
            epochs.append({"stage": stage, **metrics})
            if report is not None:
                report(stage, metrics)

        ctx = stage_context(
            data,
            cfg.split,
            cfg.split_index,
            cfg.seed,
            cfg.label_fraction if kind.uses_labels(stage_cfg) else None,
            device,
            report=stage_report,
            init_state=state,
            init_parts=kind.init_parts(parent),
            checkpoint_every=2**31,  # i.e. only at the last epoch
        )
        result = kind.run(stage_cfg, cfg.model, ctx)
        stage_metrics[stage] = result.metrics
        parent, state = stage, result.state
    split = make_split(data.num_volumes, cfg.split, cfg.split_index)
    return {
        "metrics": stage_metrics[parent],
        "stages": stage_metrics,
        "epochs": epochs,
        "state": state,
        "split": split,
        "labelled": labelled_subset(split, cfg.label_fraction),
    }
