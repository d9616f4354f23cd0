"""Augmentation: determinism per generator seed, alignment, label integrity, shapes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from trainers.augment import (
    global_view_args,
    global_views,
    intensity_args,
    intensity_augment,
    intensity_views,
    spatial_args,
    spatial_augment,
)
from trainers.config import FINETUNE_AUGMENT, GLOBAL_AUGMENT, AugmentConfig


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(batch: int = 4, size: int = 32) -> tuple[Tensor, Tensor]:
    """Images in [0.2, 1] and label maps {0, 1, 2}: two discs per image at random places."""
    torch.manual_seed(123)
    rows = torch.arange(size).view(size, 1).float()
    cols = torch.arange(size).view(1, size).float()
    labels = torch.zeros(batch, size, size, dtype=torch.long)
    for b in range(batch):
        for cls in (1, 2):
            cy, cx = torch.randint(8, size - 8, (2,)).tolist()
            labels[b][(rows - cy) ** 2 + (cols - cx) ** 2 <= 25] = cls
    images = 0.2 + 0.3 * labels.float()[:, None] + 0.05 * torch.rand(batch, 1, size, size)
    return images, labels


def spatial_images(x: Tensor, g: torch.Generator) -> tuple[Tensor, Tensor]:
    out, _ = spatial_augment(x, torch.zeros(x.shape[0], *x.shape[2:], dtype=torch.long), g)
    return out, out


AUGMENTS: dict[str, Callable[[Tensor, torch.Generator], tuple[Tensor, Tensor]]] = {
    "intensity": intensity_views,
    "global": global_views,
    "spatial": spatial_images,
}


@pytest.mark.parametrize("name", list(AUGMENTS))
def test_same_seed_same_views_different_seed_different(name: str) -> None:
    augment = AUGMENTS[name]
    x, _ = blobs()
    a1, a2 = augment(x, gen(7))
    b1, b2 = augment(x, gen(7))
    c1, _ = augment(x, gen(8))
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, c1)
    assert a1.shape == x.shape and a1.dtype == x.dtype
    assert torch.isfinite(a1).all()


@pytest.mark.parametrize("name", ["intensity", "global"])
def test_two_views_differ(name: str) -> None:
    v1, v2 = AUGMENTS[name](blobs()[0], gen(0))
    assert not torch.equal(v1, v2)


def pearson(a: Tensor, b: Tensor) -> Tensor:
    """Per-image correlation of (B, ...) tensors."""
    a, b = (
        a.flatten(1) - a.flatten(1).mean(1, keepdim=True),
        b.flatten(1) - b.flatten(1).mean(1, keepdim=True),
    )
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))


def test_intensity_without_noise_is_a_monotone_per_image_map() -> None:
    torch.manual_seed(0)
    ramp = torch.linspace(0.2, 1.0, 32 * 32)  # distinct values, no clamping at 0
    x = torch.stack([ramp[torch.randperm(ramp.numel())] for _ in range(4)]).view(4, 1, 32, 32)
    v1, v2 = intensity_views(x, gen(0), noise_std=0.0)
    order = x.flatten(1).argsort(dim=1)
    for view in (v1, v2):
        # same pixels, same intensity order: strictly increasing along x's sorted order
        assert (view.flatten(1).gather(1, order).diff(dim=1) > 0).all()
    assert not torch.equal(v1, x)


def test_intensity_formula_with_degenerate_ranges() -> None:
    x, _ = blobs()
    v1, v2 = intensity_views(x, gen(0), brightness=0.0, gamma=(2.0, 2.0), noise_std=0.0)
    torch.testing.assert_close(v1, x**2)
    torch.testing.assert_close(v2, x**2)


def test_intensity_views_stay_aligned_with_noise() -> None:
    x, _ = blobs()
    v1, v2 = intensity_views(x, gen(0))
    assert (pearson(v1, x) > 0.9).all() and (pearson(v1, v2) > 0.85).all()
    assert not torch.equal(v1, v2)


def test_global_views_change_geometry() -> None:
    x, _ = blobs()
    v1, v2 = global_views(x, gen(0), noise_std=0.0, brightness=0.0, gamma=(1.0, 1.0))
    # no intensity change: any difference is spatial; at least one image moved noticeably
    assert ((v1 - x).abs().flatten(1).mean(1) > 0.02).any()
    assert ((v2 - v1).abs().flatten(1).mean(1) > 0.02).any()


def test_identity_spatial_settings_leave_data_unchanged() -> None:
    x, y = blobs()
    xs, ys = spatial_augment(
        x, y, gen(0), p_flip=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0), elastic_alpha=0.0
    )
    torch.testing.assert_close(xs, x)
    assert torch.equal(ys, y)


def test_certain_flips_flip_both_axes_exactly() -> None:
    x, y = blobs()
    xs, ys = spatial_augment(
        x, y, gen(0), p_flip=1.0, max_rotate_deg=0.0, scale=(1.0, 1.0), elastic_alpha=0.0
    )
    torch.testing.assert_close(xs, x.flip(-1, -2))
    assert torch.equal(ys, y.flip(-1, -2))


@pytest.mark.parametrize(("axes", "dims"), [((0,), (-2,)), ((1,), (-1,)), ((), ())])
def test_flips_happen_only_along_the_allowed_slice_axes(
    axes: tuple[int, ...], dims: tuple[int, ...]
) -> None:
    """Slice axis 0 is the image rows (H), 1 the columns (W): Hippocampus may flip R (axis 0)
    but never A (axis 1), which would swap the anterior and posterior classes."""
    x, y = blobs()
    xs, ys = spatial_augment(
        x, y, gen(0), p_flip=1.0, max_rotate_deg=0.0, scale=(1.0, 1.0), elastic_alpha=0.0,
        flip_axes=axes,
    )  # fmt: skip
    expected = x.flip(*dims) if dims else x
    torch.testing.assert_close(xs, expected)
    assert torch.equal(ys, y.flip(*dims) if dims else y)
    v1, _ = global_views(
        x, gen(0), p_flip=1.0, max_rotate_deg=0.0, scale=(1.0, 1.0), max_translate=0.0,
        brightness=0.0, gamma=(1.0, 1.0), noise_std=0.0, flip_axes=axes,
    )  # fmt: skip
    torch.testing.assert_close(v1, expected)


def test_stage_augment_configs_map_onto_the_functions() -> None:
    """Every AugmentConfig field reaches an argument: a config that only flips rows flips rows;
    ``augment: false`` is the identity; intensity settings reach ``intensity_augment``."""
    x, y = blobs()
    rows = AugmentConfig(flip_axes=(0,), p_flip=1.0)
    xs, ys = spatial_augment(x, y, gen(0), **spatial_args(rows))
    torch.testing.assert_close(xs, x.flip(-2))
    off = AugmentConfig.parse(False, FINETUNE_AUGMENT, "finetune.augment")
    assert not off.spatial and not off.intensity
    xs, ys = spatial_augment(x, y, gen(0), **spatial_args(off))
    torch.testing.assert_close(xs, x)
    bright = AugmentConfig(brightness=0.5, gamma=(1.0, 1.0))
    shifted = intensity_augment(x, gen(1), **intensity_args(bright))
    assert not torch.allclose(shifted, x)
    assert set(global_view_args(GLOBAL_AUGMENT)) <= set(global_views.__code__.co_varnames)


@pytest.mark.parametrize("label_dtype", [torch.long, torch.uint8])
def test_spatial_keeps_labels_in_set_and_aligned_with_image(label_dtype: torch.dtype) -> None:
    _, y = blobs(batch=6)
    y = y.to(label_dtype)
    x = y[:, None].float()  # an image equal to its own label map
    xs, ys = spatial_augment(x, y, gen(3), elastic_alpha=2.0, elastic_sigma=4.0)
    assert xs.shape == x.shape and xs.dtype == x.dtype
    assert ys.shape == y.shape and ys.dtype == label_dtype
    assert set(ys.unique().tolist()) <= {0, 1, 2}
    agree = (xs[:, 0].round() == ys.float()).float().mean()
    assert agree > 0.95
    assert not torch.equal(ys, y)  # it did move something


def test_rotation_is_rigid_on_non_square_images() -> None:
    # a disc rotated about its own centre stays the same disc, unless the rotation shears
    rows = torch.arange(32).view(32, 1).float() - 15.5
    cols = torch.arange(64).view(1, 64).float() - 31.5
    y = (rows**2 + cols**2 <= 100).long().expand(16, 32, 64).contiguous()  # 316 px each
    _, ys = spatial_augment(
        y[:, None].float(),
        y,
        gen(1),
        p_flip=0.0,
        max_rotate_deg=45.0,
        scale=(1.0, 1.0),
        elastic_alpha=0.0,
    )
    # a rigid rotation only re-pixelates the rim (~15 px per disc); one done in normalised
    # coordinates shears the disc into an ellipse (~100 px)
    assert (ys != y).sum(dim=(1, 2)).float().mean() < 30


def test_elastic_alone_moves_pixels_smoothly() -> None:
    x, y = blobs()
    xs, ys = spatial_augment(
        x, y, gen(5), p_flip=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0), elastic_alpha=1.5
    )
    changed = (ys != y).float().mean()
    assert 0 < changed < 0.2  # small, local deformation: most labels stay put
    # each displacement component has std alpha px: larger alpha -> more change
    _, ys_big = spatial_augment(
        x, y, gen(5), p_flip=0.0, max_rotate_deg=0.0, scale=(1.0, 1.0), elastic_alpha=4.0
    )
    assert (ys_big != y).float().mean() > changed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p_flip": 1.5}, "p_flip"),
        ({"max_rotate_deg": -1.0}, "max_rotate_deg"),
        ({"scale": (1.2, 0.8)}, "scale"),
        ({"elastic_alpha": -1.0}, "elastic_alpha"),
        ({"elastic_sigma": 0.0}, "elastic_sigma"),
    ],
)
def test_spatial_bad_arguments(kwargs: dict[str, object], match: str) -> None:
    x, y = blobs(batch=1)
    with pytest.raises(ValueError, match=match):
        spatial_augment(x, y, gen(0), **kwargs)  # type: ignore[arg-type]


def test_bad_inputs_raise() -> None:
    x, y = blobs(batch=2)
    with pytest.raises(ValueError, match=r"\(2, 32, 32\).*\(2, 16, 32\)"):
        spatial_augment(x, y[:, :16], gen(0))
    with pytest.raises(ValueError, match="integer"):
        spatial_augment(x, y.float(), gen(0))
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        intensity_views(x[:, 0], gen(0))
    with pytest.raises(ValueError, match="floating"):
        global_views(y[:, None], gen(0))
    with pytest.raises(ValueError, match="gamma"):
        intensity_views(x, gen(0), gamma=(0.0, 1.0))
    with pytest.raises(ValueError, match="brightness"):
        intensity_views(x, gen(0), brightness=-0.1)
    with pytest.raises(ValueError, match="Generator"):
        intensity_views(x, 0)  # type: ignore[arg-type]


def test_bf16_images() -> None:
    x, y = blobs(batch=2)
    xs, ys = spatial_augment(x.bfloat16(), y, gen(0))
    v1, _ = global_views(x.bfloat16(), gen(0))
    assert xs.dtype == v1.dtype == torch.bfloat16 and ys.dtype == torch.long


def test_augment_config_parses_spec_values_on_the_stage_default() -> None:
    assert AugmentConfig.parse(True, FINETUNE_AUGMENT, "k") is FINETUNE_AUGMENT
    merged = AugmentConfig.parse({"flip_axes": [0], "rotate_deg": 5}, FINETUNE_AUGMENT, "k")
    assert merged.flip_axes == (0,) and merged.rotate_deg == 5.0
    assert merged.elastic_alpha == FINETUNE_AUGMENT.elastic_alpha  # untouched keys kept
    with pytest.raises(ValueError, match=r"^finetune\.augment\.gamma"):
        AugmentConfig.parse({"gamma": [2.0, 1.0]}, FINETUNE_AUGMENT, "finetune.augment")


def test_flip_axes_default_to_the_dataset_and_budgets_to_epochs() -> None:
    from trainers.config import DataConfig, FinetuneConfig, GlobalConfig, bind_dataset

    assert DataConfig(kind="msd", root="x").flip_axes == ()  # a flip is a claim about anatomy
    assert DataConfig(kind="synthetic").flip_axes == (0,)
    cfg = bind_dataset(FinetuneConfig(), DataConfig(kind="msd", root="x", flip_axes=[1, 0]))
    assert cfg.augment.flip_axes == (0, 1)
    explicit = FinetuneConfig(augment={"flip_axes": []})
    assert bind_dataset(explicit, DataConfig(kind="synthetic")).augment.flip_axes == ()
    assert GlobalConfig().epochs == 100 and GlobalConfig(steps=5).epochs is None
    with pytest.raises(ValueError, match="give either epochs or steps"):
        FinetuneConfig(epochs=3, steps=5)
