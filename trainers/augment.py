"""Batched, seeded data augmentation on the data's own device (METHOD.md, "Stages").

Every function takes images ``x`` of shape (B, C, H, W) (floats, roughly in [0, 1]) and an
explicit ``torch.Generator`` ``g`` on the same device; every random number is drawn from ``g``
in a fixed order, so a generator seeded the same way gives the same views. Parameters are drawn
per image as device tensors: no host synchronisation and no CPU tensors per call.

- ``intensity_views``: two views differing only in intensity (brightness shift, gamma, Gaussian
  noise); pixels stay aligned, as the local contrastive losses need.
- ``global_views``: two SimCLR-style views (random flips, rotation, scaling, crop-like
  translation, then the intensity changes) for the global contrastive loss.
- ``spatial_augment``: one random spatial transform (flips, rotation, scaling, elastic
  deformation) applied alike to images (bilinear) and label maps (nearest) for fine-tuning.

With C > 1 input channels every channel of an image gets the same spatial transform (one grid)
and its own intensity change.

Spatial transforms are expressed as one sampling grid (``affine_grid`` plus an elastic
displacement) and applied with a single ``grid_sample`` per tensor; samples from outside the
image read 0 (background, both for min-max-normalised images and for labels).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from trainers.config import AugmentConfig


def _check_images(x: Tensor, name: str = "x") -> None:
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (B, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_generator(g: torch.Generator, x: Tensor) -> None:
    if not isinstance(g, torch.Generator):
        raise ValueError(f"g must be a torch.Generator, got {type(g).__name__}")
    if g.device.type != x.device.type:
        raise ValueError(f"generator is on {g.device} but the data is on {x.device}")


def _check_range(name: str, low: float, high: float, minimum: float) -> None:
    if not (minimum <= low <= high and math.isfinite(high)):
        raise ValueError(f"{name} must satisfy {minimum} <= low <= high < inf, got ({low}, {high})")


def _uniform(n: int, low: float, high: float, g: torch.Generator, device: torch.device) -> Tensor:
    """(n,) float32 draws from U(low, high)."""
    return low + (high - low) * torch.rand(n, generator=g, device=device)


def _intensity(
    x: Tensor, g: torch.Generator, brightness: float, gamma: tuple[float, float], noise_std: float
) -> Tensor:
    """Per image and channel: v = max(x + b, 0) ** gamma + noise, b ~ U(-brightness,
    brightness), gamma ~ U(gamma), noise ~ N(0, noise_std^2) per pixel. Shape and dtype of
    ``x``. Each channel (modality) gets its own b and gamma; one channel draws exactly what it
    drew before channels existed."""
    n, c = x.shape[0], x.shape[1]
    shift = _uniform(n * c, -brightness, brightness, g, x.device).view(n, c, 1, 1)
    exponent = _uniform(n * c, gamma[0], gamma[1], g, x.device).view(n, c, 1, 1)
    noise = torch.randn(x.shape, generator=g, device=x.device) * noise_std
    out = (x.float() + shift).clamp_min(0).pow(exponent) + noise
    return out.to(x.dtype)


def _check_intensity_args(brightness: float, gamma: tuple[float, float], noise_std: float) -> None:
    if not (math.isfinite(brightness) and brightness >= 0):
        raise ValueError(f"brightness must be a finite number >= 0, got {brightness}")
    _check_range("gamma", gamma[0], gamma[1], minimum=1e-6)
    if not (math.isfinite(noise_std) and noise_std >= 0):
        raise ValueError(f"noise_std must be a finite number >= 0, got {noise_std}")


def intensity_views(
    x: Tensor,
    g: torch.Generator,
    brightness: float = 0.1,
    gamma: tuple[float, float] = (0.7, 1.5),
    noise_std: float = 0.05,
) -> tuple[Tensor, Tensor]:
    """Two intensity-augmented views of ``x`` (B, C, H, W), each (B, C, H, W), pixel-aligned.

    Each view of each image independently: ``v = max(x + b, 0) ** gamma + e`` with
    ``b ~ U(-brightness, brightness)``, ``gamma ~ U(gamma[0], gamma[1])`` (per image and
    channel) and
    ``e ~ N(0, noise_std^2)`` (per pixel). No spatial change.
    """
    _check_images(x)
    _check_generator(g, x)
    _check_intensity_args(brightness, gamma, noise_std)
    both = _intensity(torch.cat([x, x]), g, brightness, gamma, noise_std)
    return both[: x.shape[0]], both[x.shape[0] :]


def intensity_augment(
    x: Tensor,
    g: torch.Generator,
    brightness: float = 0.1,
    gamma: tuple[float, float] = (0.7, 1.5),
    noise_std: float = 0.05,
) -> Tensor:
    """One intensity-augmented view of ``x`` (B, C, H, W) (see ``intensity_views``)."""
    _check_images(x)
    _check_generator(g, x)
    _check_intensity_args(brightness, gamma, noise_std)
    return _intensity(x, g, brightness, gamma, noise_std)


def _affine_theta(
    n: int,
    height: int,
    width: int,
    g: torch.Generator,
    device: torch.device,
    p_flip: float,
    max_rotate_deg: float,
    scale: tuple[float, float],
    max_translate: float,
    flip_axes: tuple[int, ...] = (0, 1),
) -> Tensor:
    """(n, 2, 3) float32 ``affine_grid`` matrices: output -> input normalised coordinates.

    Per image: a flip along each slice axis in ``flip_axes`` (0 = rows, H; 1 = columns, W) with
    probability ``p_flip`` (both draws are made whatever the axes, so the rest of the stream does
    not depend on them), rotation by
    ``U(-max_rotate_deg, max_rotate_deg)`` degrees (in pixel space, so non-square images are not
    sheared), zoom by ``s ~ U(scale)`` (s > 1 enlarges the content) and a shift of the sampled
    window by ``U(-max_translate, max_translate)`` of the half-extent along each axis.
    """
    p_cols, p_rows = (p_flip if 1 in flip_axes else 0.0), (p_flip if 0 in flip_axes else 0.0)
    flip_x = 1 - 2 * (torch.rand(n, generator=g, device=device) < p_cols).float()
    flip_y = 1 - 2 * (torch.rand(n, generator=g, device=device) < p_rows).float()
    angle = _uniform(n, -math.radians(max_rotate_deg), math.radians(max_rotate_deg), g, device)
    inv_zoom = 1 / _uniform(n, scale[0], scale[1], g, device)
    shift = _uniform(2 * n, -max_translate, max_translate, g, device).view(n, 2)
    cos, sin = torch.cos(angle) * inv_zoom, torch.sin(angle) * inv_zoom
    aspect = height / width  # rotation R in pixels becomes D^-1 R D with D = diag(W/2, H/2)
    theta = torch.stack(
        [
            torch.stack([cos * flip_x, -sin * aspect * flip_y, shift[:, 0]], dim=1),
            torch.stack([sin / aspect * flip_x, cos * flip_y, shift[:, 1]], dim=1),
        ],
        dim=1,
    )
    return theta


def _gaussian_matrix(size: int, sigma: float, device: torch.device) -> Tensor:
    """(size, size) row-normalised Gaussian smoothing matrix; rows renormalised at the borders."""
    pos = torch.arange(size, device=device, dtype=torch.float32)
    weights = torch.exp(-0.5 * ((pos[:, None] - pos[None, :]) / sigma) ** 2)
    return weights / weights.sum(dim=1, keepdim=True)


def _elastic_displacement(
    n: int,
    height: int,
    width: int,
    g: torch.Generator,
    device: torch.device,
    alpha: float,
    sigma: float,
) -> Tensor:
    """(n, H, W, 2) smooth random displacement in normalised grid units (x, y order).

    White Gaussian noise smoothed by a separable Gaussian of ``sigma`` pixels
    (``G_H @ noise @ G_W^T``), rescaled to unit standard deviation at every pixel, times
    ``alpha``: each displacement component is N(0, alpha^2) pixels, correlated over ~sigma pixels.
    """
    noise = torch.randn(n, 2, height, width, generator=g, device=device)
    smooth_h = _gaussian_matrix(height, sigma, device)
    smooth_w = _gaussian_matrix(width, sigma, device)
    field = smooth_h @ noise @ smooth_w.T
    # std of the smoothed field at (i, j) is |G_H[i]| * |G_W[j]| for unit white noise
    std = smooth_h.norm(dim=1)[:, None] * smooth_w.norm(dim=1)[None, :]
    pixels = field * (alpha / std)
    return torch.stack([pixels[:, 0] * (2.0 / width), pixels[:, 1] * (2.0 / height)], dim=-1)


def _resample(x: Tensor, grid: Tensor, mode: str) -> Tensor:
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="zeros", align_corners=False)


def global_views(
    x: Tensor,
    g: torch.Generator,
    p_flip: float = 0.5,
    max_rotate_deg: float = 15.0,
    scale: tuple[float, float] = (0.85, 1.15),
    max_translate: float = 0.1,
    brightness: float = 0.1,
    gamma: tuple[float, float] = (0.7, 1.5),
    noise_std: float = 0.05,
    flip_axes: tuple[int, ...] = (0, 1),
) -> tuple[Tensor, Tensor]:
    """Two SimCLR-style views of ``x`` (B, C, H, W), each (B, C, H, W).

    Each view of each image gets its own random flips along ``flip_axes``, rotation, zoom and
    crop-like shift (see ``_affine_theta``), resampled bilinearly, then the intensity changes of
    ``intensity_views``.
    """
    _check_images(x)
    _check_generator(g, x)
    _check_spatial_args(p_flip, max_rotate_deg, scale)
    if not (math.isfinite(max_translate) and 0 <= max_translate <= 1):
        raise ValueError(f"max_translate must be in [0, 1], got {max_translate}")
    n, _, height, width = x.shape
    both = torch.cat([x, x])
    theta = _affine_theta(
        2 * n, height, width, g, x.device, p_flip, max_rotate_deg, scale, max_translate, flip_axes
    )
    grid = F.affine_grid(theta, list(both.shape), align_corners=False)
    both = _resample(both, grid, mode="bilinear")
    both = _intensity(both, g, brightness, gamma, noise_std)
    return both[:n], both[n:]


def _check_spatial_args(p_flip: float, max_rotate_deg: float, scale: tuple[float, float]) -> None:
    if not (0 <= p_flip <= 1):
        raise ValueError(f"p_flip must be in [0, 1], got {p_flip}")
    if not (math.isfinite(max_rotate_deg) and 0 <= max_rotate_deg <= 180):
        raise ValueError(f"max_rotate_deg must be in [0, 180], got {max_rotate_deg}")
    _check_range("scale", scale[0], scale[1], minimum=1e-3)


def spatial_augment(
    x: Tensor,
    y: Tensor,
    g: torch.Generator,
    p_flip: float = 0.5,
    max_rotate_deg: float = 15.0,
    scale: tuple[float, float] = (0.85, 1.15),
    elastic_alpha: float = 1.5,
    elastic_sigma: float = 6.0,
    flip_axes: tuple[int, ...] = (0, 1),
    max_translate: float = 0.0,
) -> tuple[Tensor, Tensor]:
    """The same random spatial transform applied to images ``x`` (B, C, H, W) and labels ``y``
    (B, H, W) (integer): returns (x', y') of the same shapes and dtypes.

    Per image: flips along ``flip_axes``, rotation, zoom and shift (as ``global_views``; no
    shift by default) composed with an elastic
    deformation whose displacement is N(0, elastic_alpha^2) pixels per component, smoothed
    over ``elastic_sigma`` pixels (``elastic_alpha=0`` turns it off). One sampling grid serves
    both tensors: bilinear for images, nearest for labels, so labels keep their values.
    """
    _check_images(x)
    _check_generator(g, x)
    if y.ndim != 3 or y.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(
            f"labels must have shape (B, H, W) = {(x.shape[0], *x.shape[2:])} to match images "
            f"{tuple(x.shape)}, got {tuple(y.shape)}"
        )
    if y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {y.dtype}")
    if y.device != x.device:
        raise ValueError(f"labels are on {y.device} but images are on {x.device}")
    _check_spatial_args(p_flip, max_rotate_deg, scale)
    if not (math.isfinite(elastic_alpha) and elastic_alpha >= 0):
        raise ValueError(f"elastic_alpha must be a finite number >= 0, got {elastic_alpha}")
    if not (math.isfinite(elastic_sigma) and elastic_sigma > 0):
        raise ValueError(f"elastic_sigma must be a finite number > 0, got {elastic_sigma}")
    n, _, height, width = x.shape
    theta = _affine_theta(
        n, height, width, g, x.device, p_flip, max_rotate_deg, scale, max_translate, flip_axes
    )
    grid = F.affine_grid(theta, [n, 1, height, width], align_corners=False)
    if elastic_alpha > 0:
        grid = grid + _elastic_displacement(
            n, height, width, g, x.device, elastic_alpha, elastic_sigma
        )
    x_out = _resample(x, grid, mode="bilinear")
    y_out = _resample(y[:, None].float(), grid, mode="nearest")[:, 0].to(y.dtype)
    return x_out, y_out


# ---------------------------------------------------------------------------------------------
# from a stage's AugmentConfig to the arguments of the functions above


def intensity_args(cfg: AugmentConfig) -> dict[str, Any]:
    """``intensity_views`` / ``intensity_augment`` arguments of ``cfg``."""
    return {"brightness": cfg.brightness, "gamma": cfg.gamma, "noise_std": cfg.noise_std}


def _flip_args(cfg: AugmentConfig) -> dict[str, Any]:
    # None (defer to the dataset) reaching a stage means no dataset bound it: flip nothing
    return {"p_flip": cfg.p_flip, "flip_axes": cfg.flip_axes or ()}


def spatial_args(cfg: AugmentConfig) -> dict[str, Any]:
    """``spatial_augment`` arguments of ``cfg``."""
    return {
        **_flip_args(cfg),
        "max_rotate_deg": cfg.rotate_deg,
        "scale": cfg.scale,
        "elastic_alpha": cfg.elastic_alpha,
        "elastic_sigma": cfg.elastic_sigma,
        "max_translate": cfg.translate,
    }


def global_view_args(cfg: AugmentConfig) -> dict[str, Any]:
    """``global_views`` arguments of ``cfg`` (no elastic deformation there)."""
    return {
        **_flip_args(cfg),
        "max_rotate_deg": cfg.rotate_deg,
        "scale": cfg.scale,
        "max_translate": cfg.translate,
        **intensity_args(cfg),
    }
