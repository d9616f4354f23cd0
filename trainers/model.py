"""The 2D U-Net with its global, local and segmentation heads (METHOD.md, "Network").

Shapes follow (B, C, H, W). With ``base = cfg.base_channels`` and ``depth = cfg.depth``, level
``l`` of the encoder has ``base * 2**l`` channels at resolution ``(H / 2**l, W / 2**l)``; level
``depth`` is the centre (the reference network: base 64, depth 4 gives 64-128-256-512 and a
1024-channel centre at H/16). The decoder mirrors the encoder back to ``base`` channels at full
resolution.

Submodules, one per transferable part (``PARTS``): ``encoder``, ``decoder``, ``global_head``
(average pool to a ``global_grid`` x ``global_grid`` grid, flatten -> Linear -> ReLU -> Linear
on the centre features; ``global_grid`` = 1 is the reference's global average pool), ``local_head``
(1x1 conv -> ReLU -> 1x1 conv on the last decoder features) and ``seg_head`` (1x1 conv to the
class count). The reference projection head had no non-linearity between its two linear layers
and was never given to the optimiser; here it has a ReLU and is an ordinary trained submodule.

``transfer_weights`` loads parts of one stage's state into the next stage's model by explicit key
mapping and fails loudly on anything it cannot match (the reference loaded with ``strict=False``,
which silently skipped every ``module.``-prefixed key under DataParallel).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainers.config import ModelConfig

PARTS: tuple[str, ...] = ("encoder", "decoder", "global_head", "local_head", "seg_head")
OUTPUTS: tuple[str, ...] = ("logits", "global", "local")

# Prefixes that wrappers add to state_dict keys: DistributedDataParallel / DataParallel and
# torch.compile's OptimizedModule. They may be nested in either order.
_WRAPPER_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.")


def _norm_layer(kind: str, channels: int) -> nn.Module:
    """Normalisation layer ``kind`` (ModelConfig.norm) for ``channels`` feature maps."""
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = next(g for g in range(min(8, channels), 0, -1) if channels % g == 0)
        return nn.GroupNorm(groups, channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; expected instance, batch, group or none")


class ConvBlock(nn.Sequential):
    """Two (3x3 conv -> norm -> LeakyReLU(0.01)) layers: (B, c_in, H, W) -> (B, c_out, H, W)."""

    def __init__(self, c_in: int, c_out: int, norm: str) -> None:
        bias = norm == "none"  # a following norm layer makes a conv bias redundant
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel_size=3, padding=1, bias=bias),
            _norm_layer(norm, c_out),
            nn.LeakyReLU(0.01, inplace=True),
            nn.Conv2d(c_out, c_out, kernel_size=3, padding=1, bias=bias),
            _norm_layer(norm, c_out),
            nn.LeakyReLU(0.01, inplace=True),
        )


class Encoder(nn.Module):
    """``depth + 1`` ConvBlocks with a 2x2 max-pool before each but the first.

    forward: (B, in_channels, H, W) -> list of ``depth + 1`` tensors, level l of shape
    (B, base * 2**l, H / 2**l, W / 2**l); the last is the centre (bottleneck).
    """

    def __init__(self, in_channels: int, widths: Sequence[int], norm: str) -> None:
        super().__init__()
        c_ins = (in_channels, *widths[:-1])
        self.levels = nn.ModuleList(
            ConvBlock(c, w, norm) for c, w in zip(c_ins, widths, strict=True)
        )
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: Tensor) -> list[Tensor]:
        feats = [self.levels[0](x)]
        for level in self.levels[1:]:
            feats.append(level(self.pool(feats[-1])))
        return feats


class Decoder(nn.Module):
    """``depth`` up-steps: 2x2 transposed conv (halving channels), concatenate the skip, ConvBlock.

    forward: the encoder's list -> (B, base, H, W).
    """

    def __init__(self, widths: Sequence[int], norm: str) -> None:
        super().__init__()
        pairs = list(zip(widths[:0:-1], widths[-2::-1], strict=True))  # (deeper, shallower) widths
        self.up = nn.ModuleList(
            nn.ConvTranspose2d(hi, lo, kernel_size=2, stride=2) for hi, lo in pairs
        )
        self.blocks = nn.ModuleList(ConvBlock(2 * lo, lo, norm) for _, lo in pairs)

    def forward(self, feats: Sequence[Tensor]) -> Tensor:
        x = feats[-1]
        for up, block, skip in zip(self.up, self.blocks, reversed(feats[:-1]), strict=True):
            x = block(torch.cat([skip, up(x)], dim=1))
        return x


class UNet(nn.Module):
    """2D U-Net of METHOD.md with global, local and segmentation heads.

    Args:
        cfg: width (``base_channels``), ``depth`` (number of poolings), ``norm``, ``embed_dim``
            (both projections' output size), ``global_hidden`` and ``local_hidden``.
        in_channels: image channels (1 for MRI).
        num_classes: segmentation classes including background.

    Inputs are (B, in_channels, H, W) with H and W divisible by ``2**depth``; anything else
    raises ``ValueError`` naming the shape. Embeddings are returned in float32 even under
    autocast, since the contrastive losses divide their similarities by small temperatures.
    """

    def __init__(self, cfg: ModelConfig, in_channels: int = 1, num_classes: int = 3) -> None:
        super().__init__()
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 1:
            raise ValueError(f"in_channels must be an integer >= 1, got {in_channels!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an integer >= 2, got {num_classes!r}")
        self.cfg = cfg
        self.in_channels = in_channels
        self.num_classes = num_classes
        widths = [cfg.base_channels * 2**level for level in range(cfg.depth + 1)]
        self.encoder = Encoder(in_channels, widths, cfg.norm)
        self.decoder = Decoder(widths, cfg.norm if cfg.decoder_norm == "same" else "none")
        self.global_head = nn.Sequential(
            nn.AdaptiveAvgPool2d(cfg.global_grid),
            nn.Flatten(1),
            nn.Linear(widths[-1] * cfg.global_grid**2, cfg.global_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(cfg.global_hidden, cfg.embed_dim),
        )
        self.local_head = nn.Sequential(
            nn.Conv2d(cfg.base_channels, cfg.local_hidden, kernel_size=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(cfg.local_hidden, cfg.embed_dim, kernel_size=1),
        )
        self.seg_head = nn.Conv2d(cfg.base_channels, num_classes, kernel_size=1)

    def check_input(self, x: Tensor) -> None:
        """Raise ValueError unless ``x`` is (B, in_channels, H, W) with H, W divisible by 2**depth
        (and, with instance norm, a centre of more than one pixel, which it cannot normalise)."""
        multiple = 2**self.cfg.depth
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects input of shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        if x.shape[-2] % multiple or x.shape[-1] % multiple:
            raise ValueError(
                f"UNet of depth {self.cfg.depth} needs H and W divisible by {multiple}, "
                f"got input of shape {tuple(x.shape)}"
            )
        if self.cfg.norm == "instance" and x.shape[-2] == x.shape[-1] == multiple:
            raise ValueError(
                f"UNet of depth {self.cfg.depth} with instance norm needs a centre larger than "
                f"1x1 pixel (H or W > {multiple}), got input of shape {tuple(x.shape)}"
            )

    def encode(self, x: Tensor) -> list[Tensor]:
        """(B, in_channels, H, W) -> per-level features; the last is the centre (bottleneck)."""
        self.check_input(x)
        return self.encoder(x)

    def decode(self, feats: Sequence[Tensor]) -> Tensor:
        """The encoder's features -> last decoder features (B, base_channels, H, W)."""
        if len(feats) != self.cfg.depth + 1:
            raise ValueError(f"decode expects {self.cfg.depth + 1} feature maps, got {len(feats)}")
        return self.decoder(feats)

    def features_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(B, in_channels, H, W) -> (decoder features (B, base, H, W), logits (B, classes, H, W))."""
        features = self.decode(self.encode(x))
        return features, self.seg_head(features)

    def global_embedding(self, x: Tensor) -> Tensor:
        """z = normalise(W2 relu(W1 flatten(gridpool(centre(x))) + b1) + b2): (B, in, H, W) -> (B, embed_dim)."""
        return F.normalize(self.global_head(self.encode(x)[-1]).float(), dim=1)

    def local_embedding(self, x: Tensor) -> Tensor:
        """Per-pixel projection of the last decoder features, unit norm along dim 1: (B, D, H, W)."""
        features = self.decode(self.encode(x))
        return F.normalize(self.local_head(features).float(), dim=1)

    def forward(self, x: Tensor, output: str = "logits") -> Tensor:
        """Segmentation logits (B, num_classes, H, W), or with ``output="global"`` / ``"local"``
        the corresponding embedding. The selector lets a DistributedDataParallel or compiled
        wrapper run every stage's pass through its own ``forward``, as DDP's gradient sync needs.
        """
        if output == "logits":
            return self.seg_head(self.decode(self.encode(x)))
        if output == "global":
            return self.global_embedding(x)
        if output == "local":
            return self.local_embedding(x)
        raise ValueError(f"unknown output {output!r}; expected one of {list(OUTPUTS)}")


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of scalar parameters (only those with ``requires_grad`` if ``trainable_only``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel | nn.DataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # torch.compile's OptimizedModule
        else:
            return model


def strip_wrapper_prefixes(key: str) -> str:
    """``module._orig_mod.encoder.x`` -> ``encoder.x``: drop every leading wrapper prefix."""
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix) :], True
    return key


def _first(keys: Sequence[str], limit: int = 5) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def transfer_weights(state: Mapping[str, Tensor], model: UNet, parts: Sequence[str]) -> list[str]:
    """Copy the ``parts`` of ``state`` into ``model``, strictly, and return the keys loaded.

    ``state`` is a UNet ``state_dict``, possibly saved from a DDP / DataParallel / compiled
    wrapper (leading ``module.`` and ``_orig_mod.`` prefixes are stripped). For each part ``p``
    every model key under ``p.`` must be in ``state`` with the same shape and every ``state`` key
    under ``p.`` must exist in the model; otherwise ``ValueError`` lists the missing, unexpected
    and shape-mismatched keys. Nothing is copied unless every part matches. Values are cast to
    the model's dtype and device. Keys of parts not requested are ignored.
    """
    if isinstance(parts, str):
        raise ValueError(f"parts must be a sequence of part names, got the string {parts!r}")
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown model parts {unknown}; known parts: {list(PARTS)}")
    target = unwrap_model(model)
    if not isinstance(target, UNet):
        raise ValueError(f"transfer_weights expects a UNet, got {type(model).__name__}")

    source: dict[str, Tensor] = {}
    for raw_key, value in state.items():
        key = strip_wrapper_prefixes(raw_key)
        if key in source:
            raise ValueError(f"state has key {key!r} twice once wrapper prefixes are stripped")
        source[key] = value

    own = target.state_dict()
    wanted = tuple(dict.fromkeys(parts))  # requested parts, duplicates dropped, order kept
    under = tuple(f"{p}." for p in wanted)
    model_keys = [k for k in own if k.startswith(under)]
    source_keys = [k for k in source if k.startswith(under)]
    missing = [k for k in model_keys if k not in source]
    unexpected = [k for k in source_keys if k not in own]
    mismatched = [
        f"{k}: state {tuple(source[k].shape)} vs model {tuple(own[k].shape)}"
        for k in model_keys
        if k in source and source[k].shape != own[k].shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{label} ({len(keys)}): {_first(keys)}"
            for label, keys in (
                ("missing", missing),
                ("unexpected", unexpected),
                ("shape mismatch", mismatched),
            )
            if keys
        ]
        raise ValueError(f"cannot transfer parts {list(wanted)}: " + "; ".join(problems))

    with torch.no_grad():
        for key in model_keys:
            own[key].copy_(source[key])
    return model_keys
