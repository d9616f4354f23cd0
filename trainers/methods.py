"""The methods compared (METHOD.md, "Stages and baselines") as data: a stage sequence plus the
settings that define the method.

A ``Method`` names the stages it runs, in order, and the per-stage settings that make it that
method (e.g. ``local_block`` pins ``local.loss = "supervised"`` and ``local.strategy = "block"``).
Every other setting comes from the user's ``StageConfigs``. A method pins every axis that its
name promises, so a method name always means the same algorithm: ``random`` pins
``finetune.regulariser = "none"`` even if the user's finetune settings say otherwise.

Weights flow from each stage to the next (``StageKind.parents`` in ``trainers.registry``): the
encoder from global pretraining, encoder and decoder from local pretraining. Projection heads
are never passed to fine-tuning.

Adding a method is one entry in ``METHODS`` (with the name tables and figures show it by);
adding a stage kind is one declaration in ``trainers.registry`` plus its function (see that
module).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from trainers.config import StageConfigs
from trainers.registry import STAGE_KINDS, get_stage

StageConfig = Any  # an instance of some registered stage kind's config class


def _frozen(overrides: Mapping[str, Mapping[str, Any]]) -> Mapping[str, Mapping[str, Any]]:
    return MappingProxyType({stage: MappingProxyType(dict(v)) for stage, v in overrides.items()})


@dataclass(frozen=True)
class Method:
    """One method: ``stages`` run in order, each with ``overrides`` applied to its config.

    ``name`` is the registry name (specs, node keys, the tables' ``method`` column);
    ``display`` the name rendered tables and figures show (the paper's wording where it has
    one; the registry name when empty). ``overrides`` maps a stage name to {config field:
    value}; a stage absent from it keeps the user's settings. Construction checks stage names,
    order and override fields.
    """

    name: str
    stages: tuple[str, ...]
    overrides: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    description: str = ""
    display: str = ""  # the name rendered tables and figures show (``display_name``)

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        unknown = [s for s in stages if s not in STAGE_KINDS]
        if unknown:
            raise ValueError(
                f"method {self.name!r}: unknown stages {unknown} (known: {list(STAGE_KINDS)})"
            )
        if not stages or not get_stage(stages[-1]).final:
            finals = [name for name, kind in STAGE_KINDS.items() if kind.final]
            raise ValueError(
                f"method {self.name!r}: stages must end with {' or '.join(map(repr, finals))}, "
                f"got {stages}"
            )
        if len(set(stages)) != len(stages):
            raise ValueError(f"method {self.name!r}: stages must be distinct, got {stages}")
        for parent, child in zip(stages[:-1], stages[1:], strict=True):
            if parent not in get_stage(child).parents:
                raise ValueError(
                    f"method {self.name!r}: stage {child!r} cannot start from a {parent!r} "
                    f"stage (stages must run in an order that passes weights on)"
                )
        for stage, values in self.overrides.items():
            if stage not in stages:
                raise ValueError(
                    f"method {self.name!r}: overrides stage {stage!r} that it does not run"
                )
            known = {f.name for f in dataclasses.fields(get_stage(stage).config)}
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
        Method(
            "random",
            ("finetune",),
            _NO_REGULARISER,
            "fine-tuning from random initialisation",
            display="random init",
        ),
        Method(
            "global",
            ("global", "finetune"),
            {"global": _SIMCLR, **_NO_REGULARISER},
            "SimCLR NT-Xent pretraining of the encoder, then fine-tuning",
            display="global (SimCLR)",
        ),
        Method(
            "global+local_self",
            ("global", "local", "finetune"),
            {"global": {"loss": "partition"}, "local": {"loss": "self"}, **_NO_REGULARISER},
            "Chaitanya et al. 2020: partition-based global, self-supervised local, fine-tuning",
            display="global + local (self)",
        ),
        Method(
            "local_stride",
            ("local", "finetune"),
            {"local": _local_supervised("stride"), **_NO_REGULARISER},
            "supervised local contrastive on every stride-th pixel, then fine-tuning",
            display="local (stride)",
        ),
        Method(
            "local_block",
            ("local", "finetune"),
            {"local": _local_supervised("block"), **_NO_REGULARISER},
            "supervised local contrastive within blocks, then fine-tuning",
            display="local (block)",
        ),
        Method(
            "local_full",
            ("local", "finetune"),
            {"local": _local_supervised("full"), **_NO_REGULARISER},
            "supervised local contrastive exactly at full resolution (beyond the paper)",
            display="local (full)",
        ),
        Method(
            "global+local_stride",
            ("global", "local", "finetune"),
            {"global": _SIMCLR, "local": _local_supervised("stride"), **_NO_REGULARISER},
            "SimCLR global, supervised local on every stride-th pixel, fine-tuning",
            display="global + local (stride)",
        ),
        Method(
            "global+local_block",
            ("global", "local", "finetune"),
            {"global": _SIMCLR, "local": _local_supervised("block"), **_NO_REGULARISER},
            "SimCLR global, supervised local within blocks, fine-tuning (the paper's best)",
            display="global + local (block)",
        ),
        Method(
            "global+local_full",
            ("global", "local", "finetune"),
            {"global": _SIMCLR, "local": _local_supervised("full"), **_NO_REGULARISER},
            "SimCLR global, supervised local exactly at full resolution (beyond the paper)",
            display="global + local (full)",
        ),
        Method(
            "mixup",
            ("finetune",),
            {"finetune": {"regulariser": "mixup"}},
            "fine-tuning from random initialisation with Mixup of images and losses",
            display="Mixup",
        ),
        Method(
            "mean_teacher",
            ("finetune",),
            {"finetune": {"regulariser": "mean_teacher"}},
            "fine-tuning from random initialisation with a Mean Teacher on unlabelled slices",
            display="Mean Teacher",
        ),
    )
}


def get_method(name: str) -> Method:
    """The registered method ``name``; ``ValueError`` listing the known names otherwise."""
    if name not in METHODS:
        raise ValueError(f"method: unknown method {name!r} (known: {', '.join(METHODS)})")
    return METHODS[name]


def display_name(method: str) -> str:
    """The name rendered tables and figures show for ``method`` (``Method.display``); an
    unregistered name (e.g. from an old results table) is shown as it is."""
    registered = METHODS.get(method)
    return registered.display or method if registered is not None else method


def resolve_stages(method: str, stages: StageConfigs) -> dict[str, StageConfig]:
    """The method's stages, in order, each config with the method's overrides applied.

    Returns {stage name: config} holding only the stages ``method`` runs; a stage absent from
    ``stages`` starts from its config class's defaults. Overrides go through
    ``dataclasses.replace``, so the result is validated like any config.
    """
    spec = get_method(method)
    resolved: dict[str, StageConfig] = {}
    for stage in spec.stages:
        cfg = stages.get(stage) or get_stage(stage).config()
        resolved[stage] = dataclasses.replace(cfg, **dict(spec.overrides.get(stage, {})))
    return resolved
