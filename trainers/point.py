"""One trial point: the resolved settings of one grid point, validated once, and the one helper
that turns a stage of it into a ``StageContext``.

``TrialPoint`` is what one trial runs: data, model, every stage kind's settings, the method,
its label fraction, a seed and a split. Construction checks every rule that involves more than
one config (the configs check themselves, ``trainers.config``), and raises ``ConfigError``
whose key is the spec's (``label_fraction: ...``, ``stages.local.block_size: ...``); the spec
(``orchestrator.spec``) adds its file name and the grid point, the in-process pipeline
(``trainers.pipeline``) raises it as it is. ``NAMED_CHECKS`` validate the named values alone,
so the spec can name the offending grid axis before whole points are checked.

``stage_context`` builds the ``StageContext`` of one stage from the slices, the split settings,
the seed and the label fraction: the Ray worker (``orchestrator.worker.run_stage``) and the
in-process pipeline (``trainers.pipeline.run_pipeline``) both go through it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainers.config import (
    ConfigError,
    DataConfig,
    LocalConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
    bind_dataset,
)
from trainers.methods import METHODS, resolve_stages
from trainers.registry import STAGE_KINDS

if TYPE_CHECKING:  # stage_context imports them when called: the spec needs no torch
    import torch

    from trainers.data import SliceData
    from trainers.loop import ReportFn, StageContext


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_method(value: Any) -> None:
    if not isinstance(value, str) or value not in METHODS:
        raise ConfigError(f"method: unknown method {value!r} (known: {', '.join(METHODS)})")


def check_label_fraction(value: Any) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not (ok and 0 < value <= 1):
        raise ConfigError(f"label_fraction: must be a number in (0, 1], got {value!r}")


def check_seed(value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"seed: must be an integer >= 0, got {value!r}")


def check_split_index(value: Any) -> None:
    if not _is_int(value) or value < 0:
        raise ConfigError(f"split_index: must be an integer >= 0, got {value!r}")


# the named values of a trial point, each checkable alone
NAMED_CHECKS: dict[str, Callable[[Any], None]] = {
    "method": check_method,
    "label_fraction": check_label_fraction,
    "seed": check_seed,
    "split_index": check_split_index,
}


def spec_key(message: str) -> str:
    """A stage config's message in spec terms: ``local.x: ...`` -> ``stages.local.x: ...``."""
    section = message.partition(".")[0]
    return f"stages.{message}" if section in STAGE_KINDS else message


@dataclass(frozen=True)
class TrialPoint:
    """Every setting of one grid point; validated at construction (see the module docstring).

    ``stage_configs``: the method's stages in order -> config after the method's overrides,
    bound to the dataset (``bind_dataset``): exactly what each stage runs.
    """

    data: DataConfig
    method: str
    label_fraction: float
    model: ModelConfig = field(default_factory=ModelConfig)
    stages: StageConfigs = field(default_factory=StageConfigs)
    split: SplitConfig = field(default_factory=SplitConfig)
    seed: int = 0
    split_index: int = 0

    def __post_init__(self) -> None:
        for name, check in NAMED_CHECKS.items():
            check(getattr(self, name))
        object.__setattr__(self, "label_fraction", float(self.label_fraction))
        if self.split_index >= self.split.repeats:
            raise ConfigError(
                f"split_index: {self.split_index} must be < split.repeats ({self.split.repeats})"
            )
        try:
            resolved = resolve_stages(self.method, self.stages)
        except ConfigError as err:  # a method's pinned setting clashes with a user's value
            raise ConfigError(f"method: {self.method}: {spec_key(str(err))}") from None
        for cfg in resolved.values():
            if isinstance(cfg, LocalConfig):
                try:
                    cfg.check_image_size(self.data.image_size)
                except ConfigError as err:
                    raise ConfigError(spec_key(str(err))) from None
        size, depth = self.data.image_size, self.model.depth
        if size % (2**depth):
            raise ConfigError(
                f"dataset.image_size: {size} is not divisible by 2**model.depth ({2**depth}); "
                f"the U-Net pools {depth} times"
            )

    @property
    def stage_configs(self) -> dict[str, Any]:
        return {
            stage: bind_dataset(cfg, self.data)
            for stage, cfg in resolve_stages(self.method, self.stages).items()
        }


def stage_context(
    data: SliceData,
    split: SplitConfig,
    split_index: int,
    seed: int,
    label_fraction: float | None,
    device: torch.device | str,
    *,
    report: ReportFn | None = None,
    init_state: Mapping[str, torch.Tensor] | None = None,
    init_parts: tuple[str, ...] = (),
    resume: Mapping[str, Any] | None = None,
    checkpoint_every: int = 1,
) -> StageContext:
    """The ``StageContext`` of one stage: split ``split_index`` of ``data`` and, when the stage
    reads labels (``label_fraction`` not None), its labelled subset. ``init_parts`` apply only
    when there is an ``init_state`` to load them from."""
    import torch

    from trainers.data import labelled_subset, make_split
    from trainers.loop import StageContext

    drawn = make_split(data.num_volumes, split, split_index)
    labelled = labelled_subset(drawn, label_fraction) if label_fraction is not None else ()
    return StageContext(
        data=data,
        split=drawn,
        labelled=labelled,
        seed=seed,
        device=torch.device(device),
        report=report,
        init_state=init_state,
        init_parts=tuple(init_parts) if init_state is not None else (),
        resume=resume,
        checkpoint_every=checkpoint_every,
    )
