"""The methods compared (METHOD.md, "Stages and baselines") as data: a stage sequence plus the
settings that define the method.

A ``Method`` names the stages it runs, in order, and the per-stage settings that make it that
method (e.g. ``local_block`` pins ``local.loss = "supervised"`` and ``local.strategy = "block"``).
Every other setting comes from the user's ``StageConfigs``. A method pins every axis that its
name promises, so a method name always means the same algorithm: ``random`` pins
``finetune.regulariser = "none"`` even if the user's finetune settings say otherwise.

Weights flow from each stage to the next (``init_parts``): the encoder from global pretraining,
encoder and decoder from local pretraining. Projection heads are never passed to fine-tuning.

Adding a method is one entry in ``METHODS``; adding a stage kind is one function in
``trainers.stages.STAGES`` plus its rows in ``init_parts``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from trainers.config import FinetuneConfig, GlobalConfig, LocalConfig, StageConfigs

StageConfig = GlobalConfig | LocalConfig | FinetuneConfig

STAGE_NAMES: tuple[str, ...] = ("global", "local", "finetune")

# StageConfigs field holding each stage's settings ("global" is a Python keyword).
_STAGE_FIELDS: dict[str, str] = {"global": "global_", "local": "local", "finetune": "finetune"}

# Which parts of a parent stage's model a child stage starts from; absent pairs are not allowed.
_INIT_PARTS: dict[tuple[str, str], tuple[str, ...]] = {
    ("local", "global"): ("encoder",),
    ("finetune", "global"): ("encoder",),
    ("finetune", "local"): ("encoder", "decoder"),
}


def _frozen(overrides: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({stage: MappingProxyType(dict(v)) for stage, v in overrides.items()})


@dataclass(frozen=True)
class Method:
    """One method: ``stages`` run in order, each with ``overrides`` applied to its config.

    ``overrides`` maps a stage name to {config field: value}; a stage absent from it keeps the
    user's settings. Construction checks stage names, order and override fields.
    """

    name: str
    stages: tuple[str, ...]
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""

    def __post_init__(self) -> None:
        if not self.stages or self.stages[-1] != "finetune":
            raise ValueError(
                f"method {self.name!r}: stages must end with 'finetune', got {self.stages}"
            )
        unknown = [s for s in self.stages if s not in STAGE_NAMES]
        if unknown:
            raise ValueError(
                f"method {self.name!r}: unknown stages {unknown} (known: {list(STAGE_NAMES)})"
            )
        order = [STAGE_NAMES.index(s) for s in self.stages]
        if order != sorted(set(order)):
            raise ValueError(
                f"method {self.name!r}: stages must be distinct and in the order {STAGE_NAMES}"
            )
        defaults = StageConfigs()
        for stage, values in self.overrides.items():
            if stage not in self.stages:
                raise ValueError(
                    f"method {self.name!r}: overrides stage {stage!r} that it does not run"
                )
            known = {f.name for f in dataclasses.fields(getattr(defaults, _STAGE_FIELDS[stage]))}
            bad = sorted(set(values) - known)
            if bad:
                raise ValueError(f"method {self.name!r}: {stage}.{bad[0]} is not a {stage} setting")
        object.__setattr__(self, "stages", tuple(self.stages))
        object.__setattr__(self, "overrides", _frozen(self.overrides))


_NO_REGULARISER = {"finetune": {"regulariser": "none"}}
_SIMCLR = {"loss": "ntxent"}


def _local_supervised(strategy: str) -> dict[str, Any]:
    return {"loss": "supervised", "strategy": strategy}


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("random", ("finetune",), _NO_REGULARISER, "fine-tuning from random initialisation"),
        Method(
            "global",
            ("global", "finetune"),
            {"global": _SIMCLR, **_NO_REGULARISER},
            "SimCLR NT-Xent pretraining of the encoder, then fine-tuning",
        ),
        Method(
            "global+local_self",
            ("global", "local", "finetune"),
            {"global": {"loss": "partition"}, "local": {"loss": "self"}, **_NO_REGULARISER},
            "Chaitanya et al. 2020: partition-based global, self-supervised local, fine-tuning",
        ),
        Method(
            "local_stride",
            ("local", "finetune"),
            {"local": _local_supervised("stride"), **_NO_REGULARISER},
            "supervised local contrastive on every stride-th pixel, then fine-tuning",
        ),
        Method(
            "local_block",
            ("local", "finetune"),
            {"local": _local_supervised("block"), **_NO_REGULARISER},
            "supervised local contrastive within blocks, then fine-tuning",
        ),
        Method(
            "local_full",
            ("local", "finetune"),
            {"local": _local_supervised("full"), **_NO_REGULARISER},
            "supervised local contrastive exactly at full resolution (beyond the paper)",
        ),
        Method(
            "global+local_stride",
            ("global", "local", "finetune"),
            {"global": _SIMCLR, "local": _local_supervised("stride"), **_NO_REGULARISER},
            "SimCLR global, supervised local on every stride-th pixel, fine-tuning",
        ),
        Method(
            "global+local_block",
            ("global", "local", "finetune"),
            {"global": _SIMCLR, "local": _local_supervised("block"), **_NO_REGULARISER},
            "SimCLR global, supervised local within blocks, fine-tuning (the paper's best)",
        ),
        Method(
            "global+local_full",
            ("global", "local", "finetune"),
            {"global": _SIMCLR, "local": _local_supervised("full"), **_NO_REGULARISER},
            "SimCLR global, supervised local exactly at full resolution (beyond the paper)",
        ),
        Method(
            "mixup",
            ("finetune",),
            {"finetune": {"regulariser": "mixup"}},
            "fine-tuning from random initialisation with Mixup of images and losses",
        ),
        Method(
            "mean_teacher",
            ("finetune",),
            {"finetune": {"regulariser": "mean_teacher"}},
            "fine-tuning from random initialisation with a Mean Teacher on unlabelled slices",
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def resolve_stages(method: str, stages: StageConfigs) -> dict[str, StageConfig]:
    """The method's stages, in order, each config with the method's overrides applied.

    Returns {stage name: config} holding only the stages ``method`` runs. Overrides go through
    ``dataclasses.replace``, so the result is validated like any config.
    """
    spec = get_method(method)
    resolved: dict[str, StageConfig] = {}
    for stage in spec.stages:
        cfg = getattr(stages, _STAGE_FIELDS[stage])
        resolved[stage] = dataclasses.replace(cfg, **dict(spec.overrides.get(stage, {})))
    return resolved


def stage_uses_labels(stage: str, cfg: StageConfig) -> bool:
    """Whether the stage reads label maps (and so depends on the labelled subset).

    global: no. local: only the supervised loss (the self-supervised one reads all training
    slices, unlabelled). finetune: always (Mean Teacher additionally reads unlabelled slices).
    """
    if stage == "global":
        return False
    if stage == "local":
        if not isinstance(cfg, LocalConfig):
            raise ValueError(f"stage 'local' needs a LocalConfig, got {type(cfg).__name__}")
        return cfg.loss == "supervised"
    if stage == "finetune":
        return True
    raise ValueError(f"unknown stage {stage!r} (known: {list(STAGE_NAMES)})")


def init_parts(stage: str, parent_stage: str | None) -> tuple[str, ...]:
    """Model parts that ``stage`` loads from ``parent_stage``'s final state (() without parent).

    local <- global: ("encoder",); finetune <- global: ("encoder",); finetune <- local:
    ("encoder", "decoder"). Projection heads are never transferred.
    """
    if stage not in STAGE_NAMES:
        raise ValueError(f"unknown stage {stage!r} (known: {list(STAGE_NAMES)})")
    if parent_stage is None:
        return ()
    if (stage, parent_stage) not in _INIT_PARTS:
        raise ValueError(f"stage {stage!r} cannot start from a {parent_stage!r} stage")
    return _INIT_PARTS[(stage, parent_stage)]
