"""trainers.inference: whole-volume prediction at the input's resolution, NIfTI in and out,
native-resolution Dice, the TorchScript trace."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from trainers.config import DataConfig, DatasetError, ModelConfig
from trainers.data import prepare_slices
from trainers.inference import (
    evaluate_native,
    list_images,
    native_dice,
    predict_volume,
    preprocessing_record,
    read_image,
    trace_model,
    write_label_map,
)
from trainers.metrics import evaluate_volumes
from trainers.model import UNet
from trainers.msd import load_msd
from trainers.stages import evaluate_model

MODEL = ModelConfig(base_channels=4, depth=2, embed_dim=8, global_hidden=8, local_hidden=8)
AFFINE = np.array(
    [[0.0, -1.5, 0.1, 10.0], [2.0, 0.0, 0.0, -5.0], [0.0, 0.25, 3.0, 7.5], [0.0, 0.0, 0.0, 1.0]]
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model() -> UNet:
    torch.manual_seed(0)
    net = UNet(MODEL, in_channels=1, num_classes=3)
    with torch.no_grad():
        net.seg_head.bias.copy_(torch.tensor([0.0, 0.05, -0.05]))
    return net.eval()


def test_predict_volume_sees_what_training_saw(model: UNet, tmp_path: Path) -> None:
    """At the model's own in-plane size, predicting a stored volume equals the argmax of the model
    on that volume's cached training slices: same normalisation, slicing and resize."""
    root = tmp_path / "msd"
    rng = np.random.default_rng(3)
    for case in ("c0", "c1"):
        for folder, data in (
            ("imagesTr", rng.gamma(2.0, 40.0, (32, 32, 7)).astype(np.float32)),
            ("labelsTr", rng.integers(0, 3, (32, 32, 7)).astype(np.uint8)),
        ):
            (root / folder).mkdir(parents=True, exist_ok=True)
            save(root / folder / f"{case}.nii.gz", data)
    cfg = DataConfig(kind="msd", root=str(root), image_size=32)
    data = prepare_slices(cfg, tmp_path / "cache")
    volume = load_msd(root)[1]
    slices = torch.from_numpy(np.asarray(data.images[data.slices_of([1])]))  # (Z, 1, X, Y)
    with torch.no_grad():
        expected = model(slices).argmax(dim=1).numpy().astype(np.uint8)  # (Z, X, Y)
    predicted = predict_volume(model, volume.image, cfg, batch_size=4)
    assert predicted.dtype == np.uint8 and predicted.shape == volume.label.shape
    np.testing.assert_array_equal(predicted, np.moveaxis(expected, 0, -1))
    # so at the model's own size, Dice on the stored grid is the Dice the sweep reports
    native = evaluate_native(model, load_msd(root), cfg, data.num_classes)
    sliced = evaluate_model(model, data, (0, 1), torch.device("cpu"), batch_size=8)
    assert native.keys() == sliced.keys()
    for key, value in sliced.items():
        assert native[key] == pytest.approx(value, nan_ok=True), key


@pytest.mark.parametrize("shape", [(20, 27, 5), (40, 36, 3), (32, 32, 1)])
def test_predict_volume_keeps_the_input_shape(model: UNet, shape: tuple[int, ...]) -> None:
    image = np.random.default_rng(1).gamma(2.0, 40.0, shape).astype(np.float32)
    cfg = DataConfig(image_size=32, axis=-1)
    model.train()
    labels = predict_volume(model, image, cfg, batch_size=2)
    assert model.training  # its mode is restored
    model.eval()
    assert labels.shape == shape and labels.dtype == np.uint8
    assert set(np.unique(labels)) <= {0, 1, 2}
    assert len(np.unique(labels)) > 1  # a random U-Net: not a constant map
    np.testing.assert_array_equal(labels, predict_volume(model, image, cfg, batch_size=64))


def test_predict_volume_slices_along_the_axis(model: UNet) -> None:
    image = np.random.default_rng(2).normal(50, 10, (20, 27, 4)).astype(np.float32)
    along_last = predict_volume(model, image, DataConfig(image_size=32, axis=-1))
    along_first = predict_volume(
        model, np.moveaxis(image, -1, 0), DataConfig(image_size=32, axis=0)
    )
    np.testing.assert_array_equal(np.moveaxis(along_first, 0, -1), along_last)
    along_middle = predict_volume(model, image, DataConfig(image_size=32, axis=1))
    assert along_middle.shape == image.shape


def test_native_dice_matches_evaluate_volumes_and_closed_form() -> None:
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 3, (4, 8, 8))
    target = rng.integers(0, 3, (4, 8, 8))
    volume = np.array([0, 0, 1, 1])
    expected = evaluate_volumes(pred, target, volume, 3)
    got = native_dice([pred[:2], pred[2:]], [target[:2], target[2:]], 3)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == pytest.approx(expected[key], nan_ok=True)
    # volumes of different shapes; class 2 absent from both in the second volume
    a_pred, a_true = np.array([[[1, 1, 2, 0]]]), np.array([[[1, 0, 2, 2]]])
    b_pred, b_true = np.ones((2, 3, 1), int), np.array([1, 1, 0, 0, 0, 0]).reshape(2, 3, 1)
    got = native_dice([a_pred, b_pred], [a_true, b_true], 3)
    assert got["dice_pooled_c1"] == pytest.approx(2 * 3 / (8 + 3))
    assert got["dice_pooled_c2"] == pytest.approx(2 * 1 / (1 + 2))
    assert got["dice_volume_c1"] == pytest.approx((2 / 3 + 4 / 8) / 2)
    assert got["dice_volume_c2"] == pytest.approx(2 / 3)  # NaN of volume b skipped
    assert got["n_volumes"] == 2
    with pytest.raises(ValueError, match="volume 1"):
        native_dice([a_pred, b_pred], [a_true, b_true[:1]], 3)


def save(path: Path, data: np.ndarray, affine: np.ndarray = AFFINE, kind=nib.Nifti1Image) -> Path:
    nib.save(kind(data, affine), str(path))
    return path


@pytest.mark.parametrize("kind", [nib.Nifti1Image, nib.Nifti2Image])
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_label_map_keeps_affine_and_shape(tmp_path: Path, kind, suffix: str) -> None:
    path = save(
        tmp_path / f"img{suffix}", np.arange(60, dtype=np.int16).reshape(3, 4, 5), kind=kind
    )
    image = read_image(path)
    assert image.case == "img" and image.image.dtype == np.float32
    labels = (np.arange(60) % 3).reshape(3, 4, 5).astype(np.uint8)
    written = nib.load(str(write_label_map(labels, image, tmp_path / "img_seg.nii.gz")))
    assert np.array_equal(written.affine, nib.load(str(path)).affine)
    assert written.shape == (3, 4, 5) and written.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(written.dataobj), labels)


def test_read_image_refuses_what_it_cannot_segment(tmp_path: Path) -> None:
    save(tmp_path / "two.nii.gz", np.zeros((4, 4, 4, 2), np.float32))
    with pytest.raises(DatasetError, match=r"expects 1 channel, two.nii.gz has 2"):
        read_image(tmp_path / "two.nii.gz")
    save(tmp_path / "one.nii.gz", np.ones((4, 4, 4, 1), np.float32))
    one = read_image(tmp_path / "one.nii.gz")
    assert one.image.shape == (1, 4, 4, 4) and one.shape == (4, 4, 4, 1)
    written = write_label_map(np.ones((4, 4, 4), np.uint8), one, tmp_path / "one_seg.nii.gz")
    assert nib.load(str(written)).shape == (4, 4, 4, 1)  # the file's own shape
    save(tmp_path / "flat.nii.gz", np.ones((4, 4), np.float32))
    with pytest.raises(DatasetError, match="flat.nii.gz: expected a 3D volume"):
        read_image(tmp_path / "flat.nii.gz")
    nan = np.ones((3, 3, 3), np.float32)
    nan[1, 1, 1] = np.nan
    save(tmp_path / "nan.nii.gz", nan)
    with pytest.raises(DatasetError, match="nan.nii.gz: image holds NaN"):
        read_image(tmp_path / "nan.nii.gz")
    good = save(tmp_path / "cut.nii.gz", np.random.rand(16, 16, 16).astype(np.float32))
    good.write_bytes(good.read_bytes()[:-300])
    with pytest.raises(DatasetError, match="cut.nii.gz: cannot read"):
        read_image(good)


def test_list_images(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="images folder not found"):
        list_images(tmp_path / "nope")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="no NIfTI images"):
        list_images(tmp_path)
    save(tmp_path / "b.nii.gz", np.zeros((2, 2, 2), np.float32))
    save(tmp_path / "a.nii", np.zeros((2, 2, 2), np.float32))
    (tmp_path / "._a.nii.gz").write_bytes(b"resource fork")
    assert [p.name for p in list_images(tmp_path)] == ["a.nii", "b.nii.gz"]
    save(tmp_path / "a.nii.gz", np.zeros((2, 2, 2), np.float32))
    with pytest.raises(DatasetError, match="same case as"):
        list_images(tmp_path)


def test_trace_matches_the_model(model: UNet) -> None:
    traced = trace_model(model, 32)
    x = torch.rand(3, 1, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-5)
    record = preprocessing_record(
        DataConfig(image_size=32, axis=0), 3, 1, {0: "bg", 1: "a", 2: "b"}
    )
    assert record["axis"] == 0 and record["image_size"] == 32 and record["output"]["K"] == 3
    assert record["classes"] == {"0": "bg", "1": "a", "2": "b"}
