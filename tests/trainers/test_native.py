"""Native-resolution test metrics (trainers.native): the sidecar, HD95 / surface Dice against
hand-computed cases, the empty-mask rules, and the fine-tuning node's columns."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from trainers.config import (
    LATE_DEFAULTS,
    DataConfig,
    FinetuneConfig,
    ModelConfig,
    SplitConfig,
    hash_form,
)
from trainers.config import to_dict as config_dict
from trainers.data import (
    SliceData,
    labelled_subset,
    load_slice_cache,
    make_split,
    prepare_slices,
)
from trainers.inference import predict_volume
from trainers.loop import StageContext
from trainers.model import UNet
from trainers.msd import load_msd, to_canonical
from trainers.native import (
    NATIVE_FOLDER,
    NativeLabels,
    load_native,
    score_test_volumes,
    surface_metrics,
    write_native_sidecar,
)
from trainers.stages import evaluate_model, run_finetune

pytestmark = pytest.mark.usefixtures("one_torch_thread")

CPU = torch.device("cpu")
TINY = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=16, local_hidden=8)


def _model(num_classes: int, seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    return UNet(TINY, in_channels=1, num_classes=num_classes).eval()


# ---------------------------------------------------------------------------------------------
# surface metrics: hand-computed cases (one-voxel-thick plates: every voxel is on the boundary)


def _plate(shape: tuple[int, int, int], x: int, ys: range, zs: range) -> np.ndarray:
    mask = np.zeros(shape, dtype=np.uint8)
    mask[x, ys.start : ys.stop, zs.start : zs.stop] = 1
    return mask


def test_plates_offset_along_an_anisotropic_axis() -> None:
    """Two 5 x 5 plates 2 voxels apart along axis 0 at 1.5 mm: every boundary distance is 3 mm,
    so HD95 = 3 mm and the surface Dice is 0 below a 3 mm tolerance and 1 from it on."""
    shape, spacing = (8, 7, 7), (1.5, 0.5, 2.0)
    a = _plate(shape, 2, range(1, 6), range(1, 6))
    b = _plate(shape, 4, range(1, 6), range(1, 6))
    for tolerance, expected in ((2.9, 0.0), (3.0, 1.0)):
        hd95, nsd, undefined = surface_metrics(a, b, spacing, 2, tolerance)
        assert hd95 == pytest.approx([3.0]) and nsd == pytest.approx([expected])
        assert undefined == 0
    # along axis 2 (2 mm per voxel) one voxel apart: 2 mm
    c = np.zeros(shape, dtype=np.uint8)
    d = np.zeros(shape, dtype=np.uint8)
    c[1:6, 1:6, 2], d[1:6, 1:6, 3] = 1, 1
    hd95, nsd, _ = surface_metrics(c, d, spacing, 2, 1.0)
    assert hd95 == pytest.approx([2.0]) and nsd == pytest.approx([0.0])


def test_partial_overlap_hd95_and_surface_dice_by_hand() -> None:
    """Reference: a 5 x 5 plate; prediction: its rows y = 1..3 (15 voxels). Reference voxels
    at y = 4 lie 0.5 mm (one 0.5 mm row) from the prediction, at y = 5 1 mm; the rest 0.
    Reference -> prediction distances: 15 x 0, 5 x 0.5, 5 x 1.0, P95 (linear) = 1.0; prediction
    -> reference: all 0. At 0.75 mm the surface Dice is (15 + 15 + 5) / (15 + 25) = 0.875."""
    shape, spacing = (5, 8, 7), (1.5, 0.5, 2.0)
    reference = _plate(shape, 2, range(1, 6), range(1, 6))
    prediction = _plate(shape, 2, range(1, 4), range(1, 6))
    hd95, nsd, undefined = surface_metrics(prediction, reference, spacing, 2, 0.75)
    assert hd95 == pytest.approx([1.0])
    assert nsd == pytest.approx([0.875])
    assert undefined == 0
    # per class: class 2 placed elsewhere with a perfect prediction
    reference[0, 0, 0] = prediction[0, 0, 0] = 2
    hd95, nsd, _ = surface_metrics(prediction, reference, spacing, 3, 0.75)
    assert hd95 == pytest.approx([1.0, 0.0]) and nsd == pytest.approx([0.875, 1.0])


def test_empty_mask_rules() -> None:
    """Absent from both: NaN, NaN. In one only: HD95 NaN (counted), surface Dice 0."""
    shape = (6, 6, 6)
    present = np.zeros(shape, dtype=np.uint8)
    present[2:4, 2:4, 2:4] = 1
    empty = np.zeros(shape, dtype=np.uint8)
    hd95, nsd, undefined = surface_metrics(empty, empty, (1.0, 1.0, 1.0), 2)
    assert math.isnan(hd95[0]) and math.isnan(nsd[0]) and undefined == 0
    for pred, target in ((empty, present), (present, empty)):
        hd95, nsd, undefined = surface_metrics(pred, target, (1.0, 1.0, 1.0), 2)
        assert math.isnan(hd95[0]) and nsd[0] == 0.0 and undefined == 1


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI 1.6 about its own call
def test_surface_metrics_agree_with_monai_public_functions() -> None:
    """The one-pass HD95 / NSD equal MONAI's compute_hausdorff_distance(percentile=95) and
    compute_surface_dice on random blobs with anisotropic spacing."""
    from monai.metrics import compute_hausdorff_distance, compute_surface_dice

    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.arange(n) for n in (14, 16, 12)], indexing="ij"), -1)
    spacing = (1.2, 0.7, 2.5)

    def blobs() -> np.ndarray:
        labels = np.zeros(grid.shape[:3], dtype=np.uint8)
        for k in (1, 2):
            centre = rng.uniform(3, 9, size=3)
            radius = rng.uniform(2.5, 4.0)
            labels[np.linalg.norm(grid - centre, axis=-1) < radius] = k
        return labels

    pred, target = blobs(), blobs()
    hd95, nsd, _ = surface_metrics(pred, target, spacing, 3, 1.5)

    def one_hot(labels: np.ndarray) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.from_numpy(labels).long(), 3).permute(3, 0, 1, 2)

    p, t = one_hot(pred)[None].float(), one_hot(target)[None].float()
    expected_hd = compute_hausdorff_distance(p, t, percentile=95, spacing=spacing)[0]
    expected_nsd = compute_surface_dice(p, t, [1.5, 1.5], spacing=spacing)[0]
    np.testing.assert_allclose(hd95, expected_hd.double().numpy(), rtol=1e-5)
    np.testing.assert_allclose(nsd, expected_nsd.double().numpy(), rtol=1e-5)


def test_surface_metrics_reject_bad_arguments() -> None:
    a = np.zeros((3, 3, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="tolerance_mm"):
        surface_metrics(a, a, (1.0, 1.0, 1.0), 2, -1.0)
    with pytest.raises(ValueError, match="spacing"):
        surface_metrics(a, a, (1.0, 1.0), 2)
    with pytest.raises(ValueError, match="shape"):
        surface_metrics(a, a[:2], (1.0, 1.0, 1.0), 2)


# ---------------------------------------------------------------------------------------------
# the sidecar


def test_sidecar_holds_the_stored_label_maps_and_header_spacing(
    synthetic_slices: SliceData, synthetic_data_config: DataConfig
) -> None:
    import nibabel as nib

    native = load_native(synthetic_slices.cache_folder)
    assert native is not None and native.cases == synthetic_slices.cases
    assert native.axis == synthetic_data_config.axis % 3
    volumes = load_msd(synthetic_data_config.root)
    for index, volume in enumerate(volumes):
        np.testing.assert_array_equal(native.label(index), volume.label)
        zooms = nib.load(volume.image_path).header.get_zooms()[:3]
        assert native.spacings[index] == pytest.approx(tuple(float(z) for z in zooms))


def test_sidecar_leaves_the_slice_cache_as_it_was(
    synthetic_data_config: DataConfig, tmp_path: Path
) -> None:
    """A cache written without the sidecar gets it at the next prepare; the cache's own files
    and fingerprint do not change."""
    data = prepare_slices(synthetic_data_config, tmp_path)
    folder = Path(data.cache_folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    for path in (folder / NATIVE_FOLDER).iterdir():
        path.unlink()
    (folder / NATIVE_FOLDER).rmdir()
    assert load_native(folder) is None
    again = prepare_slices(synthetic_data_config, tmp_path)
    assert again.fingerprint == data.fingerprint
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    assert load_native(folder) is not None
    assert json.loads((folder / NATIVE_FOLDER / "meta.json").read_text())["fingerprint"] == (
        data.fingerprint
    )
    assert write_native_sidecar(synthetic_data_config, folder) == folder / NATIVE_FOLDER


# ---------------------------------------------------------------------------------------------
# scoring test volumes


def test_native_prediction_equals_predict_volume(
    synthetic_slices: SliceData, synthetic_data_config: DataConfig
) -> None:
    """The native Dice is that of ``predict_volume`` on the original images (the export's
    path): the cached slices are the same preprocessing."""
    from trainers.inference import native_dice

    model = _model(synthetic_slices.num_classes)
    volumes = (1, 4, 7)
    scores = score_test_volumes(model, synthetic_slices, volumes, CPU)
    originals = load_msd(synthetic_data_config.root)
    preds = [predict_volume(model, originals[v].image, synthetic_data_config) for v in volumes]
    expected = native_dice(
        preds, [originals[v].label for v in volumes], synthetic_slices.num_classes
    )
    for key, value in expected.items():
        assert scores[f"test_native_{key}"] == pytest.approx(value, abs=1e-12, nan_ok=True)


def test_model_sized_test_dice_equals_evaluate_model(synthetic_slices: SliceData) -> None:
    model = _model(synthetic_slices.num_classes, seed=3)
    volumes = (0, 2, 5, 9)
    scores = score_test_volumes(model, synthetic_slices, volumes, CPU, batch_size=7)
    reference = evaluate_model(model, synthetic_slices, volumes, CPU)
    for key, value in reference.items():
        assert scores[f"test_{key}"] == pytest.approx(value, abs=0, nan_ok=True)
    assert model.training is False
    assert score_test_volumes(model, synthetic_slices, (), CPU) == {}


def test_at_identity_geometry_native_dice_equals_the_model_sized_dice() -> None:
    """Volumes of 32 x 32 slices at image_size 32: nothing is resized, so the native Dice is
    the model-sized Dice exactly (slicing axis 0, spacing irrelevant to Dice)."""
    rng = np.random.default_rng(2)
    depths = (5, 7, 6)
    labels = [rng.integers(0, 3, size=(d, 32, 32)).astype(np.uint8) for d in depths]
    images = [rng.random((d, 32, 32), dtype=np.float32) for d in depths]
    data = SliceData(
        images=np.concatenate(images),
        labels=np.concatenate(labels),
        volume=np.concatenate([np.full(d, i, np.int32) for i, d in enumerate(depths)]),
        position=np.concatenate([np.arange(d, dtype=np.float32) / d for d in depths]),
        cases=("a", "b", "c"),
        num_classes=3,
        fingerprint="identity",
    )
    offsets = np.cumsum([0, *(label.size for label in labels)])[:-1]
    native = NativeLabels(
        cases=data.cases,
        shapes=tuple(label.shape for label in labels),
        spacings=((1.0, 0.5, 2.0),) * 3,
        offsets=tuple(int(o) for o in offsets),
        flat=np.concatenate([label.reshape(-1) for label in labels]),
        axis=0,
    )
    scores = score_test_volumes(_model(3, seed=1), data, (0, 1, 2), CPU, native=native)
    for name in ("pooled", "volume"):
        for suffix in ("c1", "c2", "mean"):
            key = f"dice_{name}_{suffix}"
            assert scores[f"test_native_{key}"] == pytest.approx(
                scores[f"test_{key}"], abs=1e-12, nan_ok=True
            )
    assert scores["test_native_n_volumes"] == 3


def test_without_a_usable_sidecar_only_the_model_sized_dice_with_a_warning(
    synthetic_slices: SliceData,
) -> None:
    in_memory = dataclasses.replace(synthetic_slices, cache_folder=None)
    with pytest.warns(UserWarning, match="sidecar"):
        scores = score_test_volumes(_model(in_memory.num_classes), in_memory, (0, 1), CPU)
    assert "test_dice_pooled_mean" in scores
    assert not any(key.startswith("test_native_") for key in scores)
    # a preprocessing setting the resize back does not invert (e.g. added by a later release)
    native = load_native(synthetic_slices.cache_folder)
    assert native is not None and native.not_inverted == ()
    other = dataclasses.replace(native, not_inverted=("reorient",))
    with pytest.warns(UserWarning, match="reorient"):
        scores = score_test_volumes(
            _model(in_memory.num_classes), synthetic_slices, (0, 1), CPU, native=other
        )
    assert "test_dice_pooled_mean" in scores and "test_native_n_volumes" not in scores


# ---------------------------------------------------------------------------------------------
# the fine-tuning node


def _finetune(data: SliceData, **overrides: object) -> dict[str, float]:
    split = make_split(data.num_volumes, SplitConfig(), 0)
    ctx = StageContext(
        data=data, split=split, labelled=labelled_subset(split, 0.2), seed=0, device=CPU
    )
    cfg = FinetuneConfig(epochs=1, batch_size=8, lr=1e-3, **overrides)  # type: ignore[arg-type]
    return run_finetune(cfg, TINY, ctx).metrics


def test_finetune_reports_native_columns(synthetic_slices: SliceData) -> None:
    metrics = _finetune(synthetic_slices, nsd_tolerance_mm=2.0)
    for k in ("c1", "c2", "mean"):
        for name in ("dice_pooled", "dice_volume", "hd95", "nsd"):
            assert f"test_native_{name}_{k}" in metrics
        assert f"test_dice_pooled_{k}" in metrics
    assert metrics["test_native_n_volumes"] == metrics["test_n_volumes"]
    assert metrics["native_nsd_tolerance_mm"] == 2.0 and metrics["native_eval_seconds"] > 0
    off = _finetune(load_slice_cache(synthetic_slices.cache_folder), native_eval=False)
    assert "test_dice_pooled_mean" in off
    assert not any("native" in key for key in off)


def test_native_settings_enter_keys_only_when_not_default() -> None:
    default = hash_form(config_dict(FinetuneConfig()))
    assert "native_eval" not in default and "nsd_tolerance_mm" not in default
    assert LATE_DEFAULTS["native_eval"] is True and LATE_DEFAULTS["nsd_tolerance_mm"] == 1.0
    assert hash_form(config_dict(FinetuneConfig(native_eval=False)))["native_eval"] is False
    assert hash_form(config_dict(FinetuneConfig(nsd_tolerance_mm=2.0)))["nsd_tolerance_mm"] == 2.0


def _two_rank_worker(rank: int, world: int, port: int, cache: str, out: str) -> None:
    from trainers.loop import Dist

    torch.set_num_threads(1)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world
    )
    try:
        data = load_slice_cache(cache)
        scores = score_test_volumes(
            _model(data.num_classes), data, (0, 3, 6), CPU, dist=Dist.current()
        )
        torch.save(scores, Path(out) / f"rank{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_ranks_share_the_volumes_and_agree_with_one_process(
    synthetic_slices: SliceData, tmp_path: Path
) -> None:
    """Under torch.distributed each rank scores its share of the volumes; the summed
    per-volume numbers give every rank the metrics of one process scoring them all."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = (2, port, synthetic_slices.cache_folder, str(tmp_path))
    torch.multiprocessing.spawn(_two_rank_worker, args=args, nprocs=2)
    alone = score_test_volumes(
        _model(synthetic_slices.num_classes), synthetic_slices, (0, 3, 6), CPU
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert got.keys() == alone.keys()
        for key in alone:
            if key != "native_eval_seconds":
                assert got[key] == pytest.approx(alone[key], abs=1e-12, nan_ok=True), (rank, key)


NON_RAS = np.array(  # axes permuted and flipped, anisotropic voxels (1.6, 0.8, 2.5 mm)
    [[0.0, -0.8, 0.0, 20.0], [-1.6, 0.0, 0.0, 30.0], [0.0, 0.0, 2.5, -4.0], [0.0, 0.0, 0.0, 1.0]]
)


def test_reoriented_and_resampled_slices_are_scored_on_the_stored_grid(
    synthetic_root: Path, tmp_path: Path
) -> None:
    """Under ``reorient: canonical`` and an in-plane ``spacing`` the native metrics equal
    those of ``predict_volume``'s maps on the stored (non-RAS) grid with its voxel sizes (the
    sidecar's grid is the same voxels turned to RAS: no metric here depends on the axis order)."""
    import shutil

    import nibabel as nib

    from trainers.inference import native_dice

    root = tmp_path / "non-ras"
    shutil.copytree(synthetic_root, root)
    for path in sorted(root.glob("*Tr/*.nii.gz")):
        stored = nib.load(str(path))
        nib.save(nib.Nifti1Image(np.asarray(stored.dataobj), NON_RAS), str(path))
    cfg = DataConfig(
        kind="msd", root=str(root), image_size=32, reorient="canonical", spacing=(1.0, 1.2)
    )
    data = prepare_slices(cfg, tmp_path / "cache")
    native = load_native(data.cache_folder)
    assert native is not None and native.not_inverted == () and native.reorient == "canonical"
    # the sidecar holds the grid the slices were cut from: the stored voxels turned to RAS
    originals = load_msd(str(root))
    turned, _ = to_canonical(originals[0].label, originals[0].affine)
    np.testing.assert_array_equal(native.label(0), turned)
    assert native.spacings[0] == pytest.approx((0.8, 1.6, 2.5))
    model = _model(data.num_classes, seed=4)
    volumes = (0, 5, 8)
    scores = score_test_volumes(model, data, volumes, CPU)
    preds = [
        predict_volume(model, originals[v].image, cfg, affine=originals[v].affine) for v in volumes
    ]
    expected = native_dice(preds, [originals[v].label for v in volumes], data.num_classes)
    for key, value in expected.items():
        assert scores[f"test_native_{key}"] == pytest.approx(value, abs=1e-12, nan_ok=True)
    hd95 = [
        surface_metrics(p, originals[v].label, (1.6, 0.8, 2.5), 3)[0]
        for p, v in zip(preds, volumes, strict=True)
    ]
    assert scores["test_native_hd95_c1"] == pytest.approx(
        np.nanmean([h[0] for h in hd95]), nan_ok=True
    )


def test_an_unreadable_sidecar_is_no_sidecar_and_is_rewritten(
    synthetic_data_config: DataConfig, tmp_path: Path
) -> None:
    """A meta.json a crash left empty: load_native says None (the node warns and skips the
    native metrics rather than failing after training) and the next prepare rewrites it."""
    data = prepare_slices(synthetic_data_config, tmp_path)
    meta = Path(data.cache_folder) / NATIVE_FOLDER / "meta.json"
    good = meta.read_text()
    meta.write_text("")
    assert load_native(data.cache_folder) is None
    prepare_slices(synthetic_data_config, tmp_path)
    assert meta.read_text() == good and load_native(data.cache_folder) is not None
