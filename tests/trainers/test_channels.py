"""Several input channels, modality-dependent normalisation, reorientation and resampling to an
in-plane spacing: each dataset layout (MSD 4D, nnU-Net ``_000k``), their refusals, a tiny
multi-channel training run, and predictions back on each input's own grid."""

from __future__ import annotations

import dataclasses
import gc
import json
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from trainers.augment import intensity_augment, spatial_augment
from trainers.config import (
    ConfigError,
    DataConfig,
    FinetuneConfig,
    GlobalConfig,
    LocalConfig,
    ModelConfig,
    StageConfigs,
    from_dict,
    hash_form,
    to_dict,
)
from trainers.data import (
    DatasetError,
    SliceGeometry,
    _to_square,
    check_dataset,
    data_fingerprint,
    from_square,
    normalise_intensity,
    prepare_slices,
    resize_images,
)
from trainers.inference import group_images, predict_volume, read_case, write_label_map
from trainers.model import UNet
from trainers.msd import from_canonical, load_msd, scan_layout, to_canonical
from trainers.pipeline import PipelineConfig, run_pipeline
from trainers.synthetic import write_synthetic_msd

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=16, local_hidden=8)
SHAPE = (16, 18, 10)
NON_RAS = np.array(  # L-P-S-like axes permuted, anisotropic voxels
    [[0.0, -0.8, 0.0, 20.0], [-1.6, 0.0, 0.0, 30.0], [0.0, 0.0, 2.5, -4.0], [0.0, 0.0, 0.0, 1.0]]
)


def synth(root: Path, layout: str = "msd", channels: int = 2, **kw: object) -> Path:
    return write_synthetic_msd(
        root, num_cases=kw.pop("cases", 4), shape=SHAPE, layout=layout, channels=channels, **kw
    )


def msd(root: Path, **overrides: object) -> DataConfig:
    return DataConfig(kind="msd", root=str(root), **{"image_size": 16, **overrides})  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# layouts


def test_one_channel_msd_is_the_dataset_it_always_was(tmp_path: Path) -> None:
    root = synth(tmp_path / "one", channels=1)
    assert scan_layout(root).channels == ("MRI",)
    data = prepare_slices(msd(root), tmp_path / "cache")
    assert data.images.shape[1] == 1 and data.in_channels == 1
    assert np.load(Path(data.images.filename)).ndim == 3  # stored (S, H, W), as before
    meta = json.loads((root / "dataset.json").read_text())
    assert "channels" not in meta["synthetic"] and meta["modality"] == {"0": "MRI"}


def test_msd_4d_and_nnunet_channel_files_give_the_same_slices(tmp_path: Path) -> None:
    four_d = synth(tmp_path / "msd")
    nnunet = synth(tmp_path / "nnunet", layout="nnunet")
    one = synth(tmp_path / "one", channels=1)
    assert nib.load(str(four_d / "imagesTr" / "synth_000.nii.gz")).shape[-1] == 2
    assert (nnunet / "imagesTr" / "synth_003_0001.nii.gz").is_file()
    layouts = [scan_layout(four_d), scan_layout(nnunet)]
    assert [layout.channels for layout in layouts] == [("MRI", "T2"), ("MRI", "T2")]
    assert layouts[1].cases[0].images[1].name == "synth_000_0001.nii.gz"
    volumes = load_msd(nnunet)
    assert volumes[0].image.shape == (2, *volumes[0].label.shape)
    # channel 0 is the one-channel dataset's image
    np.testing.assert_array_equal(volumes[0].image[0], load_msd(one)[0].image[0])
    a, b = (prepare_slices(msd(root), tmp_path / "cache") for root in (four_d, nnunet))
    assert a.images.shape[1:] == (2, 16, 16) and a.in_channels == 2
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))
    np.testing.assert_array_equal(np.asarray(a.labels), np.asarray(b.labels))
    # each channel normalised on its own: both reach the top of [0, 1]
    assert [float(a.images[:, c].max()) for c in range(2)] == pytest.approx([1.0, 1.0], abs=0.05)


def _one_line(error: pytest.ExceptionInfo) -> str:
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_file_of_another_channel_count_is_refused_naming_it(tmp_path: Path) -> None:
    root = synth(tmp_path / "msd")
    path = root / "imagesTr" / "synth_002.nii.gz"
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)
    nib.save(nib.Nifti1Image(np.concatenate([data, data[..., :1]], -1), image.affine), str(path))
    with pytest.raises(DatasetError, match=r"synth_002.nii.gz: 3 channels .* but 2 are declared"):
        load_msd(root)
    with pytest.raises(DatasetError) as info:
        check_dataset(msd(root), tmp_path / "cache")
    assert "synth_002.nii.gz" in _one_line(info)


def test_nnunet_missing_or_mismatched_channel_file_is_refused_naming_it(tmp_path: Path) -> None:
    root = synth(tmp_path / "nnunet", layout="nnunet")
    (root / "imagesTr" / "synth_001_0001.nii.gz").unlink()
    with pytest.raises(DatasetError) as info:
        scan_layout(root)
    assert _one_line(info).startswith(str(root / "imagesTr" / "synth_001_0001.nii.gz"))
    assert "channel file missing" in str(info.value)
    # a channel file of another shape than channel 0's
    nib.save(
        nib.Nifti1Image(np.zeros((5, 5, 5), np.float32), np.eye(4)),
        str(root / "imagesTr" / "synth_001_0001.nii.gz"),
    )
    with pytest.raises(DatasetError, match=r"synth_001_0001.nii.gz: shape \(5, 5, 5\) differs"):
        load_msd(root)


# ---------------------------------------------------------------------------------------------
# normalisation by modality


def test_ct_channel_is_clipped_to_the_window(tmp_path: Path) -> None:
    root = synth(tmp_path / "ct", channels=2, ct=True, cases=3)
    assert scan_layout(root).channels == ("MRI", "CT")
    with pytest.raises(DatasetError, match=r"dataset.json: channel 1 is CT; set dataset.ct_window"):
        prepare_slices(msd(root), tmp_path / "cache")
    with pytest.raises(DatasetError, match="dataset.ct_window"):
        check_dataset(msd(root), tmp_path / "cache")
    cfg = msd(root, ct_window=(-100, 200))
    data = prepare_slices(cfg, tmp_path / "cache")
    volume = load_msd(root)[0]
    expected = [
        normalise_intensity(volume.image[0]),
        (np.clip(volume.image[1], -100, 200) + 100) / 300,
    ]
    got = np.asarray(data.images[data.slices_of([0])])
    for channel in range(2):  # slices along the last axis, resized as every image is
        resized = resize_images(np.moveaxis(expected[channel], -1, 0), 16)
        np.testing.assert_allclose(got[:, channel], resized, atol=1e-6)


def test_ct_window_is_checked_naming_the_key(tmp_path: Path) -> None:
    for bad in ([200, -100], [1], "wide", [0, float("inf")]):
        with pytest.raises(ConfigError, match=r"dataset.ct_window: must be \[lo, hi\]"):
            from_dict(DataConfig, {"ct_window": bad}, "dataset")
    with pytest.raises(ConfigError, match=r"dataset.spacing: must be two numbers > 0"):
        from_dict(DataConfig, {"spacing": [1, 0]}, "dataset")
    with pytest.raises(ConfigError, match="dataset.reorient"):
        from_dict(DataConfig, {"reorient": "LPS"}, "dataset")
    root = synth(tmp_path / "mri", cases=2)
    with pytest.raises(ConfigError, match=r"dataset.ct_window: .*declares no CT channel"):
        prepare_slices(msd(root, ct_window=(0, 1)), tmp_path / "cache")


def test_new_settings_stay_out_of_keys_at_their_defaults(tmp_path: Path) -> None:
    root = synth(tmp_path / "mri", cases=2)
    plain = msd(root)
    assert hash_form(to_dict(plain)) == {
        k: v for k, v in to_dict(plain).items() if k not in ("reorient", "spacing", "ct_window")
    }
    prints = {
        data_fingerprint(cfg)
        for cfg in (
            plain,
            msd(root, reorient="canonical"),
            msd(root, spacing=(1.0, 1.0)),
            dataclasses.replace(plain, image_size=24),
        )
    }
    assert len(prints) == 4


# ---------------------------------------------------------------------------------------------
# augmentation per channel


def test_intensity_augmentation_is_per_channel_and_spatial_alike() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.full((3, 2, 8, 8), 0.5)
    out = intensity_augment(x, g, brightness=0.2, gamma=(0.5, 2.0), noise_std=0.0)
    assert not torch.allclose(out[:, 0], out[:, 1])  # each channel its own change
    # one channel draws what it drew before channels existed: shift, then gamma, per image
    g = torch.Generator().manual_seed(1)
    one = intensity_augment(x[:, :1], g, brightness=0.2, gamma=(0.5, 2.0), noise_std=0.0)
    g = torch.Generator().manual_seed(1)
    shift = -0.2 + 0.4 * torch.rand(3, generator=g)
    gamma = 0.5 + 1.5 * torch.rand(3, generator=g)
    expected = (0.5 + shift).clamp_min(0).pow(gamma).view(3, 1, 1, 1).expand(3, 1, 8, 8)
    torch.testing.assert_close(one, expected)
    # the same warp for every channel
    image = torch.rand(2, 1, 16, 16)
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    warped, _ = spatial_augment(image.expand(2, 3, 16, 16).contiguous(), y, g)
    torch.testing.assert_close(warped[:, 0], warped[:, 2])


# ---------------------------------------------------------------------------------------------
# training on two channels


def test_tiny_two_channel_pipeline_trains_every_stage(tmp_path: Path) -> None:
    root = synth(tmp_path / "two", cases=5)
    stages = StageConfigs(
        global_=GlobalConfig(epochs=1, batch_size=16, lr=1e-3),
        local=LocalConfig(epochs=1, batch_size=4, block_size=8, lr=1e-3),
        finetune=FinetuneConfig(
            epochs=1, batch_size=8, lr=1e-3, regulariser="mean_teacher", unlabelled_batch_size=4
        ),
    )
    cfg = PipelineConfig(
        data=msd(root),
        method="global+local_block",
        label_fraction=0.5,
        model=TINY,
        stages=stages,
        cache_dir=str(tmp_path / "cache"),
    )
    out = run_pipeline(cfg, device="cpu")
    assert out["state"]["encoder.levels.0.0.weight"].shape[1] == 2
    assert np.isfinite(out["metrics"]["val_dice_pooled_mean"])
    mixup = run_pipeline(
        dataclasses.replace(
            cfg,
            method="mixup",
            stages=StageConfigs(finetune=FinetuneConfig(epochs=1, batch_size=8, lr=1e-3)),
        ),
        device="cpu",
    )
    assert np.isfinite(mixup["metrics"]["val_dice_pooled_mean"])


# ---------------------------------------------------------------------------------------------
# memory: volume by volume with channel files too


def test_two_channel_preparation_holds_one_volume_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainers.msd

    root = synth(tmp_path / "nnunet", layout="nnunet", cases=4)
    real = trainers.msd.read_channels
    images: list[weakref.ref[np.ndarray]] = []
    alive: list[int] = []

    def spy(files: tuple[Path, ...], channels: int) -> tuple[np.ndarray, np.ndarray]:
        gc.collect()
        alive.append(sum(ref() is not None for ref in images))
        array, affine = real(files, channels)
        images.append(weakref.ref(array))
        return array, affine

    monkeypatch.setattr(trainers.msd, "read_channels", spy)
    prepare_slices(msd(root, reorient="canonical", spacing=(1.0, 1.0)), tmp_path / "cache")
    assert alive == [0, 0, 0, 0]


# ---------------------------------------------------------------------------------------------
# orientation and spacing: predictions land on the input's own grid


def _non_ras_case(folder: Path, channels: int) -> tuple[Path, np.ndarray]:
    """A two-channel nnU-Net case stored with ``NON_RAS``; returns its folder and label map."""
    rng = np.random.default_rng(0)
    label = np.zeros(SHAPE, np.uint8)
    label[4:10, 5:12, 2:8] = 1
    folder.mkdir(parents=True, exist_ok=True)
    for c in range(channels):
        image = (label * (50.0 + 20 * c) + rng.normal(100, 5, SHAPE)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, NON_RAS), str(folder / f"case_{c:04d}.nii.gz"))
    return folder, label


def test_canonical_orientation_round_trips_exactly() -> None:
    array = np.arange(np.prod(SHAPE)).reshape(SHAPE)
    turned, affine = to_canonical(array, NON_RAS)
    image = nib.as_closest_canonical(nib.Nifti1Image(array.astype(np.float32), NON_RAS))
    np.testing.assert_array_equal(turned, np.asarray(image.dataobj))
    np.testing.assert_allclose(affine, image.affine)
    np.testing.assert_array_equal(from_canonical(turned, NON_RAS), array)
    stacked, _ = to_canonical(np.stack([array, -array]), NON_RAS)
    np.testing.assert_array_equal(stacked[1], -turned)


def test_spacing_geometry_pads_to_a_square_and_back() -> None:
    geometry = SliceGeometry.of((16, 18), (2.0, 1.0), (1.0, 1.0))
    assert geometry.resampled == (32, 18) and geometry.square == 32 and geometry.pad == (0, 7)
    x = torch.rand(2, 3, 16, 18)
    square = _to_square(x, geometry, "bilinear")
    assert square.shape == (2, 3, 32, 32) and float(square[..., :7].abs().max()) == 0.0
    assert from_square(square, geometry).shape == (2, 3, 16, 18)


@pytest.mark.parametrize(
    "settings",
    [{}, {"reorient": "canonical"}, {"reorient": "canonical", "spacing": (1.0, 1.0)}],
    ids=["as-stored", "canonical", "canonical+spacing"],
)
def test_two_channel_prediction_is_written_on_the_inputs_own_grid(
    settings: dict, tmp_path: Path
) -> None:
    folder, _ = _non_ras_case(tmp_path / "imagesTs", 2)
    files = list(sorted(folder.iterdir()))
    [(case, grouped)] = group_images(files)
    assert case == "case" and grouped == tuple(files)
    image = read_case(grouped, 2)
    assert image.image.shape == (2, *SHAPE) and image.shape == SHAPE
    torch.manual_seed(0)
    model = UNet(TINY, in_channels=2, num_classes=2).eval()
    cfg = DataConfig(kind="msd", image_size=16, **settings)
    labels = predict_volume(model, image.image, cfg, affine=image.affine)
    assert labels.shape == SHAPE
    written = nib.load(str(write_label_map(labels, image, tmp_path / "case.nii.gz")))
    np.testing.assert_array_equal(written.affine, nib.load(str(files[0])).affine)
    assert written.shape == SHAPE
    if settings.get("reorient") == "canonical":
        # equal to predicting the canonical volume and turning the map back
        turned, affine = to_canonical(image.image, image.affine)
        on_canonical = predict_volume(model, turned, cfg, affine=affine)
        np.testing.assert_array_equal(labels, from_canonical(on_canonical, image.affine))
    with pytest.raises(DatasetError, match=r"case_0000.nii.gz: the model expects 3 channels"):
        read_case(grouped, 3)


def test_a_missing_channel_file_of_a_folder_to_segment_is_named(tmp_path: Path) -> None:
    folder, _ = _non_ras_case(tmp_path / "imagesTs", 3)
    (folder / "case_0001.nii.gz").unlink()
    with pytest.raises(DatasetError, match=r"case_0001.nii.gz: channel file missing"):
        group_images(sorted(folder.iterdir()))


def test_an_msd_4d_input_gives_a_3d_map_with_its_affine(tmp_path: Path) -> None:
    data = np.random.default_rng(0).random((*SHAPE, 2), dtype=np.float32)
    nib.save(nib.Nifti1Image(data, NON_RAS), str(tmp_path / "case.nii.gz"))
    image = read_case([tmp_path / "case.nii.gz"], 2)
    assert image.image.shape == (2, *SHAPE) and image.shape == SHAPE
    np.testing.assert_array_equal(image.image[1], data[..., 1])
    torch.manual_seed(0)
    model = UNet(TINY, in_channels=2, num_classes=2).eval()
    cfg = DataConfig(kind="msd", image_size=16, reorient="canonical")
    labels = predict_volume(model, image.image, cfg, affine=image.affine)
    written = nib.load(str(write_label_map(labels, image, tmp_path / "out.nii.gz")))
    assert written.shape == SHAPE
    np.testing.assert_array_equal(written.affine, nib.load(str(tmp_path / "case.nii.gz")).affine)
    with pytest.raises(DatasetError, match=r"case.nii.gz: the model expects 1 channel, .* has 2"):
        read_case([tmp_path / "case.nii.gz"], 1)


def test_case_names_ending_in_four_digits_are_not_taken_for_channel_files() -> None:
    """amos_0001, amos_0004 (no _0000) are one case per file; all-_0000 files are nnU-Net's
    one-channel naming; a _0000 among several files of a case is a channel group (a series
    img_0000 .. img_0010 too: read_case then refuses it for a one-channel model, loudly)."""
    folder = Path("imagesTs")
    names = [folder / f"amos_{i:04d}.nii.gz" for i in (1, 4)]
    assert group_images(names) == [("amos_0001", (names[0],)), ("amos_0004", (names[1],))]
    nnunet = [folder / f"{case}_0000.nii.gz" for case in ("a", "b")]
    assert group_images(nnunet) == [("a", (nnunet[0],)), ("b", (nnunet[1],))]
    four_d = [folder / f"brats_{i:04d}.nii.gz" for i in (1, 2)]
    assert group_images(four_d) == [("brats_0001", (four_d[0],)), ("brats_0002", (four_d[1],))]
    pairs = [folder / f"case_{c:04d}.nii.gz" for c in (0, 1)]
    assert group_images(pairs) == [("case", tuple(pairs))]
    series = [folder / f"img_{i:04d}.nii.gz" for i in range(11)]
    assert group_images(series) == [("img", tuple(series))]
