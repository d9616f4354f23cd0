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
import difflib
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """An impossible or malformed configuration value; the message names the key."""


class DatasetError(ValueError):
    """Bad input data; the message starts with the offending file or folder (raised by
    ``trainers.data`` and ``trainers.synthetic``; ``trainers.data.DatasetError`` is this)."""


def _fail(section: str, key: str, message: str) -> None:
    raise ConfigError(f"{section}.{key}: {message}")


def unknown_key(key: str, known: Iterable[str], what: str = "key") -> str:
    """``unknown key; did you mean 'temperature'? (known: ...)``: the closest known name
    (``difflib``) when there is one, then all of them in the order given."""
    known = list(known)
    close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown {what}{hint} (known: {', '.join(known)})"


# YAML 1.2 numbers that PyYAML (YAML 1.1) reads as strings: 1e-4, 5E3, +2e-1 (1.1 wants 1.0e-4)
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def parse_number(value: Any) -> Any:
    """``value`` as a float when it is a string written as a number (``"1e-4"``: what PyYAML
    gives for ``lr: 1e-4``); anything else unchanged."""
    if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
        return float(value)
    return value


def check_positive(section: str, key: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        _fail(section, key, f"must be a finite number > 0, got {value!r}")


def check_positive_int(section: str, key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(section, key, f"must be an integer >= 1, got {value!r}")


def check_non_negative_int(section: str, key: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        _fail(section, key, f"must be an integer >= 0, got {value!r}")


def check_non_negative(section: str, key: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
        _fail(section, key, f"must be a finite number >= 0, got {value!r}")


def _one_of(section: str, key: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        _fail(section, key, f"must be one of {list(choices)}, got {value!r}")


def choice(default: Any, choices: tuple[Any, ...]) -> Any:
    """A config field whose value must be one of ``choices``: the one place they are written.
    ``check_choices`` validates them and the spec's JSON Schema (``orchestrator.schema``) lists
    them as the field's ``enum``."""
    if default not in choices:
        raise ValueError(f"default {default!r} is not one of {list(choices)}")
    return field(default=default, metadata={"choices": choices})


def field_choices(fld: dataclasses.Field[Any]) -> tuple[Any, ...] | None:
    """The choices a ``choice`` field allows; None for any other field."""
    return fld.metadata.get("choices")


def check_choices(section: str, cfg: Any) -> None:
    """Raise ``ConfigError`` naming ``section.key`` when a ``choice`` field holds another value."""
    for fld in fields(cfg):
        choices = field_choices(fld)
        if choices is not None:
            _one_of(section, fld.name, getattr(cfg, fld.name), choices)


def _unit_interval(section: str, key: str, value: float, *, closed_low: bool = False) -> None:
    ok = isinstance(value, int | float) and (0 <= value <= 1 if closed_low else 0 < value <= 1)
    if not ok:
        interval = "[0, 1]" if closed_low else "(0, 1]"
        _fail(section, key, f"must be in {interval}, got {value!r}")


def _axes(section: str, key: str, value: Any) -> tuple[int, ...]:
    """A sorted tuple of distinct in-plane axes (0 and/or 1)."""
    if isinstance(value, int | str | float) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v in (0, 1) for v in value
    ):
        _fail(section, key, f"must be a list of in-plane axes (0, 1), got {value!r}")
    return tuple(sorted(set(value)))


def _pair(section: str, key: str, value: Any, minimum: float) -> tuple[float, float]:
    """A (low, high) range with minimum <= low <= high < inf."""
    if isinstance(value, int | float | str) or len(value) != 2:
        _fail(section, key, f"must be a [low, high] pair, got {value!r}")
    low, high = value
    ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    if not (ok and math.isfinite(high) and minimum <= low <= high):
        _fail(section, key, f"must satisfy {minimum} <= low <= high < inf, got {list(value)!r}")
    return (float(low), float(high))


def _numbers(value: Any, count: int) -> bool:
    return (
        isinstance(value, list | tuple)
        and len(value) == count
        and all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        and all(math.isfinite(v) for v in value)
    )


def _positive_pair(section: str, key: str, value: Any) -> tuple[float, float]:
    """Two finite numbers > 0 (e.g. an in-plane voxel size in mm)."""
    if not _numbers(value, 2) or min(value) <= 0:
        shown = list(value) if isinstance(value, tuple) else value
        _fail(section, key, f"must be two numbers > 0 ([mm, mm]), got {shown!r}")
    return (float(value[0]), float(value[1]))


def _window(section: str, key: str, value: Any) -> tuple[float, float]:
    """An intensity window [lo, hi] of finite numbers with lo < hi."""
    if not _numbers(value, 2) or not value[0] < value[1]:
        shown = list(value) if isinstance(value, tuple) else value
        _fail(section, key, f"must be [lo, hi], two numbers with lo < hi, got {shown!r}")
    return (float(value[0]), float(value[1]))


def from_dict(cls: type[T], data: Mapping[str, Any] | None, section: str) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types raise ConfigError."""
    data = dict(data or {})
    known = {f.name: f for f in fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(known))
    if unknown:
        _fail(section, unknown[0], unknown_key(unknown[0], sorted(known)))
    # a budget is epochs or steps: naming only one of them switches the budget to it
    if data.get("steps") is not None and "epochs" not in data and "epochs" in known:
        data["epochs"] = None
    for name, value in data.items():
        default = (
            getattr(cls, name, None) if known[name].default is not dataclasses.MISSING else None
        )
        if isinstance(default, AugmentConfig):
            data[name] = AugmentConfig.parse(value, default, f"{section}.{name}")
            continue
        # ints (and numbers PyYAML left as text, 1e-4) are accepted where floats are expected;
        # everything else must match the default's type
        if default is not None and value is not None:
            expected = type(default)
            if expected is float and isinstance(value, str):
                data[name] = value = parse_number(value)
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
    return _plain(dataclasses.asdict(cfg))


# Settings added after sweeps had been stored, at the value that reproduces what ran before:
# left out of node keys and spec hashes (``hash_form``), so adding them reruns nothing stored.
LATE_DEFAULTS: dict[str, Any] = {
    "lr_schedule": "constant",
    # DataConfig
    "reorient": "none",
    "spacing": None,
    "ct_window": None,
    # FinetuneConfig's native test metrics: at their defaults they run and change no key
    "native_eval": True,
    "nsd_tolerance_mm": 1.0,
}


def hash_form(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a stage or data config's plain dict) without the ``LATE_DEFAULTS`` it holds."""
    return {
        name: value
        for name, value in config.items()
        if not (name in LATE_DEFAULTS and LATE_DEFAULTS[name] == value)
    }


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _stage_settings(
    section: str, cfg: Any, default_augment: AugmentConfig, default_epochs: int
) -> None:
    """What every stage config shares: ``augment`` as written (bool, mapping or config) on top
    of the stage's default, its budget (``_budget``) and its choices (``lr_schedule``, ...)."""
    object.__setattr__(
        cfg, "augment", AugmentConfig.parse(cfg.augment, default_augment, f"{section}.augment")
    )
    _budget(section, cfg, default_epochs)
    check_choices(section, cfg)


def _budget(section: str, cfg: Any, default_epochs: int) -> None:
    """A stage's budget is ``epochs`` (passes over its slices) or ``steps`` (optimiser updates),
    exactly one of them; neither given means ``default_epochs``."""
    if cfg.steps is not None and cfg.epochs is not None:
        _fail(
            section,
            "steps",
            f"give either epochs or steps, not both (epochs {cfg.epochs}, steps {cfg.steps})",
        )
    if cfg.steps is None:
        if cfg.epochs is None:
            object.__setattr__(cfg, "epochs", default_epochs)
        check_positive_int(section, "epochs", cfg.epochs)
    else:
        check_positive_int(section, "steps", cfg.steps)


@dataclass(frozen=True)
class AugmentConfig:
    """One stage's data augmentation (``augment:`` in a stage's spec section).

    Spatial (one transform per image, the same for its label map): a flip along each axis in
    ``flip_axes`` with probability ``p_flip`` (None = the dataset's ``flip_axes``: only axes where
    the anatomy is mirror-symmetric, see ``DataConfig``), rotation by U(-rotate_deg, rotate_deg)
    degrees, zoom s ~ U(scale), a shift of up to ``translate`` of the half-extent, an elastic
    deformation of N(0, elastic_alpha^2) pixels smoothed over ``elastic_sigma`` pixels.
    Intensity (images only): v = max(x + b, 0) ** g + e with b ~ U(-brightness, brightness),
    g ~ U(gamma), e ~ N(0, noise_std^2) per pixel.

    In a spec, ``augment: false`` turns everything off, ``true`` keeps the stage's defaults and a
    mapping changes only the keys it names. Stage defaults: global = the SimCLR views (flips,
    rotation 15, scale 0.85-1.15, translate 0.1, intensity); local = intensity only (its losses
    compare pixel-aligned views, so spatial settings are refused there); finetune = flips,
    rotation 15, scale 0.85-1.15, elastic 1.5 / 6.
    """

    flip_axes: tuple[int, ...] | None = None
    p_flip: float = 0.5
    rotate_deg: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)
    translate: float = 0.0
    elastic_alpha: float = 0.0
    elastic_sigma: float = 6.0
    brightness: float = 0.0
    gamma: tuple[float, float] = (1.0, 1.0)
    noise_std: float = 0.0

    def __post_init__(self) -> None:
        section = "augment"
        if self.flip_axes is not None:
            object.__setattr__(self, "flip_axes", _axes(section, "flip_axes", self.flip_axes))
        _unit_interval(section, "p_flip", self.p_flip, closed_low=True)
        check_non_negative(section, "rotate_deg", self.rotate_deg)
        if self.rotate_deg > 180:
            _fail(section, "rotate_deg", f"must be <= 180, got {self.rotate_deg!r}")
        object.__setattr__(self, "scale", _pair(section, "scale", self.scale, 1e-3))
        _unit_interval(section, "translate", self.translate, closed_low=True)
        check_non_negative(section, "elastic_alpha", self.elastic_alpha)
        check_positive(section, "elastic_sigma", self.elastic_sigma)
        check_non_negative(section, "brightness", self.brightness)
        object.__setattr__(self, "gamma", _pair(section, "gamma", self.gamma, 1e-6))
        check_non_negative(section, "noise_std", self.noise_std)

    @classmethod
    def parse(cls, value: Any, default: AugmentConfig, key: str) -> AugmentConfig:
        """``value`` as written in a spec (bool or mapping) on top of the stage's ``default``."""
        if isinstance(value, AugmentConfig):
            return value
        if value is False:
            return NO_AUGMENT
        if value is True or value is None:
            return default
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: must be true, false or a mapping, got {value!r}")
        try:
            return from_dict(cls, {**dataclasses.asdict(default), **value}, "augment")
        except ConfigError as err:
            raise ConfigError(f"{key}{str(err).removeprefix('augment')}") from None

    @property
    def spatial(self) -> bool:
        """Whether any setting moves pixels (flips, rotation, zoom, shift, elastic)."""
        flips = bool(self.flip_axes) and self.p_flip > 0
        return flips or bool(
            self.rotate_deg or self.scale != (1.0, 1.0) or self.translate or self.elastic_alpha
        )

    @property
    def intensity(self) -> bool:
        """Whether any intensity setting is on."""
        return bool(self.brightness or self.gamma != (1.0, 1.0) or self.noise_std)

    def with_flip_axes(self, axes: tuple[int, ...]) -> AugmentConfig:
        """This config with ``flip_axes`` bound to ``axes`` where it defers to the dataset."""
        return self if self.flip_axes is not None else dataclasses.replace(self, flip_axes=axes)


# The choices of the configs' ``choice`` fields (validated by ``check_choices``).
LR_SCHEDULES = ("constant", "poly", "cosine")  # a stage's lr over its budget (stages.lr_factor)
DATA_KINDS = ("msd", "synthetic")
REORIENTATIONS = ("none", "canonical")
SLICE_AXES = (-3, -2, -1, 0, 1, 2)
NORMS = ("instance", "batch", "group", "none")
DECODER_NORMS = ("same", "none")
GLOBAL_LOSSES = ("ntxent", "partition")
LOCAL_LOSSES = ("supervised", "self")
LOCAL_STRATEGIES = ("full", "stride", "block")
LOCAL_FORMS = ("out", "in")
REGULARISERS = ("none", "mixup", "mean_teacher")

NO_AUGMENT = AugmentConfig(flip_axes=(), p_flip=0.0)
GLOBAL_AUGMENT = AugmentConfig(
    rotate_deg=15.0,
    scale=(0.85, 1.15),
    translate=0.1,
    brightness=0.1,
    gamma=(0.7, 1.5),
    noise_std=0.05,
)
LOCAL_AUGMENT = AugmentConfig(
    flip_axes=(), p_flip=0.0, brightness=0.1, gamma=(0.7, 1.5), noise_std=0.05
)
FINETUNE_AUGMENT = AugmentConfig(
    rotate_deg=15.0, scale=(0.85, 1.15), elastic_alpha=1.5, elastic_sigma=6.0
)


@dataclass(frozen=True)
class DataConfig:
    """Where the slices come from and how they are preprocessed.

    kind="msd": an MSD-layout folder at ``root``. kind="synthetic": a synthetic MSD-layout
    folder generated (once, deterministically from ``synthetic_seed``) at ``root``.
    ``label_remap``: pairs (raw value, class) applied to label maps before checking, e.g. MMWHS's
    500,600,420,550,205,820,850 -> 1..7; unmapped non-zero values are an error.

    ``flip_axes``: the in-plane slice axes along which the anatomy is mirror-symmetric, i.e. where
    a random flip yields a plausible image *with the same label meaning* (0 = the first volume axis
    left after removing ``axis``, i.e. slice rows; 1 = the second, slice columns). Every stage's
    augmentation flips only along these axes unless its own ``augment.flip_axes`` says otherwise.
    A flip is a claim about anatomy, so the default for an MSD folder is no axis at all. For
    Hippocampus (orientation R-A-S, slices along S) only axis 0 (R) is safe: labels 1 and 2 are
    the anterior and posterior hippocampus and lie apart along A (axis 1; their centroids are
    ~36 % of the crop apart), so an A flip puts class 1 where class 2 lives. The synthetic data's
    tube runs along axis 1 with its head/tail classes likewise, so its default is ``(0,)`` too.

    ``reorient``: "none" (the default) reads every volume as stored; "canonical" turns images
    and labels alike to the closest RAS orientation (``nibabel.as_closest_canonical``) first, so
    that ``axis`` and ``flip_axes`` mean the same anatomical directions in every case.
    ``predict`` writes its label maps back in each input's own orientation.

    ``spacing``: None (the default) or the in-plane voxel size [mm along the first, mm along
    the second slice axis] to resample every slice to (from the NIfTI header's zooms) before it
    is padded to a square and resized to ``image_size``: the slice keeps its true physical
    aspect ratio. ``predict`` resamples its logits back to the input's own grid.

    ``ct_window``: [lo, hi] in the CT channels' units (Hounsfield units): every channel that
    ``dataset.json`` declares as CT is clipped to it and scaled to [0, 1]; other channels are
    normalised per volume (``trainers.data.normalise_intensity``). A dataset with a CT channel
    and no window is refused (see ``trainers.data.channel_norms``). None by default.

    The three were added after sweeps had been stored: at their defaults they are left out of
    spec hashes, node data and the data fingerprint (``LATE_DEFAULTS``).
    """

    kind: str = choice("synthetic", DATA_KINDS)
    root: str = ""
    image_size: int = 64
    axis: int = choice(-1, SLICE_AXES)
    label_remap: tuple[tuple[int, int], ...] = ()
    synthetic_cases: int = 24
    synthetic_seed: int = 0
    flip_axes: tuple[int, ...] | None = None
    reorient: str = choice("none", REORIENTATIONS)
    spacing: tuple[float, float] | None = None
    ct_window: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        check_choices("dataset", self)
        if self.spacing is not None:
            object.__setattr__(self, "spacing", _positive_pair("dataset", "spacing", self.spacing))
        if self.ct_window is not None:
            object.__setattr__(self, "ct_window", _window("dataset", "ct_window", self.ct_window))
        if self.flip_axes is None:
            object.__setattr__(self, "flip_axes", (0,) if self.kind == "synthetic" else ())
        object.__setattr__(self, "flip_axes", _axes("dataset", "flip_axes", self.flip_axes))
        check_positive_int("dataset", "image_size", self.image_size)
        if self.image_size < 8:
            _fail("dataset", "image_size", f"must be >= 8, got {self.image_size}")
        check_positive_int("dataset", "synthetic_cases", self.synthetic_cases)
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
            _fail(
                "split",
                "train",
                f"train + val + test must be 1, got {self.train + self.val + self.test:g}",
            )
        check_positive_int("split", "repeats", self.repeats)


@dataclass(frozen=True)
class ModelConfig:
    """2D U-Net: ``base_channels`` doubling at each of ``depth`` poolings (reference: 64, 4).

    ``global_grid``: the global head average-pools the centre features to a
    ``global_grid`` x ``global_grid`` grid and flattens it (1 = the reference's global average
    pool). After InstanceNorm a global average is nearly the same vector for every image (cosine
    similarity 0.997 between random images at initialisation, against 0.60 for the flattened 4x4
    centre), which stalls NT-Xent; Chaitanya et al.'s global head likewise flattens the encoder
    output rather than averaging it.

    ``decoder_norm``: "same" uses ``norm`` in the decoder too (ours); "none" leaves the decoder's
    convolutions unnormalised (with biases), as the reference code's decoder does.
    """

    base_channels: int = 64
    depth: int = 4
    norm: str = choice("instance", NORMS)
    decoder_norm: str = choice("same", DECODER_NORMS)
    embed_dim: int = 128
    global_hidden: int = 512
    local_hidden: int = 128
    global_grid: int = 4

    def __post_init__(self) -> None:
        check_positive_int("model", "base_channels", self.base_channels)
        check_positive_int("model", "depth", self.depth)
        if self.depth > 6:
            _fail("model", "depth", f"must be <= 6, got {self.depth}")
        check_choices("model", self)
        check_positive_int("model", "embed_dim", self.embed_dim)
        check_positive_int("model", "global_hidden", self.global_hidden)
        check_positive_int("model", "local_hidden", self.local_hidden)
        check_positive_int("model", "global_grid", self.global_grid)


@dataclass(frozen=True)
class GlobalConfig:
    """Global contrastive pretraining of encoder + global head on all training volumes.

    loss="ntxent": SimCLR NT-Xent. loss="partition": Chaitanya et al.'s G^D with ``n_parts``.
    """

    loss: str = choice("ntxent", GLOBAL_LOSSES)
    temperature: float = 0.5
    n_parts: int = 4
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 120
    lr: float = 3e-4
    lr_schedule: str = choice("constant", LR_SCHEDULES)
    weight_decay: float = 1e-5
    augment: AugmentConfig = GLOBAL_AUGMENT

    def __post_init__(self) -> None:
        check_positive("global", "temperature", self.temperature)
        check_positive_int("global", "n_parts", self.n_parts)
        _stage_settings("global", self, GLOBAL_AUGMENT, 100)
        if self.augment.elastic_alpha:
            _fail(
                "global", "augment", "elastic_alpha: the global views have no elastic deformation"
            )
        check_positive_int("global", "batch_size", self.batch_size)
        if self.batch_size < 2:
            _fail("global", "batch_size", "must be >= 2 (negatives come from the batch)")
        check_positive("global", "lr", self.lr)
        check_non_negative("global", "weight_decay", self.weight_decay)


@dataclass(frozen=True)
class LocalConfig:
    """Local contrastive pretraining of encoder + decoder + local head.

    loss="supervised" (this paper; labelled subset) with strategy full | stride | block and
    form out | in; loss="self" (Chaitanya et al.; all training volumes, unlabelled) matches
    ``self_regions`` x ``self_regions`` pooled regions at the same location of two views.
    """

    loss: str = choice("supervised", LOCAL_LOSSES)
    strategy: str = choice("block", LOCAL_STRATEGIES)
    stride: int = 4
    block_size: int = 16
    temperature: float = 0.1
    form: str = choice("out", LOCAL_FORMS)
    self_regions: int = 8
    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 4
    lr: float = 1e-4
    lr_schedule: str = choice("constant", LR_SCHEDULES)
    weight_decay: float = 1e-4
    augment: AugmentConfig = LOCAL_AUGMENT

    def __post_init__(self) -> None:
        check_positive_int("local", "stride", self.stride)
        check_positive_int("local", "block_size", self.block_size)
        check_positive("local", "temperature", self.temperature)
        check_positive_int("local", "self_regions", self.self_regions)
        _stage_settings("local", self, LOCAL_AUGMENT, 60)
        if self.augment.spatial:
            _fail(
                "local",
                "augment",
                "the local losses compare pixel-aligned views: only brightness, gamma and "
                "noise_std apply (set flip_axes: [], rotate_deg: 0, scale: [1, 1], translate: 0, "
                "elastic_alpha: 0)",
            )
        check_positive_int("local", "batch_size", self.batch_size)
        check_positive("local", "lr", self.lr)
        check_non_negative("local", "weight_decay", self.weight_decay)

    def check_image_size(self, image_size: int) -> None:
        """Raise if stride / block size / regions cannot tile ``image_size``."""
        if self.loss == "supervised" and self.strategy == "stride" and self.stride > image_size:
            _fail("local", "stride", f"{self.stride} exceeds image_size {image_size}")
        if self.loss == "supervised" and self.strategy == "block" and image_size % self.block_size:
            _fail(
                "local", "block_size", f"{self.block_size} does not divide image_size {image_size}"
            )
        if self.loss == "self" and image_size % self.self_regions:
            _fail(
                "local",
                "self_regions",
                f"{self.self_regions} does not divide image_size {image_size}",
            )


@dataclass(frozen=True)
class FinetuneConfig:
    """Supervised fine-tuning (CE + soft Dice, background excluded) on the labelled subset.

    regulariser="mixup": images and losses mixed with lambda ~ Beta(mixup_alpha, mixup_alpha).
    regulariser="mean_teacher": EMA teacher (``ema_decay``), MSE consistency on unlabelled
    training slices weighted by ``consistency_weight`` ramped up over ``consistency_rampup``
    epochs (sigmoid ramp, Laine & Aila), or over ``consistency_rampup_steps`` optimiser steps
    when that is > 0 (the same ramp at every label fraction under a step budget).
    ``val_every``: validation Dice every this many epochs (and at the last); on small labelled
    subsets a pass over all validation volumes can cost more than the epoch's training.
    ``val_every_steps`` (> 0 replaces ``val_every``): validate at the end of every epoch in which
    the optimiser step count passed a multiple of it (and at the last), so that step budgets get
    validation curves of the same density at every label fraction.
    ``lr_schedule`` (every stage): "constant", or "poly" / "cosine" decay of ``lr`` towards 0 over
    the budget (``trainers.stages.lr_factor``), so that a step budget ends on a settled model.
    ``native_eval``: also score the final model on each test volume's own voxel grid (Dice,
    HD95 and surface Dice in mm: ``trainers.native``, ``test_native_*`` metrics);
    ``nsd_tolerance_mm``: the surface Dice's tolerance. Both change the node's outputs, so a
    value other than the default enters its key; at the defaults (true, 1.0 mm) they are left
    out of it (``LATE_DEFAULTS``), so nodes stored before they existed keep their keys.
    """

    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 8
    lr: float = 5e-4
    lr_schedule: str = choice("constant", LR_SCHEDULES)
    weight_decay: float = 0.0
    augment: AugmentConfig = FINETUNE_AUGMENT
    regulariser: str = choice("none", REGULARISERS)
    mixup_alpha: float = 1.0
    ema_decay: float = 0.99
    consistency_weight: float = 1.0
    consistency_rampup: int = 30
    consistency_rampup_steps: int = 0
    unlabelled_batch_size: int = 8
    dice_weight: float = 1.0
    val_every: int = 1
    val_every_steps: int = 0
    native_eval: bool = True
    nsd_tolerance_mm: float = 1.0

    def __post_init__(self) -> None:
        _stage_settings("finetune", self, FINETUNE_AUGMENT, 120)
        check_positive_int("finetune", "batch_size", self.batch_size)
        check_positive("finetune", "lr", self.lr)
        check_non_negative("finetune", "weight_decay", self.weight_decay)
        check_positive("finetune", "mixup_alpha", self.mixup_alpha)
        if not (0 < self.ema_decay < 1):
            _fail("finetune", "ema_decay", f"must be in (0, 1), got {self.ema_decay!r}")
        check_non_negative("finetune", "consistency_weight", self.consistency_weight)
        if isinstance(self.consistency_rampup, bool) or self.consistency_rampup < 0:
            _fail(
                "finetune", "consistency_rampup", f"must be >= 0, got {self.consistency_rampup!r}"
            )
        check_non_negative_int(
            "finetune", "consistency_rampup_steps", self.consistency_rampup_steps
        )
        check_positive_int("finetune", "unlabelled_batch_size", self.unlabelled_batch_size)
        check_non_negative("finetune", "dice_weight", self.dice_weight)
        check_positive_int("finetune", "val_every", self.val_every)
        check_non_negative_int("finetune", "val_every_steps", self.val_every_steps)
        if not isinstance(self.native_eval, bool):
            _fail("finetune", "native_eval", f"must be true or false, got {self.native_eval!r}")
        check_non_negative("finetune", "nsd_tolerance_mm", self.nsd_tolerance_mm)


class StageConfigs(Mapping[str, Any]):
    """The user's settings of each stage kind, by stage name; a kind not given runs on its
    config class's defaults (``trainers.registry``). Immutable and hashable.

    ``StageConfigs(global_=GlobalConfig(...), local=..., finetune=...)``: ``global_`` stands for
    the stage named "global" (a Python keyword); any other registered kind by its name, or a
    mapping ``StageConfigs({"global": ..., "denoise": ...})``.
    """

    __slots__ = ("_configs",)

    def __init__(self, configs: Mapping[str, Any] | None = None, /, **by_name: Any) -> None:
        merged = dict(configs or {})
        for name, cfg in by_name.items():
            merged["global" if name == "global_" else name] = cfg
        object.__setattr__(self, "_configs", {k: v for k, v in merged.items() if v is not None})

    def __getitem__(self, stage: str) -> Any:
        return self._configs[stage]

    def __iter__(self) -> Iterator[str]:
        return iter(self._configs)

    def __len__(self) -> int:
        return len(self._configs)

    def __getattr__(self, name: str) -> Any:
        # stages.local, stages.finetune, stages.global_ ("global" is a keyword)
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self._configs[name.removesuffix("_")]
        except KeyError:
            raise AttributeError(f"StageConfigs holds no {name!r} stage") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise dataclasses.FrozenInstanceError(f"cannot assign to field {name!r}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (StageConfigs, (self._configs,))

    def __hash__(self) -> int:
        return hash(tuple(sorted(self._configs.items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, StageConfigs) and self._configs == other._configs

    def __repr__(self) -> str:
        return f"StageConfigs({self._configs!r})"

    def replace(self, **by_name: Any) -> StageConfigs:
        """These settings with the stages named in ``by_name`` replaced."""
        return StageConfigs({**self._configs, **StageConfigs(**by_name)._configs})


def bind_dataset(cfg: T, data: DataConfig) -> T:
    """``cfg`` (a stage config) with an ``augment.flip_axes`` that defers to the dataset bound to
    ``data.flip_axes``: what a stage runs, and what its node key records, is always explicit."""
    augment = getattr(cfg, "augment", None)
    if not isinstance(augment, AugmentConfig) or augment.flip_axes is not None:
        return cfg
    return dataclasses.replace(cfg, augment=augment.with_flip_axes(data.flip_axes))
