"""Using a trained model on whole volumes: prediction at the input's own resolution, reading and
writing NIfTI label maps, Dice on the original voxel grid, and a TorchScript export.

``predict_volume`` preprocesses a volume exactly as ``trainers.data.prepare_slices`` does for
training (``normalise_intensity`` per volume, slices along ``DataConfig.axis``, each slice
resized to ``image_size`` by ``resize_images``), runs the model batch by batch under
``torch.inference_mode``, resizes each slice's logits back to the slice's own in-plane size
(bilinear, antialiased when shrinking, ``align_corners=False``) and takes the argmax there, then
restacks the slices along ``axis``: the label map has exactly the input's shape.

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
from trainers.data import CLIP_PERCENTILES, normalise_intensity, resize_images
from trainers.metrics import evaluate_volumes
from trainers.msd import Volume, read_volume

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# what a reader of an exported model needs to know to feed it (``export_record``)
EXPORT_FORMAT = 1


@dataclass(frozen=True, eq=False)
class InputImage:
    """One image to segment: ``image`` float32 3D as stored, with the file's ``affine`` and header;
    ``shape`` is the file's own (``image.shape`` plus any trailing 1s, e.g. (X, Y, Z, 1))."""

    case: str
    path: Path
    image: np.ndarray
    affine: np.ndarray
    header: Any
    shape: tuple[int, ...]


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


def read_image(path: str | os.PathLike[str], in_channels: int = 1) -> InputImage:
    """Read one NIfTI image to segment, checked: ``DatasetError`` naming the file when it cannot
    be read, is not a 3D volume (a 4D file of several channels when the model takes
    ``in_channels``: "expects 1 channel, <file> has 2"), or holds NaN / infinite values."""
    import nibabel as nib

    path = Path(path)
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
    if len(squeezed) == 4 and squeezed[3] != in_channels:
        raise DatasetError(
            f"{path}: the model expects {in_channels} channel{'s' * (in_channels != 1)}, "
            f"{path.name} has {squeezed[3]} (shape {shape})"
        )
    image = read_volume(path, np.float32)
    if not np.isfinite(image).all():
        raise DatasetError(f"{path}: image holds NaN or infinite values")
    return InputImage(
        case_name(path), path, image, np.asarray(header_image.affine), header_image.header, shape
    )


def write_label_map(labels: np.ndarray, like: InputImage, path: str | os.PathLike[str]) -> Path:
    """Save ``labels`` (uint8, ``like``'s shape) with ``like``'s affine: a NIfTI-1 / NIfTI-2
    input's header is kept (qform, sform and their codes, units; the output is of the same
    NIfTI version), another format's affine becomes a NIfTI-1 sform. Returns ``path``."""
    import nibabel as nib

    if labels.shape != like.image.shape:
        raise ValueError(f"labels shape {labels.shape} != image shape {like.image.shape}")
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
    size: tuple[int, int],
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """(n, S, S) model-sized slices -> (n, h, w) uint8 argmax of the logits resized to ``size``."""
    out = torch.empty((slices.shape[0], *size), dtype=torch.uint8)
    for start in range(0, slices.shape[0], batch_size):
        batch = slices[start : start + batch_size, None].to(device)
        logits = model(batch).float()
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(
                logits, size=size, mode="bilinear", align_corners=False, antialias=True
            )
        out[start : start + batch_size] = logits.argmax(dim=1).to(torch.uint8).cpu()
    return out


def predict_volume(
    model: nn.Module,
    image: np.ndarray,
    data_cfg: DataConfig,
    batch_size: int = 64,
    device: str | torch.device = "cpu",
) -> np.ndarray:
    """Segment a 3D volume as the model was trained to see it; uint8 labels of ``image.shape``.

    ``image``: the volume as stored (any real dtype). Normalised per volume
    (``normalise_intensity``), sliced along ``data_cfg.axis``, each slice resized to
    ``data_cfg.image_size`` (``resize_images``); the logits of each slice are resized back to
    its in-plane size (bilinear) and the argmax taken there, then the slices are restacked.
    The model runs in eval mode under ``torch.inference_mode``; its mode is restored.
    """
    if image.ndim != 3:
        raise ValueError(f"image: expected a 3D volume, got shape {image.shape}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    device = torch.device(device)
    slices = np.moveaxis(normalise_intensity(np.asarray(image, dtype=np.float32)), data_cfg.axis, 0)
    in_plane = (int(slices.shape[1]), int(slices.shape[2]))
    resized = torch.from_numpy(resize_images(slices, data_cfg.image_size))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            labels = _slice_logits(model, resized, in_plane, batch_size, device)
    finally:
        model.train(was_training)
    return np.ascontiguousarray(np.moveaxis(labels.numpy(), 0, data_cfg.axis))


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
    ``trainers.stages.evaluate_model`` scores the resized ``image_size`` slices."""
    preds = [predict_volume(model, v.image, data_cfg, batch_size, device) for v in volumes]
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
) -> dict[str, Any]:
    """What an exported model expects and returns, in words and parameters (JSON-ready)."""
    lo, hi = CLIP_PERCENTILES
    names = {str(k): str(v) for k, v in sorted((class_names or {}).items())}
    return {
        "axis": data_cfg.axis,
        "axis_note": "slices are taken along this axis of the volume as stored (numpy order, "
        "negative counts from the end); predictions are restacked along it",
        "image_size": data_cfg.image_size,
        "in_channels": in_channels,
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
