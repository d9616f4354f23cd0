"""Data layer: MSD-layout volumes -> checked, normalised, resized 2D slices; volume-level splits.

Pipeline (``prepare_slices``):

1. ``load_msd`` lists the cases (``dataset.json``'s ``training`` list, else ``imagesTr`` paired
   with ``labelsTr`` by file name), reads every image and label with nibabel and checks them; any
   bad input raises ``DatasetError`` naming the file.
2. Each volume is normalised on its own (``normalise_intensity``): clip to its 0.5 / 99.5
   percentiles, then min-max scale to [0, 1]. Hippocampus intensities span five orders of
   magnitude across cases, and a few hot voxels would otherwise squash a plain min-max.
3. Volumes are cut into 2D slices along ``DataConfig.axis`` and every slice is resized to
   ``image_size x image_size``: images bilinearly (antialiased when shrinking), labels by
   nearest neighbour (``nearest-exact``), so no label value is ever invented.
4. The slices are cached as ``.npy`` files in ``cache_dir/<fingerprint>/`` (built in a temporary
   folder, renamed into place, ``meta.json`` last); later calls with the same fingerprint
   memory-map them without touching nibabel. ``load_slice_cache`` opens such a folder directly.

Shapes: S slices, H = W = image_size. ``SliceData.images`` float32 (S, H, W) in [0, 1],
``labels`` uint8 (S, H, W), ``volume`` int32 (S,), ``position`` float32 (S,) =
slice index / slices in its volume, in [0, 1) (Chaitanya et al.'s partitions).

Splits are by volume (``make_split``); the labelled volumes are a nested, seeded subset of the
training volumes (``labelled_subset``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import struct
import tempfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers.config import ConfigError, DataConfig, DatasetError, SplitConfig
from trainers.synthetic import DEFAULT_SHAPE, SYNTHETIC_VERSION, write_synthetic_msd

# Bumped whenever preprocessing changes what ends up in the slice cache.
PREPROCESS_VERSION = 1
CLIP_PERCENTILES = (0.5, 99.5)

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
_CACHE_FORMAT = 1
_CACHE_ARRAYS = {
    "images": np.float32,
    "labels": np.uint8,
    "volume": np.int32,
    "position": np.float32,
}
# What reading a corrupt or foreign file can raise inside gzip and zlib (nibabel's own errors
# join them in ``_read_volume``: nibabel and torch are imported where they are used, so that
# planning a sweep, which needs only ``data_fingerprint``, imports neither).
_READ_ERRORS = (OSError, EOFError, zlib.error, struct.error, ValueError)
# Independent random streams of one split index (see ``_split_rng``).
_SPLIT_STREAM = 1
_LABELLED_STREAM = 2


@dataclass(frozen=True, eq=False)
class Volume:
    """One checked case: ``image`` float32 (X, Y, Z) as stored, ``label`` uint8 (X, Y, Z) of classes."""

    case: str
    image: np.ndarray
    label: np.ndarray
    image_path: str
    label_path: str


@dataclass(frozen=True)
class _Case:
    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class _Layout:
    """The files of an MSD folder, before any of them is read."""

    root: Path
    cases: tuple[_Case, ...]
    dataset_json: Path | None
    declared_labels: frozenset[int] | None  # dataset.json "labels" keys, when given


# ---------------------------------------------------------------------------------------------
# listing and reading an MSD folder


def _case_name(path: Path) -> str:
    for suffix in _NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def _nifti_files(folder: Path) -> dict[str, Path]:
    """Case name -> file for the NIfTI files of ``folder`` (hidden files such as ``._x`` skipped)."""
    if not folder.is_dir():
        return {}
    return {
        _case_name(p): p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(_NIFTI_SUFFIXES)
    }


def _read_dataset_json(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DatasetError(f"{path}: not a readable JSON file ({err})") from err
    if not isinstance(meta, dict):
        raise DatasetError(f"{path}: must hold a JSON object, got {type(meta).__name__}")
    return meta


def _declared_labels(path: Path, meta: dict[str, Any]) -> frozenset[int] | None:
    """The class ids of ``meta["labels"]``: must be the integers 0 .. K-1 with K >= 2."""
    if "labels" not in meta:
        return None
    labels = meta["labels"]
    if not isinstance(labels, dict):
        raise DatasetError(f"{path}: 'labels' must map class ids to names, got {labels!r}")
    try:
        ids = frozenset(int(key) for key in labels)
    except ValueError as err:
        raise DatasetError(f"{path}: 'labels' keys must be integers, got {sorted(labels)}") from err
    if ids != frozenset(range(len(ids))) or len(ids) < 2 or len(ids) > 256:
        raise DatasetError(
            f"{path}: 'labels' must be the class ids 0..K-1 (2 <= K <= 256), got {sorted(ids)}"
        )
    return ids


def _listed_cases(root: Path, path: Path, training: Any) -> list[_Case]:
    if not isinstance(training, list):
        raise DatasetError(f"{path}: 'training' must be a list, got {type(training).__name__}")
    cases = []
    for i, entry in enumerate(training):
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("image"), str)
            and isinstance(entry.get("label"), str)
        ):
            raise DatasetError(
                f"{path}: training[{i}] must be {{'image': path, 'label': path}}, got {entry!r}"
            )
        image, label = root / entry["image"], root / entry["label"]
        if not image.is_file():
            raise DatasetError(f"{image}: image file missing (listed in {path} training[{i}])")
        if not label.is_file():
            raise DatasetError(f"{label}: label file missing (listed in {path} training[{i}])")
        cases.append(_Case(_case_name(image), image, label))
    return cases


def _paired_cases(root: Path) -> list[_Case]:
    images = _nifti_files(root / "imagesTr")
    labels = _nifti_files(root / "labelsTr")
    for name, image in images.items():
        if name not in labels:
            raise DatasetError(
                f"{root / 'labelsTr' / image.name}: label file missing for image {image}"
            )
    for name, label in labels.items():
        if name not in images:
            raise DatasetError(
                f"{root / 'imagesTr' / label.name}: image file missing for label {label}"
            )
    return [_Case(name, images[name], labels[name]) for name in sorted(images)]


def _scan_layout(root: str | os.PathLike[str]) -> _Layout:
    """List the cases of an MSD folder and check that their files exist (reads no image)."""
    if str(root) == "":
        raise DatasetError("dataset.root: empty; it must name an MSD-layout folder")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    dataset_json = root / "dataset.json"
    declared = None
    if dataset_json.exists():
        meta = _read_dataset_json(dataset_json)
        declared = _declared_labels(dataset_json, meta)
        if "training" in meta:
            cases = _listed_cases(root, dataset_json, meta["training"])
        else:
            cases = _paired_cases(root)
    else:
        dataset_json = None
        cases = _paired_cases(root)
    if not cases:
        raise DatasetError(
            f"{root}: no cases found (expected dataset.json with a 'training' list, or "
            "imagesTr/*.nii.gz with matching labelsTr/*.nii.gz)"
        )
    names = [case.name for case in cases]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{dataset_json or root}: case listed more than once: {duplicates[0]}")
    return _Layout(root, tuple(cases), dataset_json, declared)


def _read_volume(path: Path, dtype: type[np.floating]) -> np.ndarray:
    """The 3D array stored in ``path`` (scaled by the header's slope/intercept), as ``dtype``.

    A 4D file whose trailing dimensions are 1 is squeezed to 3D; anything else not 3D is an error.
    """
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    try:
        data = nib.load(str(path)).get_fdata(dtype=dtype, caching="unchanged")
    except (ImageFileError, HeaderDataError, *_READ_ERRORS) as err:
        raise DatasetError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from err
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim != 3 or min(data.shape) < 1:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data


def _validate_remap(label_remap: tuple[tuple[int, int], ...]) -> dict[int, int]:
    remap: dict[int, int] = {}
    for pair in label_remap:
        if len(pair) != 2:
            raise ConfigError(
                f"dataset.label_remap: entries must be [raw, class] pairs, got {pair!r}"
            )
        raw, target = (int(v) for v in pair)
        if raw in remap:
            raise ConfigError(f"dataset.label_remap: raw value {raw} mapped twice")
        if not 0 <= target <= 255:
            raise ConfigError(f"dataset.label_remap: class {target} outside 0..255")
        remap[raw] = target
    return remap


def _check_label(
    path: Path,
    raw: np.ndarray,
    remap: dict[int, int],
    allowed: frozenset[int] | None,
    declared_in: Path | None,
) -> np.ndarray:
    """Integer-check, remap and range-check one label map; returns uint8 class ids."""
    values = np.unique(raw)
    bad = values[~np.isfinite(values) | (values != np.round(values)) | (values < 0)]
    if bad.size:
        raise DatasetError(
            f"{path}: label values must be non-negative integers, found {bad[:5].tolist()}"
        )
    values = values.astype(np.int64)
    if remap:
        unmapped = [int(v) for v in values if v != 0 and int(v) not in remap]
        if unmapped:
            raise DatasetError(
                f"{path}: raw label values {unmapped[:5]} not in dataset.label_remap {sorted(remap)}"
            )
        classes = np.array([remap.get(int(v), 0) for v in values], dtype=np.int64)
    else:
        classes = values
    if allowed is not None:
        undeclared = sorted({int(c) for c in classes} - allowed)
        if undeclared:
            where = f"{declared_in} 'labels'" if declared_in else "dataset.label_remap"
            raise DatasetError(
                f"{path}: label values {undeclared} not declared in {where} {sorted(allowed)}"
            )
    elif classes.max() > 255:
        raise DatasetError(
            f"{path}: label value {int(classes.max())} > 255 (declare a label_remap)"
        )
    lookup = np.searchsorted(values, raw.astype(np.int64))
    return classes[lookup].astype(np.uint8)


def _load_checked(
    layout: _Layout, label_remap: tuple[tuple[int, int], ...]
) -> tuple[list[Volume], int]:
    """Read and check every case; returns the volumes and the number of classes (incl. background)."""
    remap = _validate_remap(label_remap)
    allowed = layout.declared_labels
    if allowed is None and remap:
        allowed = frozenset({0, *remap.values()})
    volumes = []
    for case in layout.cases:
        image = _read_volume(case.image, np.float32)
        raw_label = _read_volume(case.label, np.float64)
        if image.shape != raw_label.shape:
            raise DatasetError(
                f"{case.image}: image shape {image.shape} does not match label {case.label} "
                f"shape {raw_label.shape}"
            )
        if not np.isfinite(image).all():
            raise DatasetError(f"{case.image}: image holds NaN or infinite values")
        label = _check_label(case.label, raw_label, remap, allowed, layout.dataset_json)
        volumes.append(Volume(case.name, image, label, str(case.image), str(case.label)))
    if allowed is not None:
        num_classes = max(allowed) + 1
    else:
        num_classes = max(2, max(int(v.label.max()) for v in volumes) + 1)
    return volumes, num_classes


def load_msd(
    root: str | os.PathLike[str], label_remap: tuple[tuple[int, int], ...] = ()
) -> list[Volume]:
    """Read and check every case of the MSD-layout folder ``root``.

    Cases come from ``dataset.json``'s ``training`` list when present (paths relative to
    ``root``), else from ``imagesTr/*.nii(.gz)`` paired with ``labelsTr`` by file name.
    ``label_remap``: (raw value, class) pairs applied to every label map; non-zero raw values it
    does not map are an error. Raises ``DatasetError`` naming the file for a missing folder or
    file, no cases, an unreadable or corrupt file, a volume that is not 3D, an image/label shape
    mismatch, non-integer label values, or label values not declared in ``dataset.json``.
    """
    volumes, _ = _load_checked(_scan_layout(root), tuple(label_remap))
    return volumes


# ---------------------------------------------------------------------------------------------
# fingerprint


def _synthetic_parameters(cfg: DataConfig) -> dict[str, Any]:
    return {
        "version": SYNTHETIC_VERSION,
        "num_cases": cfg.synthetic_cases,
        "seed": cfg.synthetic_seed,
        "shape": list(DEFAULT_SHAPE),
    }


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    except OSError as err:
        raise DatasetError(f"{path}: cannot read ({err})") from err
    return digest.hexdigest()


def data_fingerprint(cfg: DataConfig) -> str:
    """A 32-hex-digit digest of everything that determines ``prepare_slices``'s output.

    Covers ``PREPROCESS_VERSION``, ``kind``, ``image_size``, ``axis`` (as 0..2), ``label_remap``
    and either the synthetic generator's version and parameters (kind="synthetic": no file is
    read, so a dry run can call it) or the relative path and sha256 of every input file,
    ``dataset.json`` included (kind="msd"; the folder's location does not count).
    """
    identity: dict[str, Any] = {
        "preprocess_version": PREPROCESS_VERSION,
        "kind": cfg.kind,
        "image_size": cfg.image_size,
        "axis": cfg.axis % 3,
        "label_remap": sorted([list(pair) for pair in cfg.label_remap]),
    }
    if cfg.kind == "synthetic":
        identity["synthetic"] = _synthetic_parameters(cfg)
    else:
        layout = _scan_layout(cfg.root)
        files = [layout.dataset_json] if layout.dataset_json else []
        files += [path for case in layout.cases for path in (case.image, case.label)]
        identity["files"] = [
            [p.relative_to(layout.root).as_posix(), _file_digest(p)] for p in files
        ]
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


# ---------------------------------------------------------------------------------------------
# preprocessing


def normalise_intensity(volume: np.ndarray) -> np.ndarray:
    """Per-volume normalisation to [0, 1], float32, same shape.

    ``lo, hi`` = the 0.5 and 99.5 percentiles of the volume; ``x -> (clip(x, lo, hi) - lo) / (hi - lo)``.
    When ``hi == lo`` (e.g. a volume that is over 99.5 % background) the full min..max range is
    used instead; a constant volume maps to all zeros.
    """
    lo, hi = (float(v) for v in np.percentile(volume, CLIP_PERCENTILES))
    if not hi > lo:
        lo, hi = float(volume.min()), float(volume.max())
    if not hi > lo:
        return np.zeros(volume.shape, dtype=np.float32)
    scaled = (np.clip(volume, lo, hi) - lo) / (hi - lo)
    return np.clip(scaled, 0.0, 1.0).astype(np.float32)


def _resize_slices(
    images: np.ndarray, labels: np.ndarray, size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(n, h, w) images / labels -> (n, size, size): bilinear (antialiased) / nearest-exact."""
    import torch
    import torch.nn.functional as F

    image_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))[:, None]
    label_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[:, None]
    if image_t.shape[-2:] != (size, size):
        image_t = F.interpolate(
            image_t, size=(size, size), mode="bilinear", align_corners=False, antialias=True
        )
        label_t = F.interpolate(label_t, size=(size, size), mode="nearest-exact")
    resized_images = image_t[:, 0].clamp_(0.0, 1.0).numpy()
    resized_labels = label_t[:, 0].round().numpy().astype(np.uint8)
    return resized_images, resized_labels


def _slice_volumes(volumes: list[Volume], size: int, axis: int) -> dict[str, np.ndarray]:
    """All volumes' slices along ``axis``: the four cache arrays (see ``SliceData``)."""
    import torch

    parts: dict[str, list[np.ndarray]] = {name: [] for name in _CACHE_ARRAYS}
    with torch.no_grad():
        for index, volume in enumerate(volumes):
            images = np.moveaxis(normalise_intensity(volume.image), axis, 0)
            labels = np.moveaxis(volume.label, axis, 0)
            images, labels = _resize_slices(images, labels, size)
            count = images.shape[0]
            parts["images"].append(images)
            parts["labels"].append(labels)
            parts["volume"].append(np.full(count, index, dtype=np.int32))
            parts["position"].append((np.arange(count) / count).astype(np.float32))
    return {
        name: np.concatenate(chunks).astype(_CACHE_ARRAYS[name]) for name, chunks in parts.items()
    }


@dataclass(frozen=True, eq=False)
class SliceData:
    """Preprocessed 2D slices of every volume (often memory-mapped, read-only).

    images float32 (S, H, W) in [0, 1]; labels uint8 (S, H, W) class ids < num_classes;
    volume int32 (S,) index into ``cases``; position float32 (S,) = slice index / slices of its
    volume, in [0, 1); cases: the volumes' case names; fingerprint: ``data_fingerprint``.
    """

    images: np.ndarray
    labels: np.ndarray
    volume: np.ndarray
    position: np.ndarray
    cases: tuple[str, ...]
    num_classes: int
    fingerprint: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases))
        for name, dtype in _CACHE_ARRAYS.items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != dtype:
                raise ValueError(f"SliceData.{name}: must be a {np.dtype(dtype).name} array")
        count = self.images.shape[0]
        if self.images.ndim != 3 or self.labels.shape != self.images.shape:
            raise ValueError(
                f"SliceData.labels: shape {self.labels.shape} must equal images shape {self.images.shape} (S, H, W)"
            )
        for name in ("volume", "position"):
            if getattr(self, name).shape != (count,):
                raise ValueError(
                    f"SliceData.{name}: shape {getattr(self, name).shape}, expected ({count},)"
                )
        if (
            isinstance(self.num_classes, bool)
            or not isinstance(self.num_classes, int)
            or self.num_classes < 2
        ):
            raise ValueError(
                f"SliceData.num_classes: must be an integer >= 2, got {self.num_classes!r}"
            )
        if count and (self.volume.min() < 0 or self.volume.max() >= len(self.cases)):
            raise ValueError(f"SliceData.volume: indices must lie in [0, {len(self.cases)})")

    @property
    def num_volumes(self) -> int:
        return len(self.cases)

    def slices_of(self, volumes: Iterable[int]) -> np.ndarray:
        """Sorted int64 indices of every slice belonging to one of ``volumes``."""
        wanted = np.asarray(list(volumes), dtype=np.int64)
        outside = wanted[(wanted < 0) | (wanted >= self.num_volumes)]
        if outside.size:
            raise ValueError(f"volumes: index {int(outside[0])} outside [0, {self.num_volumes})")
        return np.flatnonzero(np.isin(self.volume, wanted)).astype(np.int64)


def load_slice_cache(path: str | os.PathLike[str]) -> SliceData:
    """Open a cache folder written by ``prepare_slices``: arrays memory-mapped read-only."""
    folder = Path(path)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        raise DatasetError(f"{meta_path}: missing; {folder} is not a complete slice cache")
    try:
        meta = json.loads(meta_path.read_text())
        cases, num_classes, fingerprint = meta["cases"], meta["num_classes"], meta["fingerprint"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DatasetError(f"{meta_path}: unreadable slice-cache metadata ({err!r})") from err
    if meta.get("format") != _CACHE_FORMAT:
        raise DatasetError(
            f"{meta_path}: cache format {meta.get('format')!r}, expected {_CACHE_FORMAT}"
        )
    arrays = {}
    for name in _CACHE_ARRAYS:
        file = folder / f"{name}.npy"
        try:
            arrays[name] = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise DatasetError(f"{file}: unreadable slice-cache array ({err})") from err
    try:
        return SliceData(
            **arrays, cases=tuple(cases), num_classes=num_classes, fingerprint=fingerprint
        )
    except ValueError as err:
        raise DatasetError(f"{folder}: inconsistent slice cache ({err})") from err


def _save_synced(path: Path, array: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.save(handle, array)
        handle.flush()
        os.fsync(handle.fileno())


def _write_cache(folder: Path, arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write the cache folder atomically: build it under a temporary name, then rename it.

    If another process completed the same folder meanwhile, its copy (identical by
    construction) is kept. A foreign incomplete folder is filled file by file with
    ``os.replace``, ``meta.json`` last.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, array in arrays.items():
            _save_synced(staging / f"{name}.npy", array)
        (staging / "meta.json").write_text(json.dumps(meta))
        try:
            os.rename(staging, folder)
        except OSError:
            if (folder / "meta.json").is_file():
                return
            folder.mkdir(exist_ok=True)
            for name in arrays:
                os.replace(staging / f"{name}.npy", folder / f"{name}.npy")
            os.replace(staging / "meta.json", folder / "meta.json")
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _data_root(cfg: DataConfig) -> Path:
    if not cfg.root:
        raise DatasetError(f"dataset.root: must name a folder for kind={cfg.kind!r}")
    return Path(cfg.root)


def prepare_slices(cfg: DataConfig, cache_dir: str | os.PathLike[str]) -> SliceData:
    """The preprocessed slices of ``cfg``'s dataset, from ``cache_dir/<fingerprint>/`` when cached.

    kind="synthetic" first writes the dataset at ``cfg.root`` unless it is already there.
    A cache miss reads and checks every case (``load_msd``), normalises each volume
    (``normalise_intensity``), slices along ``cfg.axis``, resizes to ``cfg.image_size`` and writes
    the cache; either way the returned arrays are memory-mapped from the cache folder.
    """
    root = _data_root(cfg)
    if cfg.kind == "synthetic":
        write_synthetic_msd(root, num_cases=cfg.synthetic_cases, seed=cfg.synthetic_seed)
    fingerprint = data_fingerprint(cfg)
    folder = Path(cache_dir) / fingerprint
    if not (folder / "meta.json").is_file():
        volumes, num_classes = _load_checked(_scan_layout(root), cfg.label_remap)
        arrays = _slice_volumes(volumes, cfg.image_size, cfg.axis)
        meta = {
            "format": _CACHE_FORMAT,
            "fingerprint": fingerprint,
            "preprocess_version": PREPROCESS_VERSION,
            "cases": [volume.case for volume in volumes],
            "num_classes": num_classes,
            "num_slices": int(arrays["images"].shape[0]),
            "image_size": cfg.image_size,
        }
        _write_cache(folder, arrays, meta)
    return load_slice_cache(folder)


# ---------------------------------------------------------------------------------------------
# splits


@dataclass(frozen=True)
class Split:
    """Volume indices of one random split; the three parts are disjoint and sorted."""

    index: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]

    def __post_init__(self) -> None:
        parts = (self.train, self.val, self.test)
        if len(set().union(*parts)) != sum(len(part) for part in parts):
            raise ValueError(f"split {self.index}: train, val and test must be disjoint")


def _split_rng(index: int, stream: int) -> np.random.Generator:
    """A generator determined by (split index, stream) only: identical in every process."""
    return np.random.default_rng(np.random.SeedSequence([stream, index]))


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_split(num_volumes: int, cfg: SplitConfig, index: int) -> Split:
    """Random volume-level split number ``index`` (deterministic in ``index`` alone).

    Counts: test = max(1, round(test * n)), val = max(1, round(val * n)) if val > 0 else 0,
    train = the rest; a ``ConfigError`` naming the split key is raised when train would be empty.
    """
    if isinstance(num_volumes, bool) or not isinstance(num_volumes, int) or num_volumes < 1:
        raise ValueError(f"num_volumes: must be an integer >= 1, got {num_volumes!r}")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"split_index: must be an integer >= 0, got {index!r}")
    n_test = max(1, _round_half_up(cfg.test * num_volumes))
    n_val = max(1, _round_half_up(cfg.val * num_volumes)) if cfg.val > 0 else 0
    n_train = num_volumes - n_val - n_test
    if n_train < 1:
        raise ConfigError(
            f"split.train: {num_volumes} volumes leave no training volume after "
            f"{n_val} validation and {n_test} test volumes"
        )
    order = _split_rng(index, _SPLIT_STREAM).permutation(num_volumes)
    return Split(
        index=index,
        train=tuple(sorted(int(v) for v in order[:n_train])),
        val=tuple(sorted(int(v) for v in order[n_train : n_train + n_val])),
        test=tuple(sorted(int(v) for v in order[n_train + n_val :])),
    )


def labelled_subset(split: Split, fraction: float) -> tuple[int, ...]:
    """The labelled training volumes for ``fraction`` of ``split.train`` (sorted).

    A permutation of ``split.train`` seeded by ``split.index`` is cut after
    ``max(1, round(fraction * len(train)))`` volumes, so a smaller fraction's subset is always
    inside a larger one's, and at least one volume is labelled.
    """
    ok = isinstance(fraction, int | float) and not isinstance(fraction, bool) and 0 < fraction <= 1
    if not ok:
        raise ConfigError(f"label_fraction: must be in (0, 1], got {fraction!r}")
    if not split.train:
        raise ValueError(f"split {split.index}: has no training volumes to label")
    count = max(1, _round_half_up(fraction * len(split.train)))
    order = _split_rng(split.index, _LABELLED_STREAM).permutation(len(split.train))
    return tuple(sorted(split.train[i] for i in order[:count]))
