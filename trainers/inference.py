"""Using a trained model on whole volumes: prediction at the input's own resolution, reading and
writing NIfTI label maps, Dice on the original voxel grid, and a TorchScript export.

``predict_volume`` preprocesses a volume exactly as ``trainers.data.prepare_slices`` does for
training (turned to the canonical orientation under ``DataConfig.reorient: canonical``; each
channel normalised per volume or by the CT window, ``normalise_channels``; slices along
``DataConfig.axis``, resampled to ``DataConfig.spacing`` and padded to a square when it is set,
each slice resized to ``image_size`` by ``resize_images``), runs the model batch by batch under
``torch.inference_mode``, takes each slice's logits back to the slice's own in-plane grid
(resize, crop the padding, resample: bilinear, ``align_corners=False``) and the argmax there,
restacks the slices along ``axis`` and turns the label map back to the stored orientation: it
has exactly the input's shape, on the input's voxel grid.

Inputs with several channels: one 4D file (X, Y, Z, C) per case, or nnU-Net v2's one file per
channel, ``<case>_0000`` .. ``<case>_000{C-1}`` (``group_images``; the output is
``<case>.nii.gz``).

Imports no Ray and nothing of ``orchestrator``; nibabel is imported where a file is read or
written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainers.config import DataConfig, DatasetError
from trainers.data import (
    CLIP_PERCENTILES,
    SliceGeometry,
    channel_norms,
    fit_images,
    from_square,
    in_plane_zooms,
    normalise_channels,
)
from trainers.metrics import evaluate_volumes
from trainers.msd import (
    CHANNEL_FILE,
    Volume,
    from_canonical,
    read_channels,
    to_canonical,
    voxel_sizes,
)

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# what a reader of an exported model needs to know to feed it (``export_record``)
EXPORT_FORMAT = 1


@dataclass(frozen=True, eq=False)
class InputImage:
    """One image to segment: ``image`` float32 (C, X, Y, Z) as stored, with the (first) file's
    ``affine`` and header; ``shape`` is the label map's shape in the file: (X, Y, Z), plus the
    trailing 1s of a one-channel file stored as e.g. (X, Y, Z, 1); ``paths`` its files (one, or
    one per channel)."""

    case: str
    path: Path
    image: np.ndarray
    affine: np.ndarray
    header: Any
    shape: tuple[int, ...]
    paths: tuple[Path, ...] = ()


def case_name(path: Path) -> str:
    """``case`` of ``case.nii.gz`` / ``case.nii``."""
    for suffix in NIFTI_SUFFIXES:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """The NIfTI files (``*.nii.gz``, ``*.nii``; hidden files skipped) of ``folder``, sorted.

    ``DatasetError`` for a missing folder, a folder without NIfTI files, or two files of the
    same case (``a.nii`` and ``a.nii.gz``), naming the folder or files."""
    folder = Path(folder)
    if not folder.is_dir():
        where = "is a file" if folder.exists() else "not found"
        raise DatasetError(f"{folder}: images folder {where}")
    files = sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name.endswith(NIFTI_SUFFIXES)
    )
    if not files:
        raise DatasetError(f"{folder}: no NIfTI images (*.nii.gz, *.nii) in the folder")
    seen: dict[str, Path] = {}
    for path in files:
        other = seen.setdefault(case_name(path), path)
        if other is not path:
            raise DatasetError(f"{path}: same case as {other.name}; keep one of the two")
    return files


def group_images(files: Sequence[Path]) -> list[tuple[str, tuple[Path, ...]]]:
    """Cases of an images folder: (case, its files).

    nnU-Net v2 naming (``msd.CHANNEL_FILE``, ``<case>_NNNN``) is read as such only where it
    cannot be a folder of ordinary case names that end in four digits (``amos_0001``,
    ``amos_0004``), i.e. when every file is so named and:
    - some case has a ``_0000`` file among several: the files are grouped by case in channel
      order (a case whose channel numbers are not 0 .. C-1 raises ``DatasetError`` naming the
      missing file; ``read_case`` then checks C against the model, so a series ``img_0000`` ..
      ``img_0010`` for a one-channel model is refused with that line rather than misread);
    - else every file is ``<case>_0000`` (nnU-Net's one-channel naming): each is its case,
      named without the suffix.
    Otherwise each file is one case named after the file (e.g. MSD 4D files).
    """
    matches = [CHANNEL_FILE.match(case_name(path)) for path in files]
    if not files or any(match is None for match in matches):
        return [(case_name(path), (path,)) for path in files]
    by_case: dict[str, dict[int, Path]] = {}
    for path, match in zip(files, matches, strict=True):
        by_case.setdefault(match["case"], {})[int(match["channel"])] = path  # type: ignore[index]
    if not any(len(channels) > 1 and 0 in channels for channels in by_case.values()):
        if all(list(channels) == [0] for channels in by_case.values()):
            return [(case, (channels[0],)) for case, channels in sorted(by_case.items())]
        return [(case_name(path), (path,)) for path in files]
    groups = []
    for case, channels in sorted(by_case.items()):
        last = max(channels)
        for channel in range(last + 1):
            if channel not in channels:
                ending = next(s for s in NIFTI_SUFFIXES if channels[last].name.endswith(s))
                missing = channels[last].parent / f"{case}_{channel:04d}{ending}"
                raise DatasetError(
                    f"{missing}: channel file missing (case {case!r} has channel {last}; files "
                    "named <case>_NNNN are read as one case's nnU-Net channel files)"
                )
        groups.append((case, tuple(channels[c] for c in range(last + 1))))
    return groups


def read_case(files: Sequence[str | os.PathLike[str]], in_channels: int = 1) -> InputImage:
    """Read one case to segment, checked: ``DatasetError`` naming the file when it cannot be
    read, holds a channel count other than ``in_channels`` ("the model expects 2 channels,
    <file> has 1"), or holds NaN / infinite values. ``files``: one file (3D, or 4D with its
    channels last), or one 3D file per channel."""
    import nibabel as nib

    paths = tuple(Path(f) for f in files)
    path = paths[0]
    try:
        header_image = nib.load(str(path))
        shape = tuple(int(n) for n in header_image.shape)
    except Exception as err:  # nibabel's own, gzip, zlib, struct: the file is not a NIfTI image
        raise DatasetError(
            f"{path}: cannot read NIfTI file ({type(err).__name__}: {err})"
        ) from None
    squeezed = list(shape)
    while len(squeezed) > 3 and squeezed[-1] == 1:
        squeezed.pop()
    found = len(paths) if len(paths) > 1 else (squeezed[3] if len(squeezed) == 4 else 1)
    if found != in_channels:
        plural = "s" * (in_channels != 1)
        has = f"has {found} channel file{'s' * (found != 1)}" if len(paths) > 1 else f"has {found}"
        raise DatasetError(
            f"{path}: the model expects {in_channels} channel{plural}, {path.name} {has} "
            f"(shape {shape})"
        )
    image, _ = read_channels(paths, in_channels)
    finite = np.isfinite(image).reshape(len(image), -1).all(axis=1)
    if not finite.all():
        bad = paths[int(np.argmin(finite))] if len(paths) > 1 else path
        raise DatasetError(f"{bad}: image holds NaN or infinite values")
    out_shape = shape if len(squeezed) == 3 else tuple(squeezed[:3])
    return InputImage(
        case_name(path),
        path,
        image,
        np.asarray(header_image.affine),
        header_image.header,
        out_shape,
        paths,
    )


def read_image(path: str | os.PathLike[str], in_channels: int = 1) -> InputImage:
    """``read_case`` of one file (3D, or 4D with its ``in_channels`` channels last)."""
    return read_case([path], in_channels)


def write_label_map(labels: np.ndarray, like: InputImage, path: str | os.PathLike[str]) -> Path:
    """Save ``labels`` (uint8, ``like``'s shape) with ``like``'s affine: a NIfTI-1 / NIfTI-2
    input's header is kept (qform, sform and their codes, units; the output is of the same
    NIfTI version), another format's affine becomes a NIfTI-1 sform. Returns ``path``."""
    import nibabel as nib

    if labels.shape != like.image.shape[1:]:
        raise ValueError(f"labels shape {labels.shape} != image shape {like.image.shape[1:]}")
    data = np.asarray(labels, dtype=np.uint8).reshape(like.shape)  # the file's own shape
    if isinstance(like.header, nib.Nifti1Header):  # NIfTI-1 or NIfTI-2 (its subclass)
        # the input's header as it is (qform, sform and their codes, units, description):
        # the file's affine is recomputed from it exactly as it was for the input
        kind = nib.Nifti2Image if isinstance(like.header, nib.Nifti2Header) else nib.Nifti1Image
        out = kind(data, None, header=like.header.copy())
        out.header.set_slope_inter(None, None)
        out.header["cal_min"], out.header["cal_max"] = 0, 0  # the image's display window: unset
    else:  # another format nibabel reads: the affine, as an aligned sform
        out = nib.Nifti1Image(data, like.affine)
    out.set_data_dtype(np.uint8)
    path = Path(path)
    nib.save(out, str(path))
    return path


def _slice_logits(
    model: nn.Module,
    slices: torch.Tensor,
    geometry: SliceGeometry,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(n, C, S, S) model-sized slices -> (n, h, w) uint8 argmax of the logits taken back to
    the slices' own grid (``geometry``: resized to its square and the padding undone, or
    resized straight to (h, w))."""
    out = torch.empty((slices.shape[0], *geometry.in_plane), dtype=torch.uint8)
    back = (geometry.square, geometry.square) if geometry.square else geometry.in_plane
    for start in range(0, slices.shape[0], batch_size):
        batch = slices[start : start + batch_size].to(device)
        logits = model(batch).float()
        if tuple(logits.shape[-2:]) != back:
            logits = F.interpolate(
                logits, size=back, mode="bilinear", align_corners=False, antialias=True
            )
        logits = from_square(logits, geometry)
        out[start : start + batch_size] = logits.argmax(dim=1).to(torch.uint8).cpu()
    return out


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    data_cfg: DataConfig,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
    affine: np.ndarray | None = None,
    norms: Sequence[tuple[float, float] | None] | None = None,
) -> np.ndarray:
    """Segment a volume as the model was trained to see it; uint8 labels of its (X, Y, Z) shape.

    ``image``: (X, Y, Z) or (C, X, Y, Z) as stored (any real dtype); ``affine``: its
    voxel -> world matrix (needed for ``data_cfg.reorient: canonical`` and ``spacing``);
    ``norms``: each channel's CT window or None (``trainers.data.channel_norms``; default: all
    per volume). Turned to the canonical orientation when ``data_cfg.reorient`` says so, each
    channel normalised, sliced along ``data_cfg.axis``, resampled to ``data_cfg.spacing`` and
    padded to a square when set, each slice resized to ``data_cfg.image_size``; the logits of
    each slice are taken back to its own in-plane grid (bilinear) and the argmax taken there,
    the slices restacked and the map turned back to the stored orientation. The model runs in
    eval mode under ``torch.inference_mode``; its mode is restored.
    """
    image = np.asarray(image)
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4:
        raise ValueError(f"image: expected a (C, X, Y, Z) or 3D volume, got shape {image.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if affine is None and (data_cfg.reorient != "none" or data_cfg.spacing is not None):
        raise ValueError("affine: needed for dataset.reorient / dataset.spacing")
    stored_affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    norms = tuple(norms) if norms is not None else (None,) * image.shape[0]
    device = torch.device(device)
    grid_affine = stored_affine
    if data_cfg.reorient == "canonical":
        image, grid_affine = to_canonical(image, stored_affine)
    axis = data_cfg.axis % 3
    normalised = normalise_channels(np.asarray(image, dtype=np.float32), norms)
    slices = np.moveaxis(normalised, 1 + axis, 0)  # (n, C, h, w)
    del normalised
    geometry = SliceGeometry.of(
        slices.shape[2:], in_plane_zooms(voxel_sizes(grid_affine), axis), data_cfg.spacing
    )
    resized = torch.from_numpy(fit_images(slices, data_cfg.image_size, geometry))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            labels = _slice_logits(model, resized, geometry, batch_size, device)
    finally:
        model.train(was_training)
    out = np.moveaxis(labels.numpy(), 0, axis)
    if data_cfg.reorient == "canonical":
        out = from_canonical(out, stored_affine)
    return np.ascontiguousarray(out)


# ---------------------------------------------------------------------------------------------
# Dice on the original voxel grid


def native_dice(
    preds: Sequence[np.ndarray], targets: Sequence[np.ndarray], num_classes: int
) -> dict[str, float]:
    """Dice of whole-volume predictions on each volume's own voxel grid (``predict_volume``'s
    output against the label map as stored): ``trainers.metrics.evaluate_volumes``'s keys and
    definitions (pooled over every voxel of every volume, and per volume then averaged;
    background excluded, NaN for a class absent from both skipped).

    Volumes may differ in shape: each voxel is passed to ``evaluate_volumes`` as a 1 x 1 slice
    tagged with its volume's index.
    """
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} label maps")
    if not preds:
        raise ValueError("native_dice needs at least one volume")
    for index, (pred, target) in enumerate(zip(preds, targets, strict=True)):
        if np.shape(pred) != np.shape(target):
            raise ValueError(
                f"volume {index}: prediction shape {np.shape(pred)} != label shape {np.shape(target)}"
            )
    flat_pred = np.concatenate([np.asarray(p).reshape(-1) for p in preds]).astype(np.int64)
    flat_target = np.concatenate([np.asarray(t).reshape(-1) for t in targets]).astype(np.int64)
    volume = np.concatenate(
        [np.full(np.size(p), index, dtype=np.int64) for index, p in enumerate(preds)]
    )
    return evaluate_volumes(
        flat_pred.reshape(-1, 1, 1), flat_target.reshape(-1, 1, 1), volume, num_classes
    )


def evaluate_native(
    model: nn.Module,
    volumes: Sequence[Volume],
    data_cfg: DataConfig,
    num_classes: int,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """``model``'s Dice on checked volumes (``trainers.msd.load_msd``) at their own resolution:
    ``predict_volume`` of each image against its label map as stored (``native_dice``), where
    ``trainers.stages.evaluate_model`` scores the resized ``image_size`` slices. Each volume's
    ``affine`` and channel modalities (``Volume.channels``) steer orientation, spacing and
    normalisation as in training."""
    preds = [
        predict_volume(
            model,
            v.image,
            data_cfg,
            batch_size,
            device,
            affine=v.affine,
            norms=channel_norms(v.channels, data_cfg, v.image_path),
        )
        for v in volumes
    ]
    return native_dice(preds, [v.label for v in volumes], num_classes)


# ---------------------------------------------------------------------------------------------
# export


class LogitsOnly(nn.Module):
    """``model(x)`` -> segmentation logits only: the graph an exported model records."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def trace_model(model: nn.Module, image_size: int, in_channels: int = 1) -> torch.jit.ScriptModule:
    """A TorchScript trace of ``model``'s segmentation forward, eval mode, on the CPU:
    (B, in_channels, image_size, image_size) float32 -> logits (B, K, image_size, image_size)."""
    import warnings

    wrapped = LogitsOnly(model).to("cpu").eval()
    example = torch.rand(
        2, in_channels, image_size, image_size, generator=torch.Generator().manual_seed(0)
    )
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        # the UNet's input checks become constants of the trace: the record states the size
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        traced = torch.jit.trace(wrapped, example, check_trace=False)
    return traced.eval()


def preprocessing_record(
    data_cfg: DataConfig,
    num_classes: int,
    in_channels: int = 1,
    class_names: Mapping[int, str] | None = None,
    norms: Sequence[tuple[float, float] | None] | None = None,
) -> dict[str, Any]:
    """What an exported model expects and returns, in words and parameters (JSON-ready).
    ``norms``: each input channel's normalisation (``data.channel_norms``: a CT window or None
    for per volume); all per volume when not given."""
    lo, hi = CLIP_PERCENTILES
    names = {str(k): str(v) for k, v in sorted((class_names or {}).items())}
    channel_norms = list(norms) if norms is not None else [None] * in_channels
    return {
        "axis": data_cfg.axis,
        "axis_note": "slices are taken along this axis of the volume as stored (numpy order, "
        "negative counts from the end); predictions are restacked along it",
        "image_size": data_cfg.image_size,
        "in_channels": in_channels,
        "reorient": data_cfg.reorient,
        "reorient_note": "canonical: each volume (and its channels) is turned to the closest RAS "
        "orientation (nibabel.as_closest_canonical) before slicing, and the label map turned "
        "back to the stored orientation; none: the volume as stored",
        "spacing": list(data_cfg.spacing) if data_cfg.spacing else None,
        "spacing_note": "when set: each slice is resampled (bilinear, antialiased) to this "
        "in-plane voxel size in mm (from the affine's voxel sizes) and zero-padded to a centred "
        "square before the resize; the logits are resized to that square, cropped and "
        "resampled back",
        "ct_window": list(data_cfg.ct_window) if data_cfg.ct_window else None,
        "ct_window_note": "channels declared CT are clipped to [lo, hi] and scaled to [0, 1] "
        "instead of the per-volume normalisation below",
        "channel_normalisation": [
            {"channel": index, "kind": "ct_window", "window": list(norm)}
            if norm is not None
            else {"channel": index, "kind": "per_volume_percentile_minmax"}
            for index, norm in enumerate(channel_norms)
        ],
        "normalisation": {
            "kind": "per_volume_percentile_minmax",
            "percentiles": [lo, hi],
            "description": (
                f"per whole volume (before slicing): lo, hi = the {lo} and {hi} percentiles of "
                "all its voxels; x -> (clip(x, lo, hi) - lo) / (hi - lo), clipped to [0, 1], "
                "float32. When hi == lo the volume's min and max are used instead; a constant "
                "volume maps to all zeros (trainers.data.normalise_intensity)"
            ),
        },
        "resize": (
            "each (h, w) slice -> (image_size, image_size): bilinear, align_corners=False, "
            "antialiased when shrinking (torch.nn.functional.interpolate), clamped to [0, 1]"
        ),
        "resize_back": (
            "logits (K, image_size, image_size) -> (K, h, w): bilinear, align_corners=False, "
            "antialiased when shrinking; argmax over K gives the label of each voxel"
        ),
        "input": {
            "layout": f"(B, {in_channels}, H, W)",
            "dtype": "float32",
            "range": [0.0, 1.0],
            "H": data_cfg.image_size,
            "W": data_cfg.image_size,
        },
        "output": {"layout": "(B, K, H, W)", "kind": "logits", "K": num_classes},
        "label_remap": [list(pair) for pair in data_cfg.label_remap],
        "num_classes": num_classes,
        "classes": names
        or {str(k): ("background" if k == 0 else f"class {k}") for k in range(num_classes)},
    }
