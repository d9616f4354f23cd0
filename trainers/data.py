"""Data layer: MSD / nnU-Net v2 volumes -> checked, normalised, resized 2D slices; volume-level
splits.

Pipeline (``prepare_slices``), one volume at a time (steps 1-3 for a volume, then the next):

1. ``trainers.msd.scan_layout`` lists the cases (MSD: ``dataset.json``'s ``training`` list, else
   ``imagesTr`` paired with ``labelsTr`` by file name; nnU-Net v2: ``imagesTr/<case>_0000``
   with ``labelsTr/<case>``), ``trainers.msd.iter_checked`` reads each image and label with
   nibabel and checks them; any bad input raises ``DatasetError`` naming the file.
   With ``DataConfig.reorient: canonical`` image and label are turned to the closest RAS
   orientation as they are read.
2. Each channel of each volume is normalised on its own (``normalise_channels``): a CT channel
   (declared "CT" in ``dataset.json``) is clipped to ``DataConfig.ct_window`` and scaled to
   [0, 1]; any other channel is clipped to its 0.5 / 99.5 percentiles, then min-max scaled to
   [0, 1] (``normalise_intensity``). Hippocampus intensities span five orders of magnitude
   across cases, and a few hot voxels would otherwise squash a plain min-max.
3. Volumes are cut into 2D slices along ``DataConfig.axis``; with ``DataConfig.spacing`` each
   slice is first resampled to that in-plane voxel size (from the affine's voxel sizes) and
   padded to a square (``SliceGeometry``); every slice is then resized to
   ``image_size x image_size``: images bilinearly (antialiased when shrinking), labels by
   nearest neighbour (``nearest-exact``), so no label value is ever invented.
4. The slices are cached as ``.npy`` files in ``cache_dir/<fingerprint>/`` (built in a temporary
   folder, renamed into place, ``meta.json`` last); later calls with the same fingerprint
   memory-map them without touching nibabel. ``load_slice_cache`` opens such a folder directly.

Shapes: S slices, C input channels, H = W = image_size. ``SliceData.images`` float32
(S, C, H, W) in [0, 1], ``labels`` uint8 (S, H, W), ``volume`` int32 (S,), ``position`` float32
(S,) = slice index / slices in its volume, in [0, 1) (Chaitanya et al.'s partitions). A
one-channel cache stores its images as (S, H, W), byte for byte as before channels existed,
and is read back as (S, 1, H, W).

Splits are by volume (``make_split``); the labelled volumes are a nested, seeded subset of the
training volumes (``labelled_subset``).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from trainers.config import ConfigError, DataConfig, DatasetError, SplitConfig
from trainers.msd import Layout, Volume, count_classes, is_ct, iter_checked, scan_layout
from trainers.synthetic import DEFAULT_SHAPE, SYNTHETIC_VERSION, write_synthetic_msd

# Bumped whenever preprocessing changes what ends up in the slice cache.
PREPROCESS_VERSION = 1
CLIP_PERCENTILES = (0.5, 99.5)

_CACHE_FORMAT = 1
_CACHE_ARRAYS = {
    "images": np.float32,
    "labels": np.uint8,
    "volume": np.int32,
    "position": np.float32,
}
# Independent random streams of one split index (see ``_split_rng``).
_SPLIT_STREAM = 1
_LABELLED_STREAM = 2


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

    Covers ``PREPROCESS_VERSION``, ``kind``, ``image_size``, ``axis`` (as 0..2), ``label_remap``,
    ``reorient`` / ``spacing`` / ``ct_window`` when set (left out at their defaults, so that
    the digests of datasets fingerprinted before they existed stay the same) and either the synthetic generator's version and parameters (kind="synthetic": no file is
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
    if cfg.reorient != "none":
        identity["reorient"] = cfg.reorient
    for name in ("spacing", "ct_window"):
        if getattr(cfg, name) is not None:
            identity[name] = list(getattr(cfg, name))
    if cfg.kind == "synthetic":
        identity["synthetic"] = _synthetic_parameters(cfg)
    else:
        layout = scan_layout(cfg.root)
        files = [layout.dataset_json] if layout.dataset_json else []
        files += [path for case in layout.cases for path in (*case.images, case.label)]
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


def channel_norms(
    channels: tuple[str, ...], cfg: DataConfig, where: object = "dataset.json"
) -> tuple[tuple[float, float] | None, ...]:
    """Each channel's normalisation: the CT window (lo, hi) for a channel declared "CT", None
    (per volume, ``normalise_intensity``) for any other.

    A CT channel without ``cfg.ct_window`` is refused rather than normalised per volume: CT
    intensities are physical units whose meaning a per-volume percentile window throws away,
    and guessing a window from the training set (nnU-Net's foreground percentiles) would need a
    pass over every volume before any slice could be cached. A ``ct_window`` for a dataset with
    no CT channel is refused too: it would silently do nothing. ``where`` names the file that
    declares the channels in the messages."""
    ct = [index for index, name in enumerate(channels) if is_ct(name)]
    if ct and cfg.ct_window is None:
        raise DatasetError(
            f"{where}: channel {ct[0]} is CT; set dataset.ct_window: [lo, hi] (Hounsfield "
            "units, e.g. [-160, 240] for abdominal soft tissue)"
        )
    if not ct and cfg.ct_window is not None:
        raise ConfigError(
            f"dataset.ct_window: {where} declares no CT channel "
            f"(channels: {', '.join(name or '?' for name in channels)})"
        )
    return tuple(cfg.ct_window if index in ct else None for index in range(len(channels)))


def normalise_window(volume: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """``x -> (clip(x, lo, hi) - lo) / (hi - lo)``, float32 in [0, 1] (a CT channel)."""
    lo, hi = window
    return ((np.clip(volume, lo, hi) - lo) / (hi - lo)).astype(np.float32)


def normalise_channels(
    image: np.ndarray, norms: tuple[tuple[float, float] | None, ...]
) -> np.ndarray:
    """(C, ...) -> (C, ...) float32 in [0, 1]: channel c by ``normalise_window(norms[c])``,
    or ``normalise_intensity`` when ``norms[c]`` is None."""
    if len(norms) != image.shape[0]:
        raise ValueError(f"{len(norms)} channel normalisations for {image.shape[0]} channels")
    out = np.empty(image.shape, dtype=np.float32)
    for index, window in enumerate(norms):
        channel = image[index]
        out[index] = (
            normalise_intensity(channel) if window is None else normalise_window(channel, window)
        )
    return out


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """(n, h, w) or (n, C, h, w) normalised image slices -> (n, size, size) / (n, C, size, size)
    float32 in [0, 1]: bilinear, antialiased when shrinking (``align_corners=False``), each
    channel alike. The one image resize of the slice cache and of ``trainers.inference``."""
    import torch

    flat = images.ndim == 3
    image_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    image_t = _interpolate(image_t[:, None] if flat else image_t, (size, size), "bilinear")
    return (image_t[:, 0] if flat else image_t).clamp_(0.0, 1.0).numpy()


def _interpolate(x: Any, size: tuple[int, int], mode: str) -> Any:
    """(n, C, h, w) tensor -> (n, C, *size): bilinear (antialiased) or nearest-exact."""
    import torch.nn.functional as F

    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "bilinear":
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return F.interpolate(x, size=size, mode=mode)


@dataclass(frozen=True)
class SliceGeometry:
    """How one volume's (h, w) slices become square model inputs under ``DataConfig.spacing``:
    resampled to ``resampled`` (h', w') = the slice's extent at the target voxel size, then
    zero-padded by ``pad`` (top, left) to ``square`` x ``square``, so that every slice keeps its
    physical aspect ratio through the resize to ``image_size``. Without a spacing the slice is
    resized directly (``resampled`` = (h, w), no padding, ``square`` = 0)."""

    in_plane: tuple[int, int]
    resampled: tuple[int, int]
    pad: tuple[int, int]
    square: int

    @classmethod
    def of(
        cls,
        in_plane: tuple[int, int],
        zooms: tuple[float, float],
        spacing: tuple[float, float] | None,
    ) -> SliceGeometry:
        in_plane = (int(in_plane[0]), int(in_plane[1]))
        if spacing is None:
            return cls(in_plane, in_plane, (0, 0), 0)
        height, width = (
            max(1, round(n * zoom / target))
            for n, zoom, target in zip(in_plane, zooms, spacing, strict=True)
        )
        square = max(height, width)
        return cls(
            in_plane, (height, width), ((square - height) // 2, (square - width) // 2), square
        )


def _to_square(x: Any, geometry: SliceGeometry, mode: str) -> Any:
    """(n, C, h, w) -> resampled and padded (n, C, square, square) (``SliceGeometry``)."""
    import torch.nn.functional as F

    if not geometry.square:
        return x
    x = _interpolate(x, geometry.resampled, mode)
    top, left = geometry.pad
    bottom = geometry.square - geometry.resampled[0] - top
    right = geometry.square - geometry.resampled[1] - left
    return F.pad(x, (left, right, top, bottom))


def from_square(x: Any, geometry: SliceGeometry) -> Any:
    """(n, K, square, square) logits -> (n, K, h, w): ``_to_square`` undone (the padding
    cropped, resampled bilinearly back to the slice's own grid). Without a spacing: unchanged."""
    if not geometry.square:
        return x
    top, left = geometry.pad
    height, width = geometry.resampled
    x = x[:, :, top : top + height, left : left + width]
    return _interpolate(x, geometry.in_plane, "bilinear")


def fit_images(images: np.ndarray, size: int, geometry: SliceGeometry) -> np.ndarray:
    """(n, C, h, w) normalised slices -> (n, C, size, size) model inputs: resampled to the
    target spacing and padded to a square when ``geometry`` says so, then ``resize_images``."""
    import torch

    if not geometry.square:
        return resize_images(images, size)
    image_t = torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32))
    square = _to_square(image_t, geometry, "bilinear").clamp_(0.0, 1.0).numpy()
    return resize_images(square, size)


def _resize_slices(
    images: np.ndarray, labels: np.ndarray, size: int, geometry: SliceGeometry
) -> tuple[np.ndarray, np.ndarray]:
    """(n, C, h, w) images / (n, h, w) labels -> (n, C, size, size) / (n, size, size): bilinear
    (antialiased) / nearest-exact, after ``geometry``'s resampling and padding."""
    import torch

    label_t = torch.from_numpy(np.ascontiguousarray(labels, dtype=np.float32))[:, None]
    label_t = _to_square(label_t, geometry, "nearest-exact")
    label_t = _interpolate(label_t, (size, size), "nearest-exact")
    resized_labels = label_t[:, 0].round().numpy().astype(np.uint8)
    return fit_images(images, size, geometry), resized_labels


def in_plane_zooms(zooms: tuple[float, float, float], axis: int) -> tuple[float, float]:
    """The voxel sizes of the two in-plane axes left after removing slice ``axis``."""
    kept = [z for index, z in enumerate(zooms) if index != axis % 3]
    return (kept[0], kept[1])


def _slice_volumes(
    volumes: Iterable[Volume], cfg: DataConfig, norms: tuple[tuple[float, float] | None, ...]
) -> tuple[dict[str, np.ndarray], list[str], int]:
    """The volumes' slices along ``cfg.axis``: the four cache arrays (see ``SliceData``;
    images (S, C, H, W)), the case names and the largest label value. ``volumes`` is consumed
    one volume at a time and no volume is kept: only its resized slices are, so the peak holds
    one volume plus the output."""
    import torch

    size, axis = cfg.image_size, cfg.axis % 3
    parts: dict[str, list[np.ndarray]] = {name: [] for name in _CACHE_ARRAYS}
    cases: list[str] = []
    max_label = 0
    with torch.no_grad():
        for volume in volumes:  # not enumerate: its cached result tuple would keep a volume
            index = len(cases)
            cases.append(volume.case)
            max_label = max(max_label, int(volume.label.max()))
            # (C, X, Y, Z) -> (n, C, h, w): the slices along axis
            images = np.moveaxis(normalise_channels(volume.image, norms), 1 + axis, 0)
            labels = np.moveaxis(volume.label, axis, 0)
            geometry = SliceGeometry.of(
                labels.shape[1:], in_plane_zooms(volume.zooms, axis), cfg.spacing
            )
            del volume  # the next volume is read while this loop waits on the generator
            images, labels = _resize_slices(images, labels, size, geometry)
            count = images.shape[0]
            parts["images"].append(images)
            parts["labels"].append(labels)
            parts["volume"].append(np.full(count, index, dtype=np.int32))
            parts["position"].append((np.arange(count) / count).astype(np.float32))
            del images, labels
    arrays = {}
    for name, dtype in _CACHE_ARRAYS.items():
        arrays[name] = np.concatenate(parts.pop(name)).astype(dtype, copy=False)
    return arrays, cases, max_label


@dataclass(frozen=True, eq=False)
class SliceData:
    """Preprocessed 2D slices of every volume (often memory-mapped, read-only).

    images float32 (S, C, H, W) in [0, 1] (C input channels; images given as (S, H, W) are
    taken as one channel, a view (S, 1, H, W)); labels uint8 (S, H, W) class ids <
    num_classes; volume int32 (S,) index into ``cases``; position float32 (S,) = slice index /
    slices of its volume, in [0, 1); cases: the volumes' case names; fingerprint:
    ``data_fingerprint``; cache_folder: the cache folder it was loaded from (None when built in
    memory), where ``trainers.native.load_native`` finds the native label maps.
    """

    images: np.ndarray
    labels: np.ndarray
    volume: np.ndarray
    position: np.ndarray
    cases: tuple[str, ...]
    num_classes: int
    fingerprint: str
    cache_folder: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "cases", tuple(self.cases))
        for name, dtype in _CACHE_ARRAYS.items():
            array = getattr(self, name)
            if not isinstance(array, np.ndarray) or array.dtype != dtype:
                raise ValueError(f"SliceData.{name}: must be a {np.dtype(dtype).name} array")
        if self.images.ndim == 3:
            object.__setattr__(self, "images", self.images[:, None])
        count = self.images.shape[0]
        if self.images.ndim != 4 or self.labels.shape != (count, *self.images.shape[2:]):
            raise ValueError(
                f"SliceData.labels: shape {self.labels.shape} must be images shape "
                f"{self.images.shape} (S, C, H, W) without C"
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

    @property
    def in_channels(self) -> int:
        return int(self.images.shape[1])

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
            **arrays,
            cases=tuple(cases),
            num_classes=num_classes,
            fingerprint=fingerprint,
            cache_folder=str(folder),
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


def check_dataset(cfg: DataConfig, cache_dir: str | os.PathLike[str]) -> None:
    """Read and check every case of ``cfg``'s dataset as ``prepare_slices`` would, writing
    nothing (``DatasetError`` naming the file). A dataset already cached under ``cache_dir`` was
    checked when it was cached, and a synthetic one is generated: neither is read."""
    if cfg.kind == "synthetic" or (Path(cache_dir) / data_fingerprint(cfg) / "meta.json").is_file():
        return
    layout = scan_layout(_data_root(cfg))
    _layout_norms(layout, cfg)
    for volume in iter_checked(layout, cfg.label_remap, cfg.reorient):
        del volume  # checked; one volume in memory at a time


def _layout_norms(layout: Layout, cfg: DataConfig) -> tuple[tuple[float, float] | None, ...]:
    return channel_norms(layout.channels, cfg, layout.dataset_json or layout.root)


def prepare_slices(cfg: DataConfig, cache_dir: str | os.PathLike[str]) -> SliceData:
    """The preprocessed slices of ``cfg``'s dataset, from ``cache_dir/<fingerprint>/`` when cached.

    kind="synthetic" first writes the dataset at ``cfg.root`` unless it is already there.
    A cache miss reads and checks the cases one at a time (``trainers.msd.iter_checked``),
    normalising each volume's channels (``normalise_channels``), slicing it along ``cfg.axis``
    and resizing its slices to ``cfg.image_size`` before the next is read (memory: one volume plus the
    output), then writes the cache; either way the returned arrays are memory-mapped from the
    cache folder.
    """
    root = _data_root(cfg)
    if cfg.kind == "synthetic":
        write_synthetic_msd(root, num_cases=cfg.synthetic_cases, seed=cfg.synthetic_seed)
    fingerprint = data_fingerprint(cfg)
    folder = Path(cache_dir) / fingerprint
    # the native test metrics' label maps and spacings (trainers.native), from the same pass
    from trainers.native import NativeSidecar, write_native_sidecar  # imports torch

    if not (folder / "meta.json").is_file():
        layout = scan_layout(root)
        norms = _layout_norms(layout, cfg)
        with NativeSidecar(cfg, cache_dir) as native:
            volumes = native.tap(iter_checked(layout, cfg.label_remap, cfg.reorient))
            arrays, cases, max_label = _slice_volumes(volumes, cfg, norms)
            if arrays["images"].shape[1] == 1:  # one channel: stored (S, H, W), as before
                arrays["images"] = arrays["images"][:, 0]
            num_classes = count_classes(layout, cfg.label_remap, max_label)
            meta = {
                "format": _CACHE_FORMAT,
                "fingerprint": fingerprint,
                "preprocess_version": PREPROCESS_VERSION,
                "cases": cases,
                "num_classes": num_classes,
                "num_slices": int(arrays["images"].shape[0]),
                "image_size": cfg.image_size,
            }
            _write_cache(folder, arrays, meta)
            native.install(folder, fingerprint)
    write_native_sidecar(cfg, folder)  # a cache written before the sidecar existed
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
