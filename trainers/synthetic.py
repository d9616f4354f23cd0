"""A small synthetic dataset in the MSD (or nnU-Net v2) layout, shaped like Task04 Hippocampus.

``write_synthetic_msd`` writes ``dataset.json``, ``imagesTr/synth_XXX.nii.gz`` (float32) and
``labelsTr/synth_XXX.nii.gz`` (uint8) with labels {0 background, 1 anterior, 2 posterior};
with ``layout="nnunet"`` the same volumes as ``imagesTr/synth_XXX_0000.nii.gz`` and an nnU-Net
v2 ``dataset.json`` (``channel_names``, ``labels`` name -> id, ``file_ending``, no case list).

Each case holds one curved, tapering tube (the "hippocampus") whose long axis is tilted at random;
voxels are labelled 1 ("anterior", the thick head) or 2 ("posterior", the body and tail) by where
their nearest centre-line point falls along the tube. The image is built so that the task is
learnable but not trivial:

- background tissue intensity varies smoothly and contains bright distractor blobs whose
  intensity overlaps the structure's, so a threshold alone does not segment it;
- the two classes differ only slightly in mean intensity; position along the tube separates them;
- partial-volume edges (a sigmoid of the distance to the surface), Gaussian noise, a smooth
  multiplicative bias field ``exp(0.25 * smooth)`` and a few hot voxels;
- a global intensity scale of ``10**U(1, 5)`` per case, as the real data spans five orders of
  magnitude, so per-volume normalisation is exercised;
- the volume shape itself varies by about +-10 % per axis around ``shape``.

Every case draws from its own generator seeded by ``(seed, case index)``: the bytes depend only
on the seed, the case index and the shape (nibabel writes gzip with a fixed timestamp).

``channels`` > 1 adds further MRI-like contrasts of the same anatomy (``extra_channel``, each
from its own generator seeded by ``(seed, case, channel)``, so channel 0 is the one-channel
dataset's image): a darker structure on brighter tissue whose head and tail differ more than
in channel 0. ``ct=True`` makes the last channel CT-like, in Hounsfield units (air -1000 around
a soft-tissue body of about 40 HU, the structure 60-75 HU), declared "CT" in ``dataset.json``
(train it with ``dataset.ct_window``, e.g. [-100, 200]). An MSD folder stores the channels as
one 4D image (X, Y, Z, C) per case, an nnU-Net v2 folder as ``<case>_0000`` .. ``_000{C-1}``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from trainers.config import DatasetError

# Bumped whenever the generator's output changes for the same arguments.
SYNTHETIC_VERSION = 1
DEFAULT_SHAPE: tuple[int, int, int] = (36, 44, 32)
LABELS = {"0": "background", "1": "anterior", "2": "posterior"}
LAYOUTS = ("msd", "nnunet")

_CENTRE_LINE_POINTS = 48


MRI_NAMES = ("MRI", "T2", "ADC", "FLAIR")


def channel_names(channels: int, ct: bool = False) -> list[str]:
    """The modality of each synthetic channel: MRI contrasts, the last one "CT" when ``ct``."""
    names = [MRI_NAMES[c] if c < len(MRI_NAMES) else f"MR{c}" for c in range(channels)]
    if ct:
        names[-1] = "CT"
    return names


def _marker(
    num_cases: int,
    seed: int,
    shape: tuple[int, int, int],
    layout: str = "msd",
    channels: int = 1,
    ct: bool = False,
) -> dict[str, Any]:
    """What ``dataset.json`` records about how it was generated (compared on reuse). The MSD
    layout's marker names no layout, so its dataset.json (hashed by the data fingerprint) is
    byte-identical to the one written before nnU-Net folders existed."""
    marker: dict[str, Any] = {
        "generator": "semicon-sweep synthetic",
        "version": SYNTHETIC_VERSION,
        "num_cases": num_cases,
        "seed": seed,
        "shape": list(shape),
    }
    if layout != "msd":
        marker["layout"] = layout
    if channels != 1:
        marker["channels"] = channels
    if ct:
        marker["ct"] = True
    return marker


def _validate(num_cases: int, seed: int, shape: tuple[int, ...]) -> tuple[int, int, int]:
    if isinstance(num_cases, bool) or not isinstance(num_cases, int) or num_cases < 1:
        raise ValueError(f"num_cases: must be an integer >= 1, got {num_cases!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed: must be an integer >= 0, got {seed!r}")
    dims = tuple(shape)
    if len(dims) != 3 or any(isinstance(d, bool) or not isinstance(d, int) or d < 8 for d in dims):
        raise ValueError(f"shape: must be three integers >= 8, got {shape!r}")
    return dims  # type: ignore[return-value]


def _smooth_field(rng: np.random.Generator, grid: np.ndarray, waves: int = 4) -> np.ndarray:
    """A smooth random field in about [-1, 1]: a sum of ``waves`` low-frequency cosines.

    ``grid``: (3, X, Y, Z) coordinates scaled to [0, 1]; each wave has at most 1.5 cycles across
    the volume: ``f(x) = sum_k cos(2 pi k_k . x + phi_k) / sqrt(waves / 2)``.
    """
    field = np.zeros(grid.shape[1:], dtype=np.float32)
    for _ in range(waves):
        k = rng.uniform(-1.5, 1.5, size=3).astype(np.float32)
        phase = rng.uniform(0, 2 * math.pi)
        field += np.cos(2 * math.pi * np.tensordot(k, grid, axes=1) + phase)
    return np.clip(field / math.sqrt(waves / 2), -1.5, 1.5)


def _random_rotation(rng: np.random.Generator, max_angle: float) -> np.ndarray:
    """A (3, 3) rotation by an angle up to ``max_angle`` radians about a random axis (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    angle = rng.uniform(-max_angle, max_angle)
    cross = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross


def synthetic_case(
    seed: int, case: int, shape: tuple[int, int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """One case: (image float32 (X, Y, Z), label uint8 (X, Y, Z)) for ``(seed, case)``.

    The tube's centre line is ``p(t) = c + (L/2) t u + b (t^2 - 1/3) v`` for t in [-1, 1], with
    long axis ``u`` near the second (Y) axis, bend direction ``v`` orthogonal to it, and radius
    ``r(t) = r0 (1.2 - 0.4 (t + 1)/2) (1 + 0.1 sin(2 pi f t + phi))``. A voxel at distance d from
    its nearest centre-line point p(t*) is inside when d < r(t*); label 1 if t* < t_split, else 2.
    """
    rng = np.random.default_rng([seed, case])
    jitter = [max(1, d // 10) for d in shape]
    dims = tuple(int(d + rng.integers(-j, j + 1)) for d, j in zip(shape, jitter, strict=True))
    extent = np.array(dims, dtype=np.float64)

    # --- geometry: a bent, tapering tube split into head (1) and tail (2)
    rotation = _random_rotation(rng, max_angle=math.radians(35))
    u = rotation @ np.array([0.0, 1.0, 0.0])
    v = rotation @ np.array([1.0, 0.0, 0.0])
    if rng.random() < 0.5:
        v = -v
    length = rng.uniform(0.55, 0.75) * extent[1]
    bend = rng.uniform(0.05, 0.15) * extent[1]
    r0 = rng.uniform(0.09, 0.13) * extent.min()
    centre = extent / 2 - 0.5 + rng.uniform(-0.08, 0.08, size=3) * extent
    t = np.linspace(-1.0, 1.0, _CENTRE_LINE_POINTS)
    line = centre + np.outer(t * length / 2, u) + np.outer(bend * (t**2 - 1 / 3), v)  # (P, 3)
    radius = r0 * (1.2 - 0.4 * (t + 1) / 2)
    radius *= 1 + 0.1 * np.sin(
        2 * math.pi * rng.uniform(0.5, 1.5) * t + rng.uniform(0, 2 * math.pi)
    )

    coords = np.stack(np.meshgrid(*(np.arange(d) for d in dims), indexing="ij"), axis=-1)
    # nearest centre-line point of every voxel in the tube's bounding box (margin 3 voxels);
    # outside it the signed distance to the surface is set to -10 (far outside)
    margin = radius.max() + 3
    lo = np.maximum(np.floor(line.min(0) - margin), 0).astype(int)
    hi = np.minimum(np.ceil(line.max(0) + margin) + 1, extent).astype(int)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))
    points = coords[box].reshape(-1, 3).astype(np.float32)  # (Nb, 3)
    box_line = line.astype(np.float32)
    sq = sum((points[:, k, None] - box_line[None, :, k]) ** 2 for k in range(3))  # (Nb, P)
    box_nearest = sq.argmin(axis=1)
    box_distance = np.sqrt(sq[np.arange(len(points)), box_nearest])
    nearest = np.zeros(dims, dtype=np.int64)
    surface = np.full(dims, -10.0, dtype=np.float32)  # radius - distance: > 0 inside
    nearest[box] = box_nearest.reshape(coords[box].shape[:3])
    surface[box] = (radius[box_nearest] - box_distance).reshape(coords[box].shape[:3])
    split_at = np.searchsorted(t, rng.uniform(-0.15, 0.15))
    label = np.zeros(dims, dtype=np.uint8)
    inside = surface > 0
    label[inside] = np.where(nearest[inside] < split_at, 1, 2)

    # --- appearance
    grid = np.moveaxis(coords / np.maximum(extent - 1, 1), -1, 0).astype(np.float32)  # (3, X, Y, Z)
    tissue = 0.38 + 0.12 * _smooth_field(rng, grid)
    for _ in range(int(rng.integers(2, 5))):  # bright distractors overlapping the structure's range
        blob_centre = rng.uniform(0.1, 0.9, size=3)[:, None, None, None]
        blob_radius = rng.uniform(0.06, 0.14)
        blob = np.exp(-((grid - blob_centre) ** 2).sum(0) / (2 * blob_radius**2))
        tissue += rng.uniform(0.15, 0.3) * blob
    head, tail = 0.62 + rng.uniform(-0.04, 0.04), 0.56 + rng.uniform(-0.04, 0.04)
    structure = np.where(label == 1, head, tail)
    structure[~inside] = np.where(nearest < split_at, head, tail)[~inside]
    partial_volume = 1 / (1 + np.exp(-surface / 0.6))  # soft edges
    rim = np.exp(-((surface + 1.2) ** 2) / 0.8)  # a thin darker band just outside the surface
    image = tissue * (1 - partial_volume) + structure * partial_volume - 0.12 * rim
    image += rng.normal(0.0, rng.uniform(0.06, 0.09), size=dims)
    image *= np.exp(0.25 * _smooth_field(rng, grid))  # bias field
    image = np.maximum(image, 0.0)
    hot = rng.random(dims) < 5e-4
    image[hot] *= rng.uniform(4, 8, size=int(hot.sum()))
    image *= 10 ** rng.uniform(1, 5)
    return image.astype(np.float32), label


def extra_channel(
    seed: int, case: int, channel: int, label: np.ndarray, ct: bool = False
) -> np.ndarray:
    """Channel ``channel`` (>= 1) of case ``case``: another contrast of ``label``'s anatomy,
    float32 of its shape (see the module docstring); CT-like in Hounsfield units when ``ct``."""
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng([seed, case, channel])
    dims = label.shape
    grid = np.stack(
        np.meshgrid(*(np.linspace(0, 1, d, dtype=np.float32) for d in dims), indexing="ij")
    )
    soft = [gaussian_filter((label == k).astype(np.float32), 0.8) for k in (1, 2)]
    if ct:
        radii = rng.uniform(0.6, 0.7, size=3)[:, None, None, None]
        body = ((grid - 0.5) ** 2 / radii**2).sum(0) < 1
        image = np.where(body, 40.0 + 15.0 * _smooth_field(rng, grid), -1000.0)
        image += soft[0] * rng.uniform(25, 35) + soft[1] * rng.uniform(15, 25)
        image += rng.normal(0.0, 12.0, size=dims)
        return image.astype(np.float32)
    tissue = 0.6 + 0.1 * _smooth_field(rng, grid)
    head, tail = 0.2 + rng.uniform(-0.03, 0.03), 0.38 + rng.uniform(-0.03, 0.03)
    image = tissue * (1 - soft[0] - soft[1]) + head * soft[0] + tail * soft[1]
    image += rng.normal(0.0, rng.uniform(0.05, 0.08), size=dims)
    image *= np.exp(0.2 * _smooth_field(rng, grid))
    return (np.maximum(image, 0.0) * 10 ** rng.uniform(1, 4)).astype(np.float32)


def _is_same_dataset(dataset_json: Path, marker: dict[str, Any]) -> bool:
    """True when ``dataset_json`` records exactly this generator, version and arguments."""
    try:
        meta = json.loads(dataset_json.read_text())
    except (OSError, ValueError) as err:
        raise DatasetError(f"{dataset_json}: unreadable ({err})") from err
    return isinstance(meta, dict) and meta.get("synthetic") == marker


def write_synthetic_msd(
    root: str | os.PathLike[str],
    num_cases: int = 24,
    seed: int = 0,
    shape: tuple[int, int, int] = DEFAULT_SHAPE,
    layout: str = "msd",
    channels: int = 1,
    ct: bool = False,
) -> Path:
    """Write the synthetic dataset to ``root`` and return ``root``.

    ``layout``: "msd" (dataset.json with a ``training`` list, ``imagesTr/<case>.nii.gz``) or
    "nnunet" (nnU-Net v2: ``imagesTr/<case>_0000.nii.gz``, ``labels`` as name -> id); the
    volumes are the same either way. ``channels``: input channels (MSD: one 4D image per case;
    nnU-Net: ``_0000`` .. ``_000{C-1}``), declared in ``dataset.json`` (``modality`` /
    ``channel_names``); ``ct``: the last channel CT-like (module docstring).

    The folder is built under a temporary sibling name and renamed into place with
    ``dataset.json`` written last, so ``root`` is never a half-written dataset. If ``root``
    already holds the dataset for the same (version, num_cases, seed, shape) it is left as is;
    any other non-empty ``root`` raises ``DatasetError`` naming it.
    """
    import nibabel as nib  # here: planning a synthetic sweep imports this module, not nibabel

    dims = _validate(num_cases, seed, shape)
    if layout not in LAYOUTS:
        raise ValueError(f"layout: must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or not 1 <= channels <= 16:
        raise ValueError(f"channels: must be an integer in 1..16, got {channels!r}")
    nnunet = layout == "nnunet"
    root = Path(root)
    marker = _marker(num_cases, seed, dims, layout, channels, bool(ct))
    names = channel_names(channels, bool(ct))
    declared = {str(c): name for c, name in enumerate(names)}
    if _existing_matches(root, marker):
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=root.parent))
    try:
        (staging / "imagesTr").mkdir()
        (staging / "labelsTr").mkdir()
        affine = np.eye(4)
        affine[:3, 3] = 1.0  # identity plus a (1, 1, 1) offset, like the real Hippocampus files
        training = []
        for case in range(num_cases):
            image, label = synthetic_case(seed, case, dims)
            images = [image] + [
                extra_channel(seed, case, c, label, ct=ct and c == channels - 1)
                for c in range(1, channels)
            ]
            if ct and channels == 1:
                images = [extra_channel(seed, case, 1, label, ct=True)]
            name = f"synth_{case:03d}.nii.gz"
            if nnunet:
                files = {f"synth_{case:03d}_{c:04d}.nii.gz": data for c, data in enumerate(images)}
            else:
                files = {name: images[0] if channels == 1 else np.stack(images, axis=-1)}
            for file_name, data in files.items():
                image_nii = nib.Nifti1Image(data, affine)
                image_nii.header.set_data_dtype(np.float32)
                nib.save(image_nii, staging / "imagesTr" / file_name)
            label_nii = nib.Nifti1Image(label, affine)
            label_nii.header.set_data_dtype(np.uint8)
            nib.save(label_nii, staging / "labelsTr" / name)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        dataset: dict[str, Any] = {
            "name": "Synthetic",
            "description": "Synthetic Hippocampus-like tubes split into anterior and posterior parts",
            "tensorImageSize": "3D",
            "modality": declared,
            "labels": LABELS,
            "numTraining": num_cases,
            "numTest": 0,
            "training": training,
            "test": [],
            "synthetic": marker,
        }
        if nnunet:
            dataset = {
                "name": dataset["name"],
                "description": dataset["description"],
                "channel_names": declared,
                "labels": {name: int(value) for value, name in LABELS.items()},
                "numTraining": num_cases,
                "file_ending": ".nii.gz",
                "synthetic": marker,
            }
        (staging / "dataset.json").write_text(json.dumps(dataset, indent=2))
        try:
            os.rename(staging, root)  # atomic; replaces an empty folder
        except OSError:
            # another process renamed its identical copy first, or root is foreign
            if not _existing_matches(root, marker):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


def _existing_matches(root: Path, marker: dict[str, Any]) -> bool:
    """Whether ``root`` already holds this dataset; False when absent or an empty folder."""
    if not root.exists():
        return False
    if not root.is_dir():
        raise DatasetError(f"{root}: exists and is not a folder")
    dataset_json = root / "dataset.json"
    if dataset_json.is_file():
        if _is_same_dataset(dataset_json, marker):
            return True
        raise DatasetError(
            f"{dataset_json}: not the synthetic dataset asked for "
            f"(num_cases={marker['num_cases']}, seed={marker['seed']}, shape={marker['shape']}, "
            f"version={marker['version']}, layout={marker.get('layout', 'msd')}, "
            f"channels={marker.get('channels', 1)}, ct={marker.get('ct', False)}); "
            "use another root or remove this folder"
        )
    if any(root.iterdir()):
        raise DatasetError(
            f"{root}: folder is not empty and holds no dataset.json; refusing to overwrite it"
        )
    return False
