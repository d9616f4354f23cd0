"""Reading a dataset folder: an MSD- or nnU-Net-v2-layout folder's cases, listed and checked,
read into ``Volume`` s (``load_msd``). Every bad input raises ``DatasetError`` naming the file.

``scan_layout`` reads no image (``trainers.data.data_fingerprint`` hashes the files it lists)
and tells the two layouts apart by ``dataset.json``:

- MSD: ``labels`` maps class ids to names ({"0": "background", "1": "hippocampus"}); cases
  come from the ``training`` list when present (paths relative to the folder), else from
  ``imagesTr/*.nii(.gz)`` paired with ``labelsTr`` by file name (also without dataset.json).
- nnU-Net v2: ``labels`` maps names to class ids ({"background": 0, "hippocampus": 1}) and/or
  ``channel_names`` is given; cases are ``imagesTr/<case>_0000<file_ending>`` with labels
  ``labelsTr/<case><file_ending>``, and ``numTraining`` must count them.

Input channels: ``dataset.json``'s ``channel_names`` (nnU-Net v2) or ``modality`` (MSD) declare
them, ``{"0": "T2", "1": "ADC"}`` (one channel when neither is given); their names are the
channels' modalities (``Layout.channels``; "CT" selects the CT window of ``trainers.data``). An
MSD image holds its channels as a 4D file (X, Y, Z, C); an nnU-Net v2 case has one 3D file per
channel, ``<case>_0000`` .. ``<case>_000{C-1}``. A file whose channel count differs from the
declared one, a missing or undeclared channel file, or channel files of different shapes are
refused with a line naming the file.

``iter_checked`` reads one case at a time with nibabel (imported where it is used, so that
planning a sweep imports neither nibabel nor torch) and checks shapes, finiteness and label
values against ``dataset.json``'s ``labels`` and the spec's ``label_remap``; ``load_checked``
keeps them all. With ``reorient="canonical"`` images and labels are turned alike to the closest
RAS orientation (``to_canonical``) as they are read.
"""

from __future__ import annotations

import json
import os
import re
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from trainers.config import REORIENTATIONS, ConfigError, DatasetError

_NIFTI_SUFFIXES = (".nii.gz", ".nii")
# What reading a corrupt or foreign file can raise inside gzip and zlib (nibabel's own errors
# join them in ``read_volume``: nibabel and torch are imported where they are used, so that
# planning a sweep, which needs only ``data_fingerprint``, imports neither).
_READ_ERRORS = (OSError, EOFError, zlib.error, struct.error, ValueError)


@dataclass(frozen=True, eq=False)
class Volume:
    """One checked case: ``image`` float32 (C, X, Y, Z) (C input channels), ``label`` uint8
    (X, Y, Z) of classes, both as stored or both reoriented (``iter_checked``); ``affine`` the
    voxel -> world matrix of that grid (``zooms`` gives its voxel sizes)."""

    case: str
    image: np.ndarray
    label: np.ndarray
    image_path: str
    label_path: str
    affine: np.ndarray = field(default_factory=lambda: np.eye(4))
    channels: tuple[str, ...] = ("",)  # each channel's declared modality (``Layout.channels``)

    @property
    def zooms(self) -> tuple[float, float, float]:
        return voxel_sizes(self.affine)


@dataclass(frozen=True)
class Case:
    """One case's files: ``image`` (channel 0's file, or the MSD 4D file), ``label``, and
    ``extra`` the files of channels 1.. (nnU-Net v2 only)."""

    name: str
    image: Path
    label: Path
    extra: tuple[Path, ...] = ()

    @property
    def images(self) -> tuple[Path, ...]:
        return (self.image, *self.extra)


@dataclass(frozen=True)
class Layout:
    """The files of a dataset folder, before any of them is read."""

    root: Path
    cases: tuple[Case, ...]
    dataset_json: Path | None
    declared_labels: frozenset[int] | None  # dataset.json "labels" class ids, when given
    kind: str = "msd"  # "msd" or "nnunet" (nnU-Net v2)
    class_names: dict[int, str] = field(default_factory=dict)  # from dataset.json "labels"
    channels: tuple[str, ...] = ("",)  # each input channel's modality ("" when not declared)

    @property
    def in_channels(self) -> int:
        return len(self.channels)


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


def _is_nnunet(meta: dict[str, Any]) -> bool:
    """nnU-Net v2's dataset.json: ``channel_names``, or ``labels`` mapping names to ids."""
    labels = meta.get("labels")
    name_to_id = isinstance(labels, dict) and any(
        not isinstance(value, str) for value in labels.values()
    )
    return "channel_names" in meta or name_to_id


def _declared_channels(path: Path, meta: dict[str, Any]) -> tuple[str, ...] | None:
    """The modalities of ``channel_names`` / ``modality`` ({"0": "T2", "1": "ADC"}), in
    channel order; None when neither is given. The keys must be 0 .. C-1."""
    found: dict[str, tuple[str, ...]] = {}
    for key in ("channel_names", "modality"):
        if key not in meta:
            continue
        channels = meta[key]
        example = '{"0": "MRI"}'
        if not isinstance(channels, dict) or not channels:
            raise DatasetError(
                f"{path}: {key}: must map channel numbers to names, e.g. {example}, "
                f"got {channels!r}"
            )
        try:
            numbers = sorted(int(k) for k in channels)
        except ValueError:
            numbers = []
        if numbers != list(range(len(channels))):
            raise DatasetError(
                f"{path}: {key}: keys must be the channel numbers 0..{len(channels) - 1}, "
                f"got {sorted(channels)}"
            )
        by_number = {int(k): str(v) for k, v in channels.items()}
        found[key] = tuple(by_number[i] for i in range(len(by_number)))
    if len(found) == 2 and len(found["channel_names"]) != len(found["modality"]):
        raise DatasetError(
            f"{path}: channel_names declares {len(found['channel_names'])} channels but "
            f"modality {len(found['modality'])}"
        )
    return found.get("channel_names") or found.get("modality")


def is_ct(modality: str) -> bool:
    """Whether a channel's declared name marks it as CT (as nnU-Net's "CT" does)."""
    return modality.strip().upper() == "CT"


def _channels_text(channels: tuple[str, ...]) -> str:
    count = len(channels)
    names = ", ".join(name or "?" for name in channels)
    return f"{count} channel{'s' * (count != 1)} ({names})"


def _class_ids(path: Path, labels: dict[str, Any]) -> dict[int, str]:
    """Class id -> name from MSD's {"0": "background"} or nnU-Net v2's {"background": 0}."""
    if all(isinstance(value, str) for value in labels.values()):  # MSD: id -> name
        try:
            return {int(key): value for key, value in labels.items()}
        except ValueError as err:
            raise DatasetError(
                f"{path}: 'labels' keys must be integers, got {sorted(labels)}"
            ) from err
    names: dict[int, str] = {}  # nnU-Net v2: name -> id
    for name, value in labels.items():
        if isinstance(value, list | tuple):
            raise DatasetError(
                f"{path}: labels: {name!r} is a region {list(value)}; region-based labels "
                "are not supported, give each class one integer id"
            )
        if isinstance(value, bool) or not isinstance(value, int):
            raise DatasetError(
                f"{path}: labels: {name!r} must map to an integer class id, got {value!r}"
            )
        if name == "ignore":
            raise DatasetError(
                f"{path}: labels: 'ignore' (nnU-Net's unannotated voxels) is not supported; "
                "remove it or map those voxels to a class"
            )
        if value in names:
            raise DatasetError(
                f"{path}: labels: {names[value]!r} and {name!r} share class id {value}"
            )
        names[value] = name
    return names


def _declared_labels(path: Path, meta: dict[str, Any]) -> dict[int, str] | None:
    """The classes of ``meta["labels"]`` (id -> name): the ids must be 0 .. K-1, 2 <= K <= 256."""
    if "labels" not in meta:
        return None
    labels = meta["labels"]
    if not isinstance(labels, dict):
        raise DatasetError(
            f"{path}: 'labels' must map class ids to names (MSD) or names to class ids "
            f"(nnU-Net v2), got {labels!r}"
        )
    names = _class_ids(path, labels)
    ids = frozenset(names)
    if ids != frozenset(range(len(ids))) or len(ids) < 2 or len(ids) > 256:
        raise DatasetError(
            f"{path}: 'labels' must be the class ids 0..K-1 (2 <= K <= 256), got {sorted(ids)}"
        )
    return names


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
            match = CHANNEL_FILE.match(name)
            hint = (
                "; nnU-Net v2 names like this need the dataset.json that declares the layout "
                "(channel_names, labels as name -> id)"
                if match is not None and match["case"] in labels
                else ""
            )
            raise DatasetError(
                f"{root / 'labelsTr' / image.name}: label file missing for image {image}{hint}"
            )
    for name, label in labels.items():
        if name not in images:
            raise DatasetError(
                f"{root / 'imagesTr' / label.name}: image file missing for label {label}"
            )
    return [Case(name, images[name], labels[name]) for name in sorted(images)]


def declared_class_names(root: str | os.PathLike[str]) -> dict[int, str] | None:
    """``root/dataset.json``'s ``labels`` as {class id: name}, in either layout's form; None
    when absent, unreadable or malformed (``scan_layout`` is where a bad one is reported)."""
    try:
        labels = json.loads((Path(root) / "dataset.json").read_text()).get("labels")
        return {int(key): str(name) for key, name in _class_ids(Path(root), labels).items()}
    except (OSError, ValueError, AttributeError, TypeError):
        return None


CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")  # nnU-Net v2: <case>_NNNN


def _file_ending(path: Path, meta: dict[str, Any]) -> str:
    ending = meta.get("file_ending", ".nii.gz")
    if ending not in _NIFTI_SUFFIXES:
        raise DatasetError(
            f"{path}: file_ending {ending!r}: semicon-sweep reads NIfTI files "
            f"({', '.join(_NIFTI_SUFFIXES)}) only"
        )
    return ending


def _files_ending(folder: Path, ending: str) -> list[Path]:
    if not folder.is_dir():
        return []
    return [
        p
        for p in sorted(folder.iterdir())
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(ending)
    ]


def _nnunet_cases(
    root: Path, path: Path, meta: dict[str, Any], channels: tuple[str, ...]
) -> list[Case]:
    """``imagesTr/<case>_0000<ending>`` .. ``_000{C-1}`` paired with ``labelsTr/<case><ending>``."""
    ending = _file_ending(path, meta)
    by_case: dict[str, dict[int, Path]] = {}
    for image in _files_ending(root / "imagesTr", ending):
        match = CHANNEL_FILE.match(image.name[: -len(ending)])
        if match is None:
            raise DatasetError(
                f"{image}: not named <case>_0000{ending} (nnU-Net v2 layout: the channel "
                f"number after the case name, as declared by {path.name}'s channel_names)"
            )
        channel = int(match["channel"])
        if channel >= len(channels):
            raise DatasetError(
                f"{image}: channel {channel} of case {match['case']!r}, but {path.name} "
                f"declares {_channels_text(channels)}"
            )
        by_case.setdefault(match["case"], {})[channel] = image
    images: dict[str, Path] = {}
    extra: dict[str, tuple[Path, ...]] = {}
    for name, files in by_case.items():
        for channel in range(len(channels)):
            if channel not in files:
                missing = root / "imagesTr" / f"{name}_{channel:04d}{ending}"
                raise DatasetError(
                    f"{missing}: channel file missing ({path.name} declares "
                    f"{_channels_text(channels)})"
                )
        images[name] = files[0]
        extra[name] = tuple(files[c] for c in range(1, len(channels)))
    labels = {p.name[: -len(ending)]: p for p in _files_ending(root / "labelsTr", ending)}
    for name, image in images.items():
        if name not in labels:
            raise DatasetError(
                f"{root / 'labelsTr' / (name + ending)}: label file missing for image {image}"
            )
    for name, label in labels.items():
        if name not in images:
            raise DatasetError(
                f"{root / 'imagesTr' / (name + '_0000' + ending)}: image file missing for "
                f"label {label}"
            )
    count = meta.get("numTraining")
    if count is not None and count != len(images):
        raise DatasetError(
            f"{path}: numTraining is {count!r} but imagesTr/labelsTr hold {len(images)} cases"
        )
    return [Case(name, images[name], labels[name], extra[name]) for name in sorted(images)]


def scan_layout(root: str | os.PathLike[str]) -> Layout:
    """List the cases of an MSD or nnU-Net v2 folder and check that their files exist (reads
    no image)."""
    if str(root) == "":
        raise DatasetError("dataset.root: empty; it must name an MSD or nnU-Net v2 folder")
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset folder not found")
    dataset_json = root / "dataset.json"
    names: dict[int, str] | None = None
    kind = "msd"
    channels: tuple[str, ...] = ("",)
    if dataset_json.exists():
        meta = _read_dataset_json(dataset_json)
        channels = _declared_channels(dataset_json, meta) or channels
        names = _declared_labels(dataset_json, meta)
        if "training" in meta:
            cases = _listed_cases(root, dataset_json, meta["training"])
        elif _is_nnunet(meta):
            kind = "nnunet"
            cases = _nnunet_cases(root, dataset_json, meta, channels)
        else:
            cases = _paired_cases(root)
    else:
        dataset_json = None
        cases = _paired_cases(root)
    if not cases:
        raise DatasetError(
            f"{root}: no cases found (expected dataset.json with a 'training' list, "
            "imagesTr/*.nii.gz with matching labelsTr/*.nii.gz, or an nnU-Net v2 dataset.json "
            "with imagesTr/<case>_0000.nii.gz and labelsTr/<case>.nii.gz)"
        )
    case_names = [case.name for case in cases]
    duplicates = sorted({name for name in case_names if case_names.count(name) > 1})
    if duplicates:
        raise DatasetError(f"{dataset_json or root}: case listed more than once: {duplicates[0]}")
    declared = frozenset(names) if names is not None else None
    return Layout(root, tuple(cases), dataset_json, declared, kind, dict(names or {}), channels)


def channel_modalities(root: str | os.PathLike[str]) -> tuple[str, ...] | None:
    """``root/dataset.json``'s declared channel modalities; None when the file is absent,
    unreadable or declares none (``scan_layout`` reports a bad one)."""
    try:
        meta = json.loads((Path(root) / "dataset.json").read_text())
        return _declared_channels(Path(root) / "dataset.json", meta)
    except (OSError, ValueError, AttributeError, TypeError, DatasetError):
        return None


def _load(path: Path) -> Any:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    try:
        return nib.load(str(path))
    except (ImageFileError, HeaderDataError, *_READ_ERRORS) as err:
        raise DatasetError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from err


def _fdata(path: Path, image: Any, dtype: type[np.floating]) -> np.ndarray:
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    try:
        return image.get_fdata(dtype=dtype, caching="unchanged")
    except (ImageFileError, HeaderDataError, *_READ_ERRORS) as err:
        raise DatasetError(f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})") from err


def _squeezed(data: np.ndarray) -> np.ndarray:
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    return data


def read_volume(path: Path, dtype: type[np.floating]) -> np.ndarray:
    """The 3D array stored in ``path`` (scaled by the header's slope/intercept), as ``dtype``.

    A 4D file whose trailing dimensions are 1 is squeezed to 3D; anything else not 3D is an error.
    """
    data = _squeezed(_fdata(path, _load(path), dtype))
    if data.ndim == 4 and min(data.shape) >= 1:
        raise DatasetError(
            f"{path}: a 4D image of {data.shape[3]} channels (shape {data.shape}) where one "
            "3D volume is expected"
        )
    if data.ndim != 3 or min(data.shape) < 1:
        raise DatasetError(f"{path}: expected a 3D volume, got shape {data.shape}")
    return data


def voxel_sizes(affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel size along each array axis of ``affine``'s grid (norms of its columns)."""
    sizes = np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))
    return (float(sizes[0]), float(sizes[1]), float(sizes[2]))


def to_canonical(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``array`` (its last three axes a volume on ``affine``'s grid) turned to the closest RAS
    orientation, with the affine of the new grid (as ``nibabel.as_closest_canonical``; axes
    are only permuted and flipped, never resampled). ``from_canonical`` undoes it."""
    from nibabel.orientations import apply_orientation, inv_ornt_aff, io_orientation

    ornt = io_orientation(affine)
    if (ornt == [[0, 1], [1, 1], [2, 1]]).all():
        return array, np.asarray(affine)
    lead = array.ndim - 3
    moved = np.moveaxis(array, tuple(range(lead)), tuple(range(3, 3 + lead)))
    turned = np.moveaxis(
        apply_orientation(moved, ornt), tuple(range(3, 3 + lead)), tuple(range(lead))
    )
    return np.ascontiguousarray(turned), np.asarray(affine) @ inv_ornt_aff(ornt, array.shape[lead:])


def from_canonical(array: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """A 3D ``array`` on the canonical grid of ``affine`` (``to_canonical``) back on
    ``affine``'s own grid."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    ornt = ornt_transform(axcodes2ornt("RAS"), io_orientation(affine))
    return np.ascontiguousarray(apply_orientation(array, ornt))


def read_channels(
    files: tuple[Path, ...], channels: int, dtype: type[np.floating] = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """The image of one case as (C, X, Y, Z) ``dtype`` with the affine of its (first) file.

    One file: a 3D volume (C = 1) or a 4D one holding its channels along the last axis (MSD).
    Several files: one 3D volume per channel, of equal shapes (nnU-Net v2). A channel count
    other than ``channels`` raises ``DatasetError`` naming the file."""
    first = _load(files[0])
    if len(files) == 1:
        data = _squeezed(_fdata(files[0], first, dtype))
        count = data.shape[3] if data.ndim == 4 else 1
        if data.ndim not in (3, 4) or min(data.shape) < 1:
            raise DatasetError(
                f"{files[0]}: expected a 3D volume (or 4D, X Y Z C), got shape {data.shape}"
            )
        if count != channels:
            raise DatasetError(
                f"{files[0]}: {count} channel{'s' * (count != 1)} (shape {data.shape}), but "
                f"{channels} {'are' if channels != 1 else 'is'} declared"
                + (
                    " (dataset.json modality / channel_names)"
                    if channels != 1
                    else "; declare the channels in dataset.json (modality / channel_names)"
                )
            )
        stack = data[None] if data.ndim == 3 else np.moveaxis(data, 3, 0)
        return np.ascontiguousarray(stack, dtype=dtype), np.asarray(first.affine)
    stack = np.empty((len(files), *first.shape[:3]), dtype=dtype) if len(first.shape) >= 3 else None
    for index, path in enumerate(files):
        volume = read_volume(path, dtype)
        if stack is None or volume.shape != stack.shape[1:]:
            raise DatasetError(
                f"{path}: shape {volume.shape} differs from channel 0 {files[0].name} "
                f"shape {tuple(first.shape)}"
            )
        stack[index] = volume
        del volume
    return stack, np.asarray(first.affine)


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


def _allowed_classes(layout: Layout, remap: dict[int, int]) -> frozenset[int] | None:
    if layout.declared_labels is None and remap:
        return frozenset({0, *remap.values()})
    return layout.declared_labels


def _check_case(
    case: Case,
    remap: dict[int, int],
    allowed: frozenset[int] | None,
    declared_in: Path | None,
    modalities: tuple[str, ...],
    reorient: str,
) -> Volume:
    image, affine = read_channels(case.images, len(modalities))
    raw_label = read_volume(case.label, np.float64)
    if image.shape[1:] != raw_label.shape:
        raise DatasetError(
            f"{case.image}: image shape {image.shape[1:]} does not match label {case.label} "
            f"shape {raw_label.shape}"
        )
    finite = np.isfinite(image).reshape(len(image), -1).all(axis=1)
    if not finite.all():
        bad = case.images[int(np.argmin(finite))] if len(case.images) > 1 else case.image
        raise DatasetError(f"{bad}: image holds NaN or infinite values")
    label = _check_label(case.label, raw_label, remap, allowed, declared_in)
    del raw_label
    if reorient == "canonical":
        image, _ = to_canonical(image, affine)
        label, affine = to_canonical(label, affine)
    return Volume(case.name, image, label, str(case.image), str(case.label), affine, modalities)


def iter_checked(
    layout: Layout, label_remap: tuple[tuple[int, int], ...], reorient: str = "none"
) -> Iterator[Volume]:
    """Read and check the cases one at a time, in ``layout.cases`` order: a volume is read only
    after the caller asked for the next one, and this generator keeps no reference to the
    volumes it yielded (a caller that drops each one holds one volume at a time).

    ``reorient``: "none" keeps each volume as stored; "canonical" turns image and label alike
    to the closest RAS orientation (``to_canonical``)."""
    if reorient not in REORIENTATIONS:
        raise ConfigError(
            f"dataset.reorient: must be one of {', '.join(REORIENTATIONS)}, got {reorient!r}"
        )
    remap = _validate_remap(label_remap)
    allowed = _allowed_classes(layout, remap)
    for case in layout.cases:
        volume = _check_case(case, remap, allowed, layout.dataset_json, layout.channels, reorient)
        yield volume
        del volume


def count_classes(layout: Layout, label_remap: tuple[tuple[int, int], ...], max_label: int) -> int:
    """The number of classes (incl. background): the declared ones (dataset.json ``labels`` or
    ``label_remap``), else ``max(2, max_label + 1)`` for ``max_label`` the largest label value."""
    allowed = _allowed_classes(layout, _validate_remap(label_remap))
    if allowed is not None:
        return max(allowed) + 1
    return max(2, max_label + 1)


def load_checked(
    layout: Layout, label_remap: tuple[tuple[int, int], ...]
) -> tuple[list[Volume], int]:
    """Read and check every case; returns the volumes and the number of classes (incl. background)."""
    volumes = list(iter_checked(layout, label_remap))
    max_label = max(int(v.label.max()) for v in volumes)
    return volumes, count_classes(layout, label_remap, max_label)


def load_msd(
    root: str | os.PathLike[str], label_remap: tuple[tuple[int, int], ...] = ()
) -> list[Volume]:
    """Read and check every case of the MSD or nnU-Net v2 folder ``root`` (see ``scan_layout``).

    ``label_remap``: (raw value, class) pairs applied to every label map; non-zero raw values it
    does not map are an error. Raises ``DatasetError`` naming the file for a missing folder or
    file, no cases, a channel count other than the declared one, an unreadable or corrupt file, a volume that is not
    3D, an image/label shape mismatch, non-integer label values, or label values not declared
    in ``dataset.json``.
    """
    volumes, _ = load_checked(scan_layout(root), tuple(label_remap))
    return volumes
