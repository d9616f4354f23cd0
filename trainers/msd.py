"""Reading a dataset folder: an MSD-layout folder's cases, listed and checked, read into
``Volume`` s (``load_msd``). Every bad input raises ``DatasetError`` naming the file.

Cases come from ``dataset.json``'s ``training`` list when present (paths relative to the
folder), else from ``imagesTr/*.nii(.gz)`` paired with ``labelsTr`` by file name
(``scan_layout``, which reads no image: ``trainers.data.data_fingerprint`` hashes the files it
lists). ``load_checked`` reads every image and label with nibabel (imported where it is used,
so that planning a sweep imports neither nibabel nor torch) and checks shapes, finiteness and
label values against ``dataset.json``'s ``labels`` and the spec's ``label_remap``.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers.config import ConfigError, DatasetError

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What reading a corrupt or foreign file can raise inside gzip and zlib (nibabel's own errors
# join them in ``read_volume``: nibabel and torch are imported where they are used, so that
# planning a sweep, which needs only ``data_fingerprint``, imports neither).
_READ_ERRORS = (OSError, EOFError, zlib.error, struct.error, ValueError)


@dataclass(frozen=True, eq=False)
class Volume:
    """One checked case: ``image`` float32 (X, Y, Z) as stored, ``label`` uint8 (X, Y, Z) of classes."""

    case: str
    image: np.ndarray
    label: np.ndarray
    image_path: str
    label_path: str


@dataclass(frozen=True)
class Case:
    name: str
    image: Path
    label: Path


@dataclass(frozen=True)
class Layout:
    """The files of an MSD folder, before any of them is read."""

    root: Path
    cases: tuple[Case, ...]
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


def _listed_cases(root: Path, path: Path, training: Any) -> list[Case]:
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
        cases.append(Case(_case_name(image), image, label))
    return cases


def _paired_cases(root: Path) -> list[Case]:
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
    return [Case(name, images[name], labels[name]) for name in sorted(images)]


def scan_layout(root: str | os.PathLike[str]) -> Layout:
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
    return Layout(root, tuple(cases), dataset_json, declared)


def read_volume(path: Path, dtype: type[np.floating]) -> np.ndarray:
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


def load_checked(
    layout: Layout, label_remap: tuple[tuple[int, int], ...]
) -> tuple[list[Volume], int]:
    """Read and check every case; returns the volumes and the number of classes (incl. background)."""
    remap = _validate_remap(label_remap)
    allowed = layout.declared_labels
    if allowed is None and remap:
        allowed = frozenset({0, *remap.values()})
    volumes = []
    for case in layout.cases:
        image = read_volume(case.image, np.float32)
        raw_label = read_volume(case.label, np.float64)
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
    volumes, _ = load_checked(scan_layout(root), tuple(label_remap))
    return volumes
