"""Typed, frozen configuration for every stage of the method (METHOD.md).

Each config validates itself at construction and raises ``ConfigError`` (a ``ValueError``)
whose message names the offending field, e.g. ``local.temperature: must be > 0, got -1``.
The orchestrator builds these from the YAML spec (prefixing the spec file and key); stage code
only ever receives these frozen objects.

``from_dict`` builds a config from a plain mapping and rejects unknown keys; ``to_dict`` gives
the canonical mapping used for content-addressed keys.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An impossible or malformed configuration value; the message names the key."""


def _fail(section: str, key: str, message: str) -> None:
    raise ConfigError(f"{section}.{key}: {message}")


def _positive(section: str, key: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        _fail(section, key, f"must be a finite number > 0, got {value!r}")


def _positive_int(section: str, key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(section, key, f"must be an integer >= 1, got {value!r}")


def _non_negative(section: str, key: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        _fail(section, key, f"must be a finite number >= 0, got {value!r}")


def _one_of(section: str, key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        _fail(section, key, f"must be one of {list(choices)}, got {value!r}")


def _unit_interval(section: str, key: str, value: float, *, closed_low: bool = False) -> None:
    ok = isinstance(value, int | float) and (0 <= value <= 1 if closed_low else 0 < value <= 1)
    if not ok:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        _fail(section, key, f"must be in {interval}, got {value!r}")


def from_dict(cls: type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        _fail(section, unknown[0], f"unknown key (known: {', '.join(sorted(known))})")
    for name, value in data.items():
        default = getattr(cls, name, None) if known[name].default is not dataclasses.MISSING else None
        # ints are accepted where floats are expected; everything else must match the default's type
        if default is not None and value is not None:
            expected = type(default)
            if expected is float and isinstance(value, int) and not isinstance(value, bool):
                data[name] = float(value)
            elif expected is bool and not isinstance(value, bool):
                _fail(section, name, f"must be true or false, got {value!r}")
            elif expected in (int, float, str) and (
                not isinstance(data[name], expected) or isinstance(data[name], bool)
            ):
                _fail(section, name, f"must be of type {expected.__name__}, got {value!r}")
        if isinstance(value, list):
            data[name] = tuple(value)
    return cls(**data)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Canonical plain-dict form (tuples become lists) used for hashing and JSON."""
    out = dataclasses.asdict(cfg)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in out.items()}


@dataclass(frozen=True)
class DataConfig:
    """Where the slices come from and how they are preprocessed.

    kind="msd": an MSD-layout folder at ``root``. kind="synthetic": a synthetic MSD-layout
    folder generated (once, deterministically from ``synthetic_seed``) at ``root``.
    ``label_remap``: pairs (raw value, class) applied to label maps before checking, e.g. MMWHS's
    500,600,420,550,205,820,850 -> 1..7; unmapped non-zero values are an error.
    """

    kind: str = "synthetic"
    root: str = ""
    image_size: int = 64
    axis: int = -1
    label_remap: tuple[tuple[int, int], ...] = ()
    synthetic_cases: int = 24
    synthetic_seed: int = 0

    def __post_init__(self) -> None:
        _one_of("dataset", "kind", self.kind, ("msd", "synthetic"))
        _positive_int("dataset", "image_size", self.image_size)
        if self.image_size < 8:
            _fail("dataset", "image_size", f"must be >= 8, got {self.image_size}")
        _one_of("dataset", "axis", self.axis, (-3, -2, -1, 0, 1, 2))
        _positive_int("dataset", "synthetic_cases", self.synthetic_cases)
        object.__setattr__(
            self, "label_remap", tuple(tuple(int(v) for v in pair) for pair in self.label_remap)
        )
        for pair in self.label_remap:
            if len(pair) != 2:
                _fail("dataset", "label_remap", f"entries must be [raw, class] pairs, got {pair!r}")


@dataclass(frozen=True)
class SplitConfig:
    """Volume-level split fractions; ``repeats`` seeded random splits (the paper uses 4)."""

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2
    repeats: int = 1

    def __post_init__(self) -> None:
        for key in ("train", "val", "test"):
            _unit_interval("split", key, getattr(self, key), closed_low=key == "val")
        if abs(self.train + self.val + self.test - 1.0) > 1e-6:
            _fail("split", "train", f"train + val + test must be 1, got {self.train + self.val + self.test:g}")
        _positive_int("split", "repeats", self.repeats)


@dataclass(frozen=True)
class ModelConfig:
    """2D U-Net: ``base_channels`` doubling at each of ``depth`` poolings (reference: 64, 4).

    ``global_grid``: the global head average-pools the centre features to a
    ``global_grid`` x ``global_grid`` grid and flattens it (1 = the reference's global average
    pool). After InstanceNorm a global average is nearly the same vector for every image (cosine
    similarity 0.997 between random images at initialisation, against 0.60 for the flattened 4x4
    centre), which stalls NT-Xent; Chaitanya et al.'s global head likewise flattens the encoder
    output rather than averaging it.
    """

    base_channels: int = 64
    depth: int = 4
    norm: str = "instance"
    embed_dim: int = 128
    global_hidden: int = 512
    local_hidden: int = 128
    global_grid: int = 4

    def __post_init__(self) -> None:
        _positive_int("model", "base_channels", self.base_channels)
        _positive_int("model", "depth", self.depth)
        if self.depth > 6:
            _fail("model", "depth", f"must be <= 6, got {self.depth}")
        _one_of("model", "norm", self.norm, ("instance", "batch", "group", "none"))
        _positive_int("model", "embed_dim", self.embed_dim)
        _positive_int("model", "global_hidden", self.global_hidden)
        _positive_int("model", "local_hidden", self.local_hidden)
        _positive_int("model", "global_grid", self.global_grid)


@dataclass(frozen=True)
class GlobalConfig:
    """Global contrastive pretraining of encoder + global head on all training volumes.

    loss="ntxent": SimCLR NT-Xent. loss="partition": Chaitanya et al.'s G^D with ``n_parts``.
    """

    loss: str = "ntxent"
    temperature: float = 0.5
    n_parts: int = 4
    epochs: int = 100
    batch_size: int = 120
    lr: float = 3e-4
    weight_decay: float = 1e-5

    def __post_init__(self) -> None:
        _one_of("global", "loss", self.loss, ("ntxent", "partition"))
        _positive("global", "temperature", self.temperature)
        _positive_int("global", "n_parts", self.n_parts)
        _positive_int("global", "epochs", self.epochs)
        _positive_int("global", "batch_size", self.batch_size)
        if self.batch_size < 2:
            _fail("global", "batch_size", "must be >= 2 (negatives come from the batch)")
        _positive("global", "lr", self.lr)
        _non_negative("global", "weight_decay", self.weight_decay)


@dataclass(frozen=True)
class LocalConfig:
    """Local contrastive pretraining of encoder + decoder + local head.

    loss="supervised" (this paper; labelled subset) with strategy full | stride | block and
    form out | in; loss="self" (Chaitanya et al.; all training volumes, unlabelled) matches
    ``self_regions`` x ``self_regions`` pooled regions at the same location of two views.
    """

    loss: str = "supervised"
    strategy: str = "block"
    stride: int = 4
    block_size: int = 16
    temperature: float = 0.1
    form: str = "out"
    self_regions: int = 8
    epochs: int = 60
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 1e-4

    def __post_init__(self) -> None:
        _one_of("local", "loss", self.loss, ("supervised", "self"))
        _one_of("local", "strategy", self.strategy, ("full", "stride", "block"))
        _positive_int("local", "stride", self.stride)
        _positive_int("local", "block_size", self.block_size)
        _positive("local", "temperature", self.temperature)
        _one_of("local", "form", self.form, ("out", "in"))
        _positive_int("local", "self_regions", self.self_regions)
        _positive_int("local", "epochs", self.epochs)
        _positive_int("local", "batch_size", self.batch_size)
        _positive("local", "lr", self.lr)
        _non_negative("local", "weight_decay", self.weight_decay)

    def check_image_size(self, image_size: int) -> None:
        """Raise if stride / block size / regions cannot tile ``image_size``."""
        if self.loss == "supervised" and self.strategy == "stride" and self.stride > image_size:
            _fail("local", "stride", f"{self.stride} exceeds image_size {image_size}")
        if self.loss == "supervised" and self.strategy == "block" and image_size % self.block_size:
            _fail("local", "block_size", f"{self.block_size} does not divide image_size {image_size}")
        if self.loss == "self" and image_size % self.self_regions:
            _fail("local", "self_regions", f"{self.self_regions} does not divide image_size {image_size}")


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning (CE + soft Dice, background excluded) on the labelled subset.

    regulariser="mixup": images and losses mixed with lambda ~ Beta(mixup_alpha, mixup_alpha).
    regulariser="mean_teacher": EMA teacher (``ema_decay``), MSE consistency on unlabelled
    training slices weighted by ``consistency_weight`` ramped up over ``consistency_rampup``
    epochs (sigmoid ramp, Laine & Aila).
    ``val_every``: validation Dice every this many epochs (and at the last); on small labelled
    subsets a pass over all validation volumes can cost more than the epoch's training.
    """

    epochs: int = 120
    batch_size: int = 8
    lr: float = 5e-4
    weight_decay: float = 0.0
    augment: bool = True
    regulariser: str = "none"
    mixup_alpha: float = 1.0
    ema_decay: float = 0.99
    consistency_weight: float = 1.0
    consistency_rampup: int = 30
    unlabelled_batch_size: int = 8
    dice_weight: float = 1.0
    val_every: int = 1

    def __post_init__(self) -> None:
        _positive_int("finetune", "epochs", self.epochs)
        _positive_int("finetune", "batch_size", self.batch_size)
        _positive("finetune", "lr", self.lr)
        _non_negative("finetune", "weight_decay", self.weight_decay)
        _one_of("finetune", "regulariser", self.regulariser, ("none", "mixup", "mean_teacher"))
        _positive("finetune", "mixup_alpha", self.mixup_alpha)
        if not (0 < self.ema_decay < 1):
            _fail("finetune", "ema_decay", f"must be in (0, 1), got {self.ema_decay!r}")
        _non_negative("finetune", "consistency_weight", self.consistency_weight)
        if isinstance(self.consistency_rampup, bool) or self.consistency_rampup < 0:
            _fail("finetune", "consistency_rampup", f"must be >= 0, got {self.consistency_rampup!r}")
        _positive_int("finetune", "unlabelled_batch_size", self.unlabelled_batch_size)
        _non_negative("finetune", "dice_weight", self.dice_weight)
        _positive_int("finetune", "val_every", self.val_every)


@dataclass(frozen=True)
class StageConfigs:
    """The three trainable stages' settings as one value (a method picks which run)."""

    global_: GlobalConfig = field(default_factory=GlobalConfig)
    local: LocalConfig = field(default_factory=LocalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
