"""Dataset folder layouts (trainers.msd): nnU-Net v2 folders read like MSD ones, the one-channel
refusals, and preprocessing one volume at a time."""

from __future__ import annotations

import gc
import json
import shutil
import weakref
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from typer.testing import CliRunner

from orchestrator.cli import app
from tests.trainers.test_data import LABELS, SHAPE, make_msd, msd_config, save_nifti, tiny_case
from trainers.data import (
    DatasetError,
    SliceGeometry,
    _resize_slices,
    check_dataset,
    normalise_intensity,
    prepare_slices,
)
from trainers.msd import declared_class_names, load_msd, scan_layout
from trainers.synthetic import write_synthetic_msd

NNUNET_LABELS = {"background": 0, "anterior": 1, "posterior": 2}


def to_nnunet(msd: Path, root: Path) -> Path:
    """The cases of the MSD folder ``msd`` copied into an nnU-Net v2 folder ``root``."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    cases = sorted(p.name.removesuffix(".nii.gz") for p in (msd / "imagesTr").glob("*.nii.gz"))
    for case in cases:
        shutil.copy(msd / "imagesTr" / f"{case}.nii.gz", root / "imagesTr" / f"{case}_0000.nii.gz")
        shutil.copy(msd / "labelsTr" / f"{case}.nii.gz", root / "labelsTr" / f"{case}.nii.gz")
    meta = {
        "channel_names": {"0": "MRI"},
        "labels": NNUNET_LABELS,
        "numTraining": len(cases),
        "file_ending": ".nii.gz",
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def make_nnunet(root: Path, num_cases: int = 3) -> Path:
    return to_nnunet(make_msd(root.parent / f"{root.name}-msd", num_cases=num_cases), root)


def edit_json(root: Path, **changes: object) -> None:
    path = root / "dataset.json"
    meta = json.loads(path.read_text())
    meta.update(changes)
    path.write_text(json.dumps(meta))


# ---------------------------------------------------------------------------------------------
# nnU-Net v2 folders


def test_nnunet_folder_reads_as_the_same_msd_data(tmp_path: Path) -> None:
    msd = make_msd(tmp_path / "msd", num_cases=4)
    nnunet = to_nnunet(msd, tmp_path / "nnunet")
    layout = scan_layout(nnunet)
    assert layout.kind == "nnunet" and scan_layout(msd).kind == "msd"
    assert [c.image.name for c in layout.cases][0] == "case_000_0000.nii.gz"
    assert layout.declared_labels == frozenset({0, 1, 2})
    assert layout.class_names == {0: "background", 1: "anterior", 2: "posterior"}
    assert (
        declared_class_names(nnunet)
        == declared_class_names(msd)
        == {int(k): v for k, v in LABELS.items()}
    )
    for a, b in zip(load_msd(msd), load_msd(nnunet), strict=True):
        assert a.case == b.case
        np.testing.assert_array_equal(a.image, b.image)
        np.testing.assert_array_equal(a.label, b.label)
    ours = prepare_slices(msd_config(msd, image_size=8), tmp_path / "cache")
    theirs = prepare_slices(msd_config(nnunet, image_size=8), tmp_path / "cache")
    assert ours.fingerprint != theirs.fingerprint  # different files, different dataset.json
    assert ours.cases == theirs.cases and ours.num_classes == theirs.num_classes == 3
    for name in ("images", "labels", "volume", "position"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_nnunet_without_channel_names_is_told_by_its_labels(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "nnunet")
    meta = json.loads((root / "dataset.json").read_text())
    del meta["channel_names"], meta["file_ending"], meta["numTraining"]
    (root / "dataset.json").write_text(json.dumps(meta))
    assert [v.case for v in load_msd(root)] == ["case_000", "case_001", "case_002"]


def test_nnunet_names_without_dataset_json_get_a_hint(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "nnunet")
    (root / "dataset.json").unlink()
    with pytest.raises(DatasetError, match=r"case_000_0000.nii.gz: label file missing .*need"):
        load_msd(root)


def test_nnunet_label_remap_and_uncompressed_ending(tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "nnunet", num_cases=1)
    for folder in ("imagesTr", "labelsTr"):
        for path in (root / folder).iterdir():
            nib.save(nib.load(str(path)), str(path).removesuffix(".gz"))
            path.unlink()
    edit_json(root, file_ending=".nii")
    raw = np.zeros(SHAPE, dtype=np.int16)
    raw[1:3] = 500
    save_nifti(root / "labelsTr" / "case_000.nii", raw)
    (volume,) = load_msd(root, label_remap=((500, 2),))
    assert volume.label.max() == 2 and volume.image_path.endswith("case_000_0000.nii")


def _damage(root: Path, what: str) -> None:
    images, labels = root / "imagesTr", root / "labelsTr"
    if what == "second channel file":
        shutil.copy(images / "case_001_0000.nii.gz", images / "case_001_0001.nii.gz")
    elif what == "missing _0000 file":
        (images / "case_002_0000.nii.gz").unlink()
    elif what == "label without image":
        shutil.copy(labels / "case_000.nii.gz", labels / "case_009.nii.gz")
    elif what == "image without label":
        (labels / "case_001.nii.gz").unlink()
    elif what == "image not named per channel":
        (images / "case_001_0000.nii.gz").rename(images / "case_001.nii.gz")
    elif what == "numTraining wrong":
        edit_json(root, numTraining=7)
    elif what == "two channel_names":
        edit_json(root, channel_names={"0": "T2", "1": "ADC"})
    elif what == "region label":
        edit_json(root, labels={"background": 0, "tumour": [1, 2]})
    elif what == "ignore label":
        edit_json(root, labels={**NNUNET_LABELS, "ignore": 3})
    elif what == "labels not 0..K-1":
        edit_json(root, labels={"background": 0, "anterior": 1, "posterior": 5})
    elif what == "foreign file_ending":
        edit_json(root, file_ending=".png")
    elif what == "label value not declared":
        _, label = tiny_case(1)
        label[0, 0, 0] = 3
        save_nifti(labels / "case_001.nii.gz", label)
    else:  # pragma: no cover
        raise AssertionError(what)


NNUNET_REFUSALS = {
    "second channel file": r"case_001_0001.nii.gz: channel 1 of case 'case_001', but "
    r"dataset.json declares 1 channel \(MRI\)",
    "missing _0000 file": r"imagesTr/case_002_0000.nii.gz: image file missing for label "
    r".*labelsTr/case_002.nii.gz",
    "label without image": r"imagesTr/case_009_0000.nii.gz: image file missing",
    "image without label": r"labelsTr/case_001.nii.gz: label file missing for image",
    "image not named per channel": r"imagesTr/case_001.nii.gz: not named <case>_0000.nii.gz",
    "numTraining wrong": r"dataset.json: numTraining is 7 but imagesTr/labelsTr hold 3 cases",
    "two channel_names": r"imagesTr/case_000_0001.nii.gz: channel file missing \(dataset.json "
    r"declares 2 channels \(T2, ADC\)\)",
    "region label": r"dataset.json: labels: 'tumour' is a region \[1, 2\]",
    "ignore label": r"dataset.json: labels: 'ignore'",
    "labels not 0..K-1": r"dataset.json: 'labels' must be the class ids 0..K-1.*\[0, 1, 5\]",
    "foreign file_ending": r"dataset.json: file_ending '.png': semicon-sweep reads NIfTI",
    "label value not declared": r"labelsTr/case_001.nii.gz: label values \[3\] not declared in "
    r".*dataset.json 'labels' \[0, 1, 2\]",
}


@pytest.mark.parametrize("what", sorted(NNUNET_REFUSALS))
def test_nnunet_refusal_is_one_line_naming_the_file(what: str, tmp_path: Path) -> None:
    root = make_nnunet(tmp_path / "nnunet")
    _damage(root, what)
    with pytest.raises(DatasetError, match=NNUNET_REFUSALS[what]) as info:
        load_msd(root)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# channels: MSD folders


def test_msd_modality_of_two_channels_refuses_a_3d_image_naming_it(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd")
    edit_json(root, modality={"0": "T2", "1": "ADC"})
    assert scan_layout(root).channels == ("T2", "ADC")
    with pytest.raises(
        DatasetError,
        match=r"imagesTr/case_000.nii.gz: 1 channel \(shape \(9, 11, 6\)\), but 2 are declared",
    ):
        load_msd(root)


def test_msd_4d_image_of_two_channels_is_refused_without_declared_channels(
    tmp_path: Path,
) -> None:
    root = make_msd(tmp_path / "msd")
    image, _ = tiny_case(1)
    save_nifti(root / "imagesTr" / "case_001.nii.gz", np.stack([image, image], axis=-1))
    with pytest.raises(
        DatasetError,
        match=r"imagesTr/case_001.nii.gz: 2 channels \(shape \(9, 11, 6, 2\)\), but 1 is "
        "declared; declare the channels in dataset.json",
    ):
        load_msd(root)


# ---------------------------------------------------------------------------------------------
# memory: one volume at a time


class ReaderSpy:
    """Wraps ``trainers.msd.read_channels``: each image read asserts (``alive_at_read``) how
    many images read before it are still in memory; 0 everywhere = one volume at a time."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        import trainers.msd

        self.real = trainers.msd.read_channels
        self.images: list[weakref.ref[np.ndarray]] = []
        self.alive_at_read: list[int] = []
        monkeypatch.setattr(trainers.msd, "read_channels", self)

    def __call__(self, files: tuple[Path, ...], channels: int) -> tuple[np.ndarray, np.ndarray]:
        gc.collect()
        self.alive_at_read.append(sum(ref() is not None for ref in self.images))
        array, affine = self.real(files, channels)
        self.images.append(weakref.ref(array))
        return array, affine


def test_prepare_and_check_hold_one_volume_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_nnunet(tmp_path / "nnunet", num_cases=5)
    spy = ReaderSpy(monkeypatch)
    check_dataset(msd_config(root), tmp_path / "cache")
    assert spy.alive_at_read == [0] * 5
    spy.alive_at_read.clear()
    data = prepare_slices(msd_config(root, image_size=8), tmp_path / "cache")
    assert spy.alive_at_read == [0] * 5
    assert data.num_volumes == 5 and data.num_classes == 3
    spy.alive_at_read.clear()
    result = CliRunner().invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0 and "5 cases" in result.stdout
    assert spy.alive_at_read == [0] * 5
    # the spy sees a loader that keeps every volume (as prepare_slices did before)
    spy.alive_at_read.clear()
    load_msd(root)
    assert spy.alive_at_read == [0, 1, 2, 3, 4]


def test_streamed_slices_equal_the_whole_dataset_sliced_at_once(tmp_path: Path) -> None:
    """The cache arrays built volume by volume equal slicing every loaded volume together."""
    root = make_msd(tmp_path / "msd", num_cases=3)
    data = prepare_slices(msd_config(root, image_size=8, axis=0), tmp_path / "cache")
    volumes = load_msd(root)
    images, labels = [], []
    for volume in volumes:
        norm = normalise_intensity(volume.image[0])[:, None]  # axis 0 slices, one channel
        resized = _resize_slices(norm, volume.label, 8, SliceGeometry.of(SHAPE[1:], (1, 1), None))
        images.append(resized[0])
        labels.append(resized[1])
    np.testing.assert_array_equal(data.images, np.concatenate(images))
    np.testing.assert_array_equal(data.labels, np.concatenate(labels))
    assert data.volume.tolist() == [v for v in range(3) for _ in range(SHAPE[0])]


# ---------------------------------------------------------------------------------------------
# the synthetic generator's nnU-Net layout


def test_synthetic_nnunet_layout_slices_equal_the_msd_layout(tmp_path: Path) -> None:
    msd = write_synthetic_msd(tmp_path / "msd", num_cases=3, shape=(12, 14, 10))
    nnunet = write_synthetic_msd(
        tmp_path / "nnunet", num_cases=3, shape=(12, 14, 10), layout="nnunet"
    )
    assert sorted(p.name for p in (nnunet / "imagesTr").iterdir())[0] == "synth_000_0000.nii.gz"
    meta = json.loads((nnunet / "dataset.json").read_text())
    assert meta["labels"] == NNUNET_LABELS and meta["channel_names"] == {"0": "MRI"}
    assert "training" not in meta and scan_layout(nnunet).kind == "nnunet"
    assert "layout" not in json.loads((msd / "dataset.json").read_text())["synthetic"]
    ours = prepare_slices(msd_config(msd, image_size=8), tmp_path / "cache")
    theirs = prepare_slices(msd_config(nnunet, image_size=8), tmp_path / "cache")
    assert ours.cases == theirs.cases == ("synth_000", "synth_001", "synth_002")
    for name in ("images", "labels", "volume", "position"):
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))
    # reuse: the same call leaves the folder; the other layout at the same root is refused
    assert write_synthetic_msd(nnunet, num_cases=3, shape=(12, 14, 10), layout="nnunet") == nnunet
    with pytest.raises(DatasetError, match="layout=msd"):
        write_synthetic_msd(nnunet, num_cases=3, shape=(12, 14, 10))
    with pytest.raises(ValueError, match="layout: must be one of msd, nnunet"):
        write_synthetic_msd(tmp_path / "x", layout="nifti")


def test_data_synth_layout_option(tmp_path: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "synth", str(tmp_path / "d"), "--cases", "2", "--layout", "nnunet"]
    )
    assert result.exit_code == 0, result.output
    assert "2 synthetic cases (seed 0, nnunet layout, 1 channel: MRI)" in result.stdout
    result = runner.invoke(app, ["data", "check", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "2 cases, all readable" in result.stdout and "1 anterior" in result.stdout
    result = runner.invoke(app, ["data", "synth", str(tmp_path / "e"), "--layout", "png"])
    assert result.exit_code == 2 and "layout: must be one of msd, nnunet" in result.stderr
    args = ["data", "synth", str(tmp_path / "f"), "--cases", "2", "--channels", "3", "--ct"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "msd layout, 3 channels: MRI, T2, CT" in result.stdout
    result = runner.invoke(app, ["data", "check", str(tmp_path / "f")])
    assert result.exit_code == 0, result.output
    assert "channels: 3 (MRI, T2, CT); CT channels need dataset.ct_window" in result.stdout
