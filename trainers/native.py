"""Test metrics on each volume's own voxel grid: Dice, HD95 and surface Dice (NSD) in mm.

The fine-tuning node's ``test_dice_*`` score the ``image_size`` x ``image_size`` slices the
model sees (the reference code's numbers). ``score_test_volumes`` scores the same model on the
original voxel grid of each test volume instead: its logits on the cached slices of a volume
are taken back to each slice's own grid exactly as ``trainers.inference.predict_volume`` does
(resized bilinearly, antialiased when shrinking; under ``dataset.spacing`` to the slice's
square, then the padding cropped and the resampling undone), the argmax is taken there and the
slices are restacked along the slicing axis; the map is compared with the volume's checked
label map on the same grid. That grid is the stored one; under ``dataset.reorient: canonical``
its axes are permuted and flipped to RAS (the same voxels, with the voxel sizes permuted
alike): no metric here depends on the order or direction of the axes, so the numbers are
those of the stored grid (a test checks them against ``predict_volume``'s maps on CPU; on
CUDA the logits are those of the test pass's bf16 autocast, which the model-sized ``test_*``
Dice shares, where ``predict_volume`` runs in float32, so the two can differ in a few voxels).

Where the data comes from (a worker may not see the dataset's NIfTI folder): the preparation
(``trainers.data.prepare_slices``) writes ``<cache>/native/`` beside the slice cache in the
same pass over the dataset (``NativeSidecar``): ``labels.u8`` (raw uint8: every case's checked
label map, flattened in C order, one after the other) and ``meta.json`` (format, fingerprint,
the slicing axis, ``reorient`` and in-plane ``spacing`` of the cache, and per case its name,
shape, offset into ``labels.u8`` and voxel sizes in mm: those of its affine, i.e. of its NIfTI
header, ``trainers.msd.voxel_sizes``). The slice cache's own files and fingerprint are
untouched; a cache written before the sidecar existed gets it at the next ``prepare_slices``
(``write_native_sidecar``, a pass of its own). ``load_native`` memory-maps it.

The way back undoes every geometric step of today's preprocessing (in-plane resampling and
padding, the resize). A dataset setting added later that it does not undo, set to other than
its default, is recorded in the sidecar's ``not_inverted``, and the native metrics are then
skipped with a warning instead of being computed on a misaligned grid.

Metrics (class k = 1 .. K - 1; background is never scored), ``test_native_`` +:

- ``dice_pooled_c{k}`` / ``_mean``, ``dice_volume_c{k}`` / ``_mean``, ``n_volumes``: as
  ``trainers.metrics.dice_scores`` (pooled over all test voxels; per volume, then averaged).
- ``hd95_c{k}`` / ``_mean`` (mm): per volume the 95th-percentile symmetric Hausdorff distance,
  max(P95 of the distances from each predicted boundary voxel to the nearest reference boundary
  voxel, P95 of the reverse), boundary voxels being mask voxels with a 6-neighbour outside,
  distances Euclidean between voxel centres scaled by the spacing; then averaged over volumes.
- ``nsd_c{k}`` / ``_mean``: per volume the normalised surface Dice at tolerance tau
  (``nsd_tolerance_mm``, default 1 mm, Nikolov et al. 2021): the fraction of boundary voxels of
  both masks lying within tau of the other's boundary; then averaged over volumes.
- ``hd95_undefined``: how many (volume, class) pairs had exactly one of prediction and
  reference empty (their HD95 is NaN, see below).

Both surface metrics come from MONAI (``monai.metrics.utils.get_edge_surface_distance``, the
function behind its ``compute_hausdorff_distance(percentile=95)`` and ``compute_surface_dice``;
the tests check that the numbers agree with those two): boundaries and distances are computed
once per (volume, class) and both metrics read them.

Empty masks (per volume and class; Metrics Reloaded, Maier-Hein et al. 2024, asks that the
handling of cases where a metric is undefined be stated: here an undefined value stays NaN, is
left out of the means rather than replaced by a made-up one, and how often it happened is
reported): class absent from both prediction and reference: Dice, HD95 and NSD
NaN (nothing to score); present in only one: Dice 0 and NSD 0 (both well defined: no overlap,
no boundary within tolerance), HD95 NaN (there is no distance to an empty set; counted in
``hd95_undefined`` so that the NaNs skipped by the means are visible). Every mean skips NaN;
a mean over nothing is NaN.

Imports no Ray and nothing of ``orchestrator``; MONAI and nibabel are imported where used.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.metrics import dice_scores, volume_confusion

if TYPE_CHECKING:
    from trainers.config import DataConfig, FinetuneConfig
    from trainers.data import SliceData
    from trainers.loop import Dist, StageContext
    from trainers.msd import Volume

NATIVE_FOLDER = "native"  # <slice cache>/native/
# DataConfig settings whose preprocessing the way back inverts or leaves the grid alone (slicing
# along ``axis``, intensity normalisation, reorientation, in-plane resampling and padding, the
# resize to ``image_size``); a setting added later at a value other than its default is not
# inverted here, and the native metrics are then skipped with a warning rather than wrong
_INVERTED_SETTINGS = frozenset(
    {
        "kind",
        "root",
        "image_size",
        "axis",
        "label_remap",
        "synthetic_cases",
        "synthetic_seed",
        "flip_axes",
        "ct_window",  # intensities only
        "reorient",  # the same voxels, axes permuted and flipped (module docstring)
        "spacing",  # undone: from_square
    }
)
LABELS_FILE = "labels.u8"  # raw uint8, the label maps one after the other (C order)
_NATIVE_FORMAT = 1
DEFAULT_NSD_TOLERANCE_MM = 1.0


# ---------------------------------------------------------------------------------------------
# the sidecar: native label maps and spacings beside the slice cache


@dataclass(frozen=True, eq=False)
class NativeLabels:
    """Every case's checked label map (uint8) on the grid its slices were cut from (module
    docstring) and that grid's voxel sizes (mm), by case index (the slice cache's ``cases``
    order); ``axis`` (0..2), ``reorient`` and ``in_plane_spacing``: the slice cache's
    preprocessing (the way back undoes ``in_plane_spacing``)."""

    cases: tuple[str, ...]
    shapes: tuple[tuple[int, int, int], ...]
    spacings: tuple[tuple[float, float, float], ...]
    offsets: tuple[int, ...]
    flat: np.ndarray
    axis: int
    not_inverted: tuple[str, ...] = ()
    reorient: str = "none"  # DataConfig.reorient of the slice cache
    in_plane_spacing: tuple[float, float] | None = None  # DataConfig.spacing of the slice cache

    def label(self, index: int) -> np.ndarray:
        """Case ``index``'s label map, (X, Y, Z) uint8 (a read-only view)."""
        shape = self.shapes[index]
        start = self.offsets[index]
        return self.flat[start : start + math.prod(shape)].reshape(shape)


class NativeSidecar:
    """Builds ``<cache>/native/`` while the preparation reads the volumes (one pass over the
    dataset): ``tap`` passes the checked volumes through, appending each label map to a staging
    folder beside the cache (memory: nothing beyond the volume in hand); ``install`` writes
    ``meta.json`` and renames the staging folder into the cache folder (a concurrent writer's
    identical copy is kept); leaving the ``with`` block without ``install`` discards it."""

    def __init__(self, cfg: DataConfig, parent: str | os.PathLike[str]) -> None:
        Path(parent).mkdir(parents=True, exist_ok=True)
        self.cfg = cfg
        self.staging = Path(tempfile.mkdtemp(prefix=f".{NATIVE_FOLDER}.tmp-", dir=parent))
        self._handle = (self.staging / LABELS_FILE).open("wb")
        self._cases: list[dict[str, Any]] = []
        self._voxels = 0

    def __enter__(self) -> NativeSidecar:
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)

    def tap(self, volumes: Iterable[Volume]) -> Iterator[Volume]:
        """``volumes`` unchanged, each label map appended to the sidecar on its way through."""
        for volume in volumes:
            label = np.ascontiguousarray(volume.label, dtype=np.uint8)
            self._cases.append(
                {
                    "case": volume.case,
                    "shape": [int(n) for n in label.shape],
                    "spacing": list(volume.zooms),  # voxel sizes of its affine, in mm
                    "offset": self._voxels,
                }
            )
            self._handle.write(label.tobytes())
            self._voxels += label.size
            del label
            yield volume
            del volume

    def install(self, folder: str | os.PathLike[str], fingerprint: str) -> Path:
        """Complete the sidecar and move it to ``folder/native/``; returns that path."""
        from trainers.config import hash_form, to_dict

        self._handle.flush()
        os.fsync(self._handle.fileno())
        self._handle.close()
        cfg = self.cfg
        meta = {
            "format": _NATIVE_FORMAT,
            "fingerprint": fingerprint,
            "axis": cfg.axis % 3,
            "reorient": cfg.reorient,
            "in_plane_spacing": list(cfg.spacing) if cfg.spacing is not None else None,
            # settings whose preprocessing the way back would not undo (see above)
            "not_inverted": sorted(set(hash_form(to_dict(cfg))) - _INVERTED_SETTINGS),
            "cases": [c["case"] for c in self._cases],
            "shapes": [c["shape"] for c in self._cases],
            "spacings": [c["spacing"] for c in self._cases],
            "offsets": [c["offset"] for c in self._cases],
            "voxels": self._voxels,
        }
        with open(self.staging / "meta.json", "w") as handle:  # synced before the rename
            handle.write(json.dumps(meta))
            handle.flush()
            os.fsync(handle.fileno())
        target = Path(folder) / NATIVE_FOLDER
        try:
            os.rename(self.staging, target)
        except OSError:
            if not (target / "meta.json").is_file():
                raise
        return target


def write_native_sidecar(cfg: DataConfig, folder: str | os.PathLike[str]) -> Path:
    """Add ``folder/native/`` to a slice cache written without it (by a version before the
    sidecar existed, or left unreadable by a crash), in a pass of its own over the dataset
    (``trainers.msd.iter_checked``, as the preparation reads it); nothing when a readable one
    is there. Returns its path."""
    from trainers.msd import iter_checked, scan_layout

    target = Path(folder) / NATIVE_FOLDER
    if load_native(folder) is not None:
        return target
    shutil.rmtree(target, ignore_errors=True)  # absent, or left unreadable by a crash
    fingerprint = json.loads((Path(folder) / "meta.json").read_text())["fingerprint"]
    with NativeSidecar(cfg, Path(folder).parent) as sidecar:
        volumes = iter_checked(scan_layout(cfg.root), cfg.label_remap, cfg.reorient)
        for volume in sidecar.tap(volumes):
            del volume
        return sidecar.install(folder, fingerprint)


def load_native(folder: str | os.PathLike[str] | None) -> NativeLabels | None:
    """The sidecar of the slice cache ``folder`` (labels memory-mapped), None when absent."""
    if folder is None:
        return None
    target = Path(folder) / NATIVE_FOLDER
    if not (target / "meta.json").is_file():
        return None
    try:  # an unreadable sidecar is no sidecar: the node warns and skips the native metrics
        meta = json.loads((target / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != _NATIVE_FORMAT:
        return None
    return NativeLabels(
        cases=tuple(meta["cases"]),
        shapes=tuple(tuple(int(n) for n in s) for s in meta["shapes"]),  # type: ignore[misc]
        spacings=tuple(tuple(float(z) for z in s) for s in meta["spacings"]),  # type: ignore[misc]
        offsets=tuple(int(o) for o in meta["offsets"]),
        flat=(
            np.memmap(target / LABELS_FILE, dtype=np.uint8, mode="r", shape=(meta["voxels"],))
            if meta["voxels"]
            else np.zeros(0, dtype=np.uint8)
        ),
        axis=int(meta["axis"]),
        not_inverted=tuple(meta.get("not_inverted", ())),
        reorient=meta["reorient"],
        in_plane_spacing=(
            tuple(meta["in_plane_spacing"]) if meta["in_plane_spacing"] is not None else None
        ),
    )


# ---------------------------------------------------------------------------------------------
# surface metrics of one volume (MONAI)


def surface_metrics(
    pred: np.ndarray | Tensor,
    target: np.ndarray | Tensor,
    spacing: Sequence[float],
    num_classes: int,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
) -> tuple[np.ndarray, np.ndarray, int]:
    """HD95 (mm) and NSD at ``tolerance_mm`` of each foreground class of one volume.

    ``pred``, ``target``: integer label maps of one shape (2D or 3D); ``spacing``: mm per voxel
    along each axis. Returns (hd95, nsd), each (num_classes - 1,) float64, and the number of
    classes present in exactly one of the two maps (their HD95 is NaN; module docstring).
    """
    from monai.metrics.utils import get_edge_surface_distance

    if not (isinstance(tolerance_mm, int | float) and math.isfinite(tolerance_mm)):
        raise ValueError(f"tolerance_mm: must be a finite number >= 0, got {tolerance_mm!r}")
    if tolerance_mm < 0:
        raise ValueError(f"tolerance_mm: must be a finite number >= 0, got {tolerance_mm!r}")
    pred_t, target_t = torch.as_tensor(np.array(pred)), torch.as_tensor(np.array(target))
    if pred_t.shape != target_t.shape:
        raise ValueError(
            f"pred shape {tuple(pred_t.shape)} != target shape {tuple(target_t.shape)}"
        )
    if len(spacing) != pred_t.ndim:
        raise ValueError(f"spacing {tuple(spacing)}: needs one value per axis of {pred_t.ndim}")
    hd95 = np.full(num_classes - 1, np.nan)
    nsd = np.full(num_classes - 1, np.nan)
    undefined = 0
    for k in range(1, num_classes):
        p, g = pred_t == k, target_t == k
        has_p, has_g = bool(p.any()), bool(g.any())
        if not (has_p or has_g):
            continue
        if has_p != has_g:
            nsd[k - 1], undefined = 0.0, undefined + 1
            continue
        with warnings.catch_warnings():  # MONAI 1.5+ warns about an argument of its own call
            warnings.simplefilter("ignore", FutureWarning)
            _, (to_target, to_pred), _ = get_edge_surface_distance(
                p, g, spacing=tuple(float(s) for s in spacing), symmetric=True
            )
        hd95[k - 1] = max(
            float(torch.quantile(to_target.double(), 0.95)),
            float(torch.quantile(to_pred.double(), 0.95)),
        )
        within = (to_target <= tolerance_mm).sum() + (to_pred <= tolerance_mm).sum()
        nsd[k - 1] = float(within) / (len(to_target) + len(to_pred))
    return hd95, nsd, undefined


# ---------------------------------------------------------------------------------------------
# the fine-tuning node's test metrics: model-sized and native, from one forward pass


def _predict_volume_slices(
    model: nn.Module,
    slices: np.ndarray,
    native: NativeLabels,
    volume: int,
    device: torch.device,
    batch_size: int,
) -> tuple[Tensor, np.ndarray]:
    """One volume's cached (n, C, S, S) slices -> the argmax at the model's size, (n, S, S)
    uint8 on ``device``, and the label map on the volume's own grid (the sidecar's, uint8): the
    logits taken back to each slice's own grid as ``trainers.inference.predict_volume`` does
    (resized to the slice's square and the padding undone under ``spacing``, else resized
    straight to its in-plane size; bilinear), the argmax there, the slices restacked along
    ``axis``."""
    from trainers.data import SliceGeometry, from_square, in_plane_zooms
    from trainers.loop import autocast, device_memory_format

    axis, grid_shape = native.axis, native.shapes[volume]
    in_plane = tuple(n for i, n in enumerate(grid_shape) if i != axis)
    if slices.shape[0] != grid_shape[axis]:
        raise ValueError(
            f"{slices.shape[0]} cached slices for a volume of {grid_shape[axis]} along axis "
            f"{axis} (shape {grid_shape}): the native metrics need one cached slice per slice"
        )
    geometry = SliceGeometry.of(
        in_plane, in_plane_zooms(native.spacings[volume], axis), native.in_plane_spacing
    )
    back = (geometry.square, geometry.square) if geometry.square else geometry.in_plane
    small = torch.empty((slices.shape[0], *slices.shape[-2:]), dtype=torch.uint8, device=device)
    out = torch.empty((slices.shape[0], *in_plane), dtype=torch.uint8)
    for start in range(0, slices.shape[0], batch_size):
        batch = torch.from_numpy(np.ascontiguousarray(slices[start : start + batch_size]))
        x = batch.unsqueeze(1) if batch.ndim == 3 else batch  # (b, H, W) or (b, C, H, W)
        x = x.to(device).contiguous(memory_format=device_memory_format(device))
        with autocast(device):
            logits = model(x)
        stop = start + x.shape[0]
        small[start:stop] = logits.argmax(dim=1).to(torch.uint8)
        logits = logits.float()
        if tuple(logits.shape[-2:]) != back:
            logits = F.interpolate(
                logits, size=back, mode="bilinear", align_corners=False, antialias=True
            )
        logits = from_square(logits, geometry)
        out[start:stop] = logits.argmax(dim=1).to(torch.uint8).cpu()
    return small, np.ascontiguousarray(np.moveaxis(out.numpy(), 0, axis))


def score_test_volumes(
    model: nn.Module,
    data: SliceData,
    volumes: Sequence[int],
    device: torch.device,
    tolerance_mm: float = DEFAULT_NSD_TOLERANCE_MM,
    native: NativeLabels | None = None,
    batch_size: int | None = None,
    dist: Dist | None = None,
) -> dict[str, float]:
    """``model``'s test metrics, both kinds from one forward pass over the slices of ``volumes``:
    ``test_*`` (exactly ``trainers.stages.evaluate_model``'s Dice at the model's input size,
    prefixed ``test_``) and ``test_*`` on the original voxel grid (``test_native_*``, module
    docstring), plus ``native_eval_seconds`` (seconds the whole took) and ``native_nsd_tolerance_mm``.

    ``native``: the sidecar (default ``load_native(data.cache_folder)``); without one only
    ``evaluate_model``'s metrics are returned and a warning says why. {} for no volumes.
    With ``dist`` of world > 1 (every rank must call) rank r scores volumes r, r + world, ...
    and the per-volume numbers are summed across ranks: every rank returns the same metrics.
    The model's train/eval mode is restored.
    """
    from trainers.loop import Dist
    from trainers.model import unwrap_model
    from trainers.stages import eval_batch_size, evaluate_model

    started = time.perf_counter()
    if not volumes:
        return {}
    device = torch.device(device)
    native = native if native is not None else load_native(getattr(data, "cache_folder", None))
    if native is None or native.not_inverted:
        why = (
            "the slice cache has no native/ sidecar (prepare_slices writes it)"
            if native is None
            else f"dataset settings {list(native.not_inverted)} are not inverted by the resize "
            "back to the stored grid"
        )
        warnings.warn(f"native test metrics skipped: {why}", stacklevel=2)
        scores = evaluate_model(model, data, tuple(volumes), device, batch_size, dist)
        return {f"test_{key}": float(value) for key, value in scores.items()}
    if native.cases != tuple(data.cases):
        raise ValueError("native sidecar: its cases differ from the slice cache's")
    batch_size = batch_size or eval_batch_size(device)
    dist = dist or Dist()
    num_classes = data.num_classes
    count = len(volumes)
    at_size = torch.zeros((count, num_classes, num_classes), dtype=torch.int64, device=device)
    at_native = torch.zeros_like(at_size)
    surface = torch.zeros((count, 2, num_classes - 1), dtype=torch.float64, device=device)
    undefined = torch.zeros((), dtype=torch.float64, device=device)
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    try:
        with torch.inference_mode():
            for position in range(dist.rank, count, dist.world):
                volume = int(volumes[position])
                rows = data.slices_of((volume,))
                small, pred = _predict_volume_slices(
                    module, data.images[rows], native, volume, device, batch_size
                )
                labels = torch.from_numpy(np.ascontiguousarray(data.labels[rows])).to(device)
                group = torch.zeros(len(rows), dtype=torch.int64, device=device)
                at_size[position] = volume_confusion(small, labels, group, 1, num_classes)[0]
                target = np.array(native.label(volume))
                at_native[position] = volume_confusion(
                    torch.from_numpy(pred.reshape(1, 1, -1)).to(device),
                    torch.from_numpy(target.reshape(1, 1, -1)).to(device),
                    group[:1],
                    1,
                    num_classes,
                )[0]
                hd95, nsd, missing = surface_metrics(
                    pred, target, native.spacings[volume], num_classes, tolerance_mm
                )
                surface[position, 0] = torch.from_numpy(hd95)
                surface[position, 1] = torch.from_numpy(nsd)
                undefined += missing
            for table in (at_size, at_native, surface, undefined):
                dist.all_reduce(table)
    finally:
        module.train(was_training)

    metrics = {f"test_{key}": float(value) for key, value in dice_scores(at_size.cpu()).items()}
    for key, value in dice_scores(at_native.cpu()).items():
        metrics[f"test_native_{key}"] = float(value)
    per_class = surface.cpu().nanmean(dim=0)  # (2, K - 1): NaN volumes skipped
    for row, name in enumerate(("hd95", "nsd")):
        for k in range(1, num_classes):
            metrics[f"test_native_{name}_c{k}"] = float(per_class[row, k - 1])
        metrics[f"test_native_{name}_mean"] = float(per_class[row].nanmean())
    metrics["test_native_hd95_undefined"] = float(undefined)
    metrics["native_nsd_tolerance_mm"] = float(tolerance_mm)
    metrics["native_eval_seconds"] = time.perf_counter() - started
    return metrics


def finetune_test_metrics(
    cfg: FinetuneConfig, model: nn.Module, ctx: StageContext, dist: Dist | None = None
) -> dict[str, float]:
    """The fine-tuning node's final test metrics on ``ctx.split.test``: with
    ``cfg.native_eval``, ``score_test_volumes`` at ``cfg.nsd_tolerance_mm`` (model-sized and native
    from one forward pass); else ``evaluate_model``'s Dice alone, as ``test_*``."""
    from trainers.stages import evaluate_model

    if cfg.native_eval:
        return score_test_volumes(
            model, ctx.data, ctx.split.test, ctx.device, cfg.nsd_tolerance_mm, dist=dist
        )
    scores = evaluate_model(model, ctx.data, ctx.split.test, ctx.device, dist=dist)
    return {f"test_{key}": float(value) for key, value in scores.items()}
