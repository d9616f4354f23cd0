"""Tests of trainers.data (loading, checking, preprocessing, caching, splits) and trainers.synthetic."""

from __future__ import annotations

import gzip
import json
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from trainers.config import ConfigError, DataConfig, SplitConfig
from trainers.data import (
    DatasetError,
    Split,
    data_fingerprint,
    labelled_subset,
    load_slice_cache,
    make_split,
    normalise_intensity,
    prepare_slices,
)
from trainers.msd import load_msd
from trainers.synthetic import write_synthetic_msd

LABELS = {"0": "background", "1": "anterior", "2": "posterior"}
SHAPE = (9, 11, 6)


# ---------------------------------------------------------------------------------------------
# helpers: tiny hand-made MSD folders


def save_nifti(path: Path, array: np.ndarray) -> None:
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def tiny_case(seed: int, shape: tuple[int, ...] = SHAPE) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = (rng.random(shape) * 1000).astype(np.float32)
    label = rng.integers(0, 3, size=shape).astype(np.uint8)
    return image, label


def make_msd(root: Path, num_cases: int = 3, with_json: bool = True) -> Path:
    """``root`` with cases case_000.. (image float32, label uint8 in {0,1,2}) and dataset.json."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    training = []
    for i in range(num_cases):
        image, label = tiny_case(i)
        name = f"case_{i:03d}.nii.gz"
        save_nifti(root / "imagesTr" / name, image)
        save_nifti(root / "labelsTr" / name, label)
        training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
    if with_json:
        meta = {"name": "tiny", "labels": LABELS, "training": training}
        (root / "dataset.json").write_text(json.dumps(meta))
    return root


def msd_config(root: Path, **overrides: object) -> DataConfig:
    return DataConfig(kind="msd", root=str(root), **overrides)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# loading the synthetic folder and its slices


def test_load_msd_reads_every_synthetic_case(synthetic_root: Path) -> None:
    volumes = load_msd(synthetic_root)
    assert [v.case for v in volumes] == [f"synth_{i:03d}" for i in range(10)]
    for volume in volumes:
        assert volume.image.dtype == np.float32 and volume.image.ndim == 4  # (C, X, Y, Z)
        assert volume.image.shape[0] == 1
        assert volume.label.dtype == np.uint8 and volume.label.shape == volume.image.shape[1:]
        assert set(np.unique(volume.label)) == {0, 1, 2}
        assert Path(volume.image_path).is_file() and Path(volume.label_path).is_file()


def test_synthetic_slices_shapes_ranges_and_bookkeeping(
    synthetic_root: Path, synthetic_slices
) -> None:
    data = synthetic_slices
    volumes = load_msd(synthetic_root)
    depths = [v.image.shape[-1] for v in volumes]  # default axis = last
    assert data.images.shape == (sum(depths), 1, 32, 32) and data.images.dtype == np.float32
    assert data.labels.shape == (sum(depths), 32, 32) and data.labels.dtype == np.uint8
    assert data.in_channels == 1
    # one channel is stored (S, H, W), as before channels existed
    assert np.load(Path(data.images.filename)).shape == (sum(depths), 32, 32)
    assert data.volume.dtype == np.int32 and data.position.dtype == np.float32
    assert data.num_classes == 3 and data.num_volumes == 10
    assert data.cases == tuple(v.case for v in volumes)
    assert float(data.images.min()) >= 0.0 and float(data.images.max()) <= 1.0
    assert float(data.images.max()) > 0.9  # the min-max stretch reaches the top of the range
    assert set(np.unique(data.labels)) == {0, 1, 2}
    for index, depth in enumerate(depths):
        rows = data.slices_of([index])
        assert rows.dtype == np.int64 and len(rows) == depth
        np.testing.assert_array_equal(data.volume[rows], index)
        np.testing.assert_allclose(data.position[rows], np.arange(depth) / depth, rtol=0, atol=1e-7)
    assert ((data.position >= 0) & (data.position < 1)).all()
    both = data.slices_of([3, 1])
    assert np.all(np.diff(both) > 0) and len(both) == depths[1] + depths[3]
    with pytest.raises(ValueError, match="volumes"):
        data.slices_of([10])


def test_slices_follow_the_configured_axis(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd", num_cases=2)
    data = prepare_slices(msd_config(root, image_size=8, axis=0), tmp_path / "cache")
    assert data.images.shape == (2 * SHAPE[0], 1, 8, 8)


def test_labels_are_resized_by_nearest_neighbour(tmp_path: Path) -> None:
    """Only values present in the source appear, and each output pixel copies its nearest source
    pixel: source index floor((i + 0.5) * in / out) (a naive reference)."""
    root = tmp_path / "msd"
    make_msd(root, num_cases=1)
    shape = (23, 19, 2)
    rng = np.random.default_rng(5)
    # values {0, 2} only: any blend of the two would invent a 1
    label = np.where(rng.random(shape) < 0.5, 2, 0).astype(np.uint8)
    save_nifti(root / "imagesTr" / "case_000.nii.gz", rng.random(shape).astype(np.float32))
    save_nifti(root / "labelsTr" / "case_000.nii.gz", label)
    for size in (8, 40):  # shrinking and enlarging
        data = prepare_slices(msd_config(root, image_size=size), tmp_path / "cache")
        assert set(np.unique(data.labels)) <= {0, 2}
        rows = np.floor((np.arange(size) + 0.5) * shape[0] / size).astype(int)
        cols = np.floor((np.arange(size) + 0.5) * shape[1] / size).astype(int)
        for z in range(shape[2]):
            np.testing.assert_array_equal(data.labels[z], label[:, :, z][np.ix_(rows, cols)])


# ---------------------------------------------------------------------------------------------
# intensity normalisation


def test_normalise_clips_outliers_and_is_scale_free() -> None:
    rng = np.random.default_rng(0)
    volume = rng.random((20, 20, 20)).astype(np.float32)
    volume[0, 0, 0] = 1e6  # one hot voxel must not squash the rest towards 0
    out = normalise_intensity(volume)
    assert out.dtype == np.float32 and out.min() == 0.0 and out.max() == 1.0
    assert 0.4 < float(np.median(out)) < 0.6
    np.testing.assert_allclose(normalise_intensity(volume * 1e4), out, atol=1e-5)


def test_normalise_guards_constant_and_nearly_empty_volumes() -> None:
    assert not normalise_intensity(np.full((4, 4, 4), 7.0, dtype=np.float32)).any()
    sparse = np.zeros((20, 20, 20), dtype=np.float32)
    sparse[0, 0, :3] = 50.0  # < 0.5 % of voxels: the percentiles coincide, fall back to min..max
    out = normalise_intensity(sparse)
    assert out.max() == 1.0 and np.isfinite(out).all()


# ---------------------------------------------------------------------------------------------
# bad input: every case raises DatasetError naming the offending file


def _rewrite_image(root: Path, array: np.ndarray) -> None:
    save_nifti(root / "imagesTr" / "case_001.nii.gz", array)


def _rewrite_label(root: Path, array: np.ndarray) -> None:
    save_nifti(root / "labelsTr" / "case_001.nii.gz", array)


def _truncate(root: Path) -> None:
    path = root / "imagesTr" / "case_001.nii.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _label_with(value: float, dtype: type = np.float32) -> Callable[[Path], None]:
    def mutate(root: Path) -> None:
        label = tiny_case(1)[1].astype(dtype)
        label[0, 0, 0] = value
        _rewrite_label(root, label)

    return mutate


BAD_INPUTS: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing image": (
        lambda r: (r / "imagesTr" / "case_001.nii.gz").unlink(),
        "imagesTr/case_001.nii.gz",
    ),
    "missing label": (
        lambda r: (r / "labelsTr" / "case_001.nii.gz").unlink(),
        "labelsTr/case_001.nii.gz",
    ),
    "truncated gzip": (_truncate, "imagesTr/case_001.nii.gz"),
    "garbage bytes": (
        lambda r: (r / "labelsTr" / "case_001.nii.gz").write_bytes(os.urandom(400)),
        "labelsTr/case_001.nii.gz",
    ),
    "gzip of garbage": (
        lambda r: (r / "imagesTr" / "case_001.nii.gz").write_bytes(gzip.compress(os.urandom(400))),
        "imagesTr/case_001.nii.gz",
    ),
    "empty file": (
        lambda r: (r / "imagesTr" / "case_001.nii.gz").write_bytes(b""),
        "imagesTr/case_001.nii.gz",
    ),
    "2D image": (
        lambda r: _rewrite_image(r, np.zeros((9, 11), np.float32)),
        "imagesTr/case_001.nii.gz",
    ),
    "4D image": (
        lambda r: _rewrite_image(r, np.zeros((*SHAPE, 2), np.float32)),
        "imagesTr/case_001.nii.gz",
    ),
    "shape mismatch": (lambda r: _rewrite_image(r, np.zeros((9, 11, 7), np.float32)), "(9, 11, 7)"),
    "undeclared label": (_label_with(3), "labelsTr/case_001.nii.gz"),
    "fractional label": (_label_with(0.5), "labelsTr/case_001.nii.gz"),
    "negative label": (_label_with(-1), "labelsTr/case_001.nii.gz"),
    "NaN image": (
        lambda r: _rewrite_image(r, np.full(SHAPE, np.nan, np.float32)),
        "imagesTr/case_001.nii.gz",
    ),
    "corrupt dataset.json": (
        lambda r: (r / "dataset.json").write_text('{"training": [}'),
        "dataset.json",
    ),
    "dataset.json not an object": (
        lambda r: (r / "dataset.json").write_text("[1, 2]"),
        "dataset.json",
    ),
    "bad training entry": (
        lambda r: (r / "dataset.json").write_text(
            json.dumps({"labels": LABELS, "training": [{"image": 3}]})
        ),
        "dataset.json",
    ),
    "empty training list": (
        lambda r: (r / "dataset.json").write_text(json.dumps({"labels": LABELS, "training": []})),
        "no cases",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_raises_dataset_error_naming_the_file(case: str, tmp_path: Path) -> None:
    mutate, expected = BAD_INPUTS[case]
    root = make_msd(tmp_path / "msd")
    mutate(root)
    with pytest.raises(DatasetError) as info:
        load_msd(root)
    assert expected in str(info.value)
    assert info.value.__traceback__ is not None and isinstance(info.value, ValueError)


def test_shape_mismatch_names_both_shapes(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd")
    _rewrite_image(root, np.zeros((9, 11, 7), np.float32))
    with pytest.raises(DatasetError, match=r"\(9, 11, 7\).*case_001.*\(9, 11, 6\)"):
        load_msd(root)


@pytest.mark.parametrize("with_json", [True, False])
def test_missing_files_named_with_and_without_dataset_json(with_json: bool, tmp_path: Path) -> None:
    root = make_msd(tmp_path / "a", with_json=with_json)
    (root / "imagesTr" / "case_002.nii.gz").unlink()
    with pytest.raises(DatasetError, match="imagesTr/case_002.nii.gz"):
        load_msd(root)
    root = make_msd(tmp_path / "b", with_json=with_json)
    (root / "labelsTr" / "case_000.nii.gz").unlink()
    with pytest.raises(DatasetError, match="labelsTr/case_000.nii.gz"):
        load_msd(root)


def test_missing_or_empty_folder_is_named(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="nowhere"):
        load_msd(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"empty: no cases"):
        load_msd(tmp_path / "empty")
    with pytest.raises(DatasetError, match="dataset.root"):
        prepare_slices(DataConfig(kind="msd", root=""), tmp_path / "cache")


def test_folder_pairing_without_dataset_json(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd", with_json=False)
    (root / "imagesTr" / "._case_000.nii.gz").write_bytes(b"macOS resource fork")  # ignored
    volumes = load_msd(root)
    assert [v.case for v in volumes] == ["case_000", "case_001", "case_002"]
    assert prepare_slices(msd_config(root, image_size=8), tmp_path / "cache").num_classes == 3


def test_trailing_singleton_dimension_is_squeezed_and_float_labels_accepted(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd")
    image, label = tiny_case(1)
    _rewrite_image(root, image[..., None])
    _rewrite_label(root, label.astype(np.float32))  # like hippocampus_003: float32, integral values
    volumes = load_msd(root)
    np.testing.assert_array_equal(volumes[1].image[0], image)
    np.testing.assert_array_equal(volumes[1].label, label)
    assert volumes[1].label.dtype == np.uint8


def test_label_remap(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd", num_cases=1, with_json=False)
    raw = np.zeros(SHAPE, dtype=np.int16)
    raw[1:3] = 500
    raw[4:6] = 820
    _label = root / "labelsTr" / "case_000.nii.gz"
    save_nifti(_label, raw)
    (volume,) = load_msd(root, label_remap=((500, 1), (820, 2)))
    expected = np.zeros(SHAPE, dtype=np.uint8)
    expected[1:3], expected[4:6] = 1, 2
    np.testing.assert_array_equal(volume.label, expected)
    with pytest.raises(DatasetError, match=r"case_000.nii.gz.*\[820\]"):
        load_msd(root, label_remap=((500, 1),))
    with pytest.raises(DatasetError, match="label value 820"):
        load_msd(root)  # no remap, no declaration: a class id must fit in uint8
    with pytest.raises(ConfigError, match="label_remap"):
        load_msd(root, label_remap=((500, 1), (500, 2)))


# ---------------------------------------------------------------------------------------------
# cache and fingerprint


def test_second_prepare_memory_maps_without_nibabel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = make_msd(tmp_path / "msd")
    cfg = msd_config(root, image_size=16)
    first = prepare_slices(cfg, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.fingerprint]  # no temp left
    assert (tmp_path / "cache" / first.fingerprint / "meta.json").is_file()

    def no_nibabel(*args: object, **kwargs: object) -> None:
        raise AssertionError("nibabel.load called on a cache hit")

    monkeypatch.setattr(nib, "load", no_nibabel)
    second = prepare_slices(cfg, tmp_path / "cache")
    assert isinstance(second.images, np.memmap) and not second.images.flags.writeable
    for name in ("images", "labels", "volume", "position"):
        np.testing.assert_array_equal(getattr(second, name), getattr(first, name))
    assert (second.cases, second.num_classes, second.fingerprint) == (
        first.cases,
        first.num_classes,
        first.fingerprint,
    )
    opened = load_slice_cache(tmp_path / "cache" / first.fingerprint)
    np.testing.assert_array_equal(opened.labels, first.labels)


def test_incomplete_cache_folder_is_rebuilt_and_refused_when_opened(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd")
    cfg = msd_config(root, image_size=16)
    folder = tmp_path / "cache" / data_fingerprint(cfg)
    folder.mkdir(parents=True)
    (folder / "images.npy").write_bytes(b"half written")  # an interrupted writer, no meta.json
    with pytest.raises(DatasetError, match="meta.json"):
        load_slice_cache(folder)
    data = prepare_slices(cfg, tmp_path / "cache")
    assert data.images.shape == (3 * SHAPE[2], 1, 16, 16)
    (folder / "labels.npy").write_bytes(b"garbage")
    with pytest.raises(DatasetError, match="labels.npy"):
        load_slice_cache(folder)


def test_fingerprint_tracks_file_bytes_and_parameters(tmp_path: Path) -> None:
    root = make_msd(tmp_path / "msd")
    base = data_fingerprint(msd_config(root))
    assert base == data_fingerprint(msd_config(root))
    assert len(base) == 32 and int(base, 16) >= 0
    copy = tmp_path / "elsewhere"
    shutil.copytree(root, copy)
    assert data_fingerprint(msd_config(copy)) == base  # contents count, not the location
    variants = {
        data_fingerprint(msd_config(root, image_size=32)),
        data_fingerprint(msd_config(root, axis=0)),
        data_fingerprint(msd_config(root, label_remap=((1, 1), (2, 2)))),
    }
    assert base not in variants and len(variants) == 3
    assert data_fingerprint(msd_config(root, axis=2)) == base  # -1 and 2 are the same axis
    path = root / "imagesTr" / "case_001.nii.gz"
    changed = bytearray(path.read_bytes())
    changed[-10] ^= 1  # same size, one bit different
    path.write_bytes(bytes(changed))
    assert data_fingerprint(msd_config(root)) != base


def test_synthetic_fingerprint_needs_no_files(tmp_path: Path) -> None:
    def fingerprint(**kw: object) -> str:
        return data_fingerprint(DataConfig(kind="synthetic", root=str(tmp_path / "absent"), **kw))  # type: ignore[arg-type]

    base = fingerprint()
    assert base == fingerprint() and not (tmp_path / "absent").exists()
    others = {
        fingerprint(synthetic_seed=1),
        fingerprint(synthetic_cases=5),
        fingerprint(image_size=32),
    }
    assert base not in others and len(others) == 3


def test_prepare_slices_generates_synthetic_data_once(tmp_path: Path) -> None:
    cfg = DataConfig(
        kind="synthetic", root=str(tmp_path / "synth"), image_size=16, synthetic_cases=3
    )
    data = prepare_slices(cfg, tmp_path / "cache")
    assert (tmp_path / "synth" / "dataset.json").is_file()
    assert (
        data.num_volumes == 3
        and data.num_classes == 3
        and data.fingerprint == data_fingerprint(cfg)
    )
    reseeded = DataConfig(
        kind="synthetic",
        root=str(tmp_path / "synth"),
        image_size=16,
        synthetic_cases=3,
        synthetic_seed=1,
    )
    with pytest.raises(DatasetError, match="dataset.json"):
        prepare_slices(reseeded, tmp_path / "cache")  # the folder holds seed 0's data


# ---------------------------------------------------------------------------------------------
# synthetic generator


def test_synthetic_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    shape = (12, 14, 10)
    a = write_synthetic_msd(tmp_path / "a", num_cases=3, seed=7, shape=shape)
    b = write_synthetic_msd(tmp_path / "b", num_cases=3, seed=7, shape=shape)
    c = write_synthetic_msd(tmp_path / "c", num_cases=3, seed=8, shape=shape)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert len(files) == 7
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel
    image = "imagesTr/synth_000.nii.gz"
    assert (a / image).read_bytes() != (c / image).read_bytes()


def test_synthetic_reuse_and_refusal(tmp_path: Path) -> None:
    root = write_synthetic_msd(tmp_path / "s", num_cases=2, seed=0, shape=(10, 10, 10))
    stamp = (root / "imagesTr" / "synth_000.nii.gz").stat().st_mtime_ns
    assert write_synthetic_msd(root, num_cases=2, seed=0, shape=(10, 10, 10)) == root
    assert (root / "imagesTr" / "synth_000.nii.gz").stat().st_mtime_ns == stamp
    with pytest.raises(DatasetError, match="dataset.json"):
        write_synthetic_msd(root, num_cases=3, seed=0, shape=(10, 10, 10))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(DatasetError, match="foreign"):
        write_synthetic_msd(tmp_path / "foreign", num_cases=1)
    with pytest.raises(ValueError, match="shape"):
        write_synthetic_msd(tmp_path / "bad", num_cases=1, shape=(4, 10, 10))


def test_interrupted_synthetic_write_leaves_no_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save = nib.save
    calls = {"n": 0}

    def failing_save(image: object, path: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError("disk full")
        real_save(image, path)

    monkeypatch.setattr(nib, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_synthetic_msd(tmp_path / "s", num_cases=2, shape=(10, 10, 10))
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its staging folder
    monkeypatch.setattr(nib, "save", real_save)
    assert len(load_msd(write_synthetic_msd(tmp_path / "s", num_cases=2, shape=(10, 10, 10)))) == 2


def test_synthetic_classes_overlap_in_intensity(synthetic_root: Path) -> None:
    """Learnable but not trivial: foreground is brighter on average, yet no threshold separates it."""
    for volume in load_msd(synthetic_root)[:3]:
        image = normalise_intensity(volume.image[0])
        background, foreground = image[volume.label == 0], image[volume.label > 0]
        assert foreground.mean() > background.mean()
        assert np.quantile(background, 0.95) > np.quantile(foreground, 0.05)
    scales = [float(np.median(v.image)) for v in load_msd(synthetic_root)]
    assert max(scales) / min(scales) > 10  # global intensity scale varies across cases


# ---------------------------------------------------------------------------------------------
# splits and labelled subsets


def test_split_is_disjoint_covering_and_sized() -> None:
    split = make_split(208, SplitConfig(), index=0)
    parts = [set(split.train), set(split.val), set(split.test)]
    assert set().union(*parts) == set(range(208)) and sum(map(len, parts)) == 208
    assert (len(split.train), len(split.val), len(split.test)) == (124, 42, 42)
    assert list(split.train) == sorted(split.train)
    small = make_split(3, SplitConfig(), index=5)
    assert all(len(part) == 1 for part in (small.train, small.val, small.test))
    no_val = make_split(10, SplitConfig(train=0.8, val=0.0, test=0.2), index=0)
    assert no_val.val == () and len(no_val.test) == 2
    with pytest.raises(ConfigError, match="split.train"):
        make_split(2, SplitConfig(), index=0)
    with pytest.raises(ValueError, match="split_index"):
        make_split(10, SplitConfig(), index=-1)
    with pytest.raises(ValueError, match="disjoint"):
        Split(index=0, train=(0, 1), val=(1,), test=(2,))


def test_split_depends_on_index_only() -> None:
    cfg = SplitConfig()
    assert make_split(40, cfg, 3) == make_split(40, cfg, 3)
    assert len({make_split(40, cfg, i).test for i in range(4)}) == 4


def test_split_values_are_pinned() -> None:
    """Splits must never change silently (stored results refer to them by index), and they must
    not depend on Python's per-process ``hash`` seed: the same index gives these exact volumes."""
    split = make_split(12, SplitConfig(), 1)
    assert split == Split(index=1, train=(0, 1, 2, 3, 4, 6, 7, 9), val=(5, 11), test=(8, 10))
    assert labelled_subset(split, 0.3) == (2, 4)


def test_labelled_subsets_are_nested_and_inside_train() -> None:
    for index in range(3):
        split = make_split(60, SplitConfig(), index)
        previous: set[int] = set()
        for fraction in (0.01, 0.05, 0.1, 0.2, 0.5, 1.0):
            chosen = labelled_subset(split, fraction)
            assert len(chosen) == max(1, math.floor(fraction * len(split.train) + 0.5))
            assert previous <= set(chosen) <= set(split.train)
            assert not set(chosen) & (set(split.test) | set(split.val))
            assert chosen == labelled_subset(split, fraction)
            previous = set(chosen)
        assert previous == set(split.train)


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_labelled_fraction_is_validated(fraction: object) -> None:
    with pytest.raises(ValueError, match="label_fraction"):
        labelled_subset(make_split(10, SplitConfig(), 0), fraction)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------
# the real dataset


@pytest.mark.realdata
def test_real_hippocampus_loads(shared_data_root: Path) -> None:
    volumes = load_msd(shared_data_root)
    assert len(volumes) == 208
    assert len({v.case for v in volumes}) == 208
    for volume in volumes:
        assert volume.image.shape == (1, *volume.label.shape)
        assert set(np.unique(volume.label)) == {0, 1, 2}
    assert len(data_fingerprint(msd_config(shared_data_root))) == 32
