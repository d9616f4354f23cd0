"""What a spec may hold: its top-level keys, the config class of each section, the named axes
and their defaults, and the sections that are this package's own (``resources``, ``ray``,
``tracking``). The JSON Schema (``orchestrator.schema``) is generated from these too."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainers.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    SplitConfig,
    check_choices,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    choice,
    from_dict,
)
from trainers.registry import STAGE_KINDS

TOP_LEVEL_KEYS = (
    "name",
    "dataset",
    "split",
    "model",
    "method",
    "label_fraction",
    "seed",
    "split_index",
    "stages",
    "grid",
    "linked",
    "resources",
    "storage",
    "ray",
    "tracking",
)

# spec sections of the data and model configs; every stage kind adds ``stages.<name>``
_DATA_SECTIONS: dict[str, type] = {
    "dataset": DataConfig,
    "split": SplitConfig,
    "model": ModelConfig,
}


def config_sections() -> dict[str, type]:
    """Spec section -> config class: dataset, split, model and ``stages.<kind>``."""
    stages = {f"stages.{name}": kind.config for name, kind in STAGE_KINDS.items()}
    return {**_DATA_SECTIONS, **stages}


# A sweep's name (it names its default storage folder, results/<name>).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]*"

# The named values' defaults when the spec leaves them out (split_index: every split, 0 ..
# split.repeats - 1).
NAMED_DEFAULTS: dict[str, Any] = {"method": "global+local_block", "label_fraction": 0.1, "seed": 0}

# Named axes: the axis name used in trials/tables -> the top-level spec key holding its values.
NAMED_AXES = {
    "method": "method",
    "label_fraction": "label_fraction",
    "seed": "seed",
    "split": "split_index",
}


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the cluster and how failures are retried.

    ``max_concurrent_trials`` = None lets the executor derive it from the cluster's resources
    and ``workers_per_trial * (cpus|gpus)_per_worker``. ``max_failures`` applies to both Tune
    (a crashed trial driver) and Train (a dead worker group, resumed from its checkpoint).
    ``nodes_per_run`` > 1: up to that many ready nodes of one stage kind (e.g. the siblings of
    a parent) run one after another in one Tune trial's Train run, paying its start-up once
    (``orchestrator.execute``); 1 (the default): one Train run per node. Never in node keys.
    ``fuse_finetunes`` (needs ``nodes_per_run`` > 1 and ``workers_per_trial`` 1): a bundle's
    fine-tunings of one config and model train as one horizontally fused model
    (``trainers.fused``; those that cannot, e.g. Mean Teacher, run one after another as
    before), each still written to the store as its own node. Never in node keys.
    """

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int | None = None
    checkpoint_every: int = 1
    max_failures: int = 1
    nodes_per_run: int = 1
    fuse_finetunes: bool = False

    def __post_init__(self) -> None:
        check_positive_int("resources", "workers_per_trial", self.workers_per_trial)
        check_positive("resources", "cpus_per_worker", self.cpus_per_worker)
        check_non_negative("resources", "gpus_per_worker", self.gpus_per_worker)
        if self.max_concurrent_trials is not None:
            check_positive_int("resources", "max_concurrent_trials", self.max_concurrent_trials)
        check_positive_int("resources", "checkpoint_every", self.checkpoint_every)
        check_non_negative_int("resources", "max_failures", self.max_failures)
        check_positive_int("resources", "nodes_per_run", self.nodes_per_run)
        if not isinstance(self.fuse_finetunes, bool):
            raise ConfigError(
                f"resources.fuse_finetunes: must be true or false, got {self.fuse_finetunes!r}"
            )
        if self.fuse_finetunes and (self.nodes_per_run < 2 or self.workers_per_trial != 1):
            raise ConfigError(
                "resources.fuse_finetunes: fuses the fine-tunings of one bundle in one process, "
                "so it needs nodes_per_run >= 2 and workers_per_trial 1; got nodes_per_run "
                f"{self.nodes_per_run}, workers_per_trial {self.workers_per_trial}"
            )
        gpus = self.gpus_per_worker
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(
                f"resources.gpus_per_worker: above 1 it must be a whole number, got {gpus!r}"
            )
        if 0 < gpus < 1 and self.workers_per_trial > 1:
            raise ConfigError(
                "resources.gpus_per_worker: a fractional GPU needs workers_per_trial: 1 "
                "(several DDP ranks at < 1 GPU can land on one GPU and NCCL then fails); "
                f"got {gpus!r} with workers_per_trial {self.workers_per_trial}"
            )


@dataclass(frozen=True)
class RayConfig:
    """``address``: None starts Ray locally; ``"auto"`` or ``"ray://host:port"`` joins a cluster."""

    address: str | None = None

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(
                f"ray.address: must be a non-empty string or null, got {self.address!r}"
            )


WANDB_MODES = (None, "online", "offline", "disabled")


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases through Ray Tune's ``WandbLoggerCallback``: one W&B run per stage node.

    ``project`` and ``group`` default to the sweep's name, ``entity`` to the W&B account's
    default; ``mode`` null leaves it to W&B (``WANDB_MODE``, else online), ``offline`` writes the
    runs beside each node's Tune trial for a later ``wandb sync``."""

    project: str | None = None
    entity: str | None = None
    group: str | None = None
    mode: str | None = choice(None, WANDB_MODES)

    def __post_init__(self) -> None:
        for name in ("project", "entity", "group"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ConfigError(
                    f"tracking.wandb.{name}: must be a non-empty string or null, got {value!r}"
                )
        check_choices("tracking.wandb", self)


@dataclass(frozen=True)
class TrackingConfig:
    """Optional experiment trackers fed by the executor (MLflow URI, TensorBoard event files,
    Weights & Biases)."""

    mlflow_uri: str | None = None
    tensorboard: bool = False
    wandb: WandbConfig | None = None

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None and (
            not isinstance(self.mlflow_uri, str) or not self.mlflow_uri
        ):
            raise ConfigError(
                f"tracking.mlflow_uri: must be a non-empty string or null, got {self.mlflow_uri!r}"
            )
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(
                f"tracking.tensorboard: must be true or false, got {self.tensorboard!r}"
            )
        if isinstance(self.wandb, Mapping):  # as written in the spec (or sweep.json)
            object.__setattr__(self, "wandb", from_dict(WandbConfig, self.wandb, "tracking.wandb"))
        elif self.wandb is not None and not isinstance(self.wandb, WandbConfig):
            raise ConfigError(
                "tracking.wandb: must be a mapping (project, entity, group, mode; {} for the "
                f"defaults) or null, got {self.wandb!r}"
            )
