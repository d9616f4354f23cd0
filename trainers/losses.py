"""Every loss of the method (METHOD.md, "Losses"), as plain functions over tensors.

Shapes: (B, D) for global embeddings, (B, C, H, W) for per-pixel embeddings and logits,
(B, H, W) for integer label maps with 0 = background. ``tau`` is the temperature.

- ``nt_xent``: SimCLR's NT-Xent (Chen et al. 2020), global.
- ``partition_global_loss``: Chaitanya et al. 2020's G^D, global, positives by slice partition.
- ``self_local_contrastive``: Chaitanya et al. 2020's self-supervised local loss on pooled regions.
- ``supervised_local_contrastive``: Hu et al. 2021's supervised local loss, strategies
  ``full`` (exact, memory linear in the pixel count), ``stride`` and ``block``.
- ``segmentation_loss``: cross-entropy + soft Dice (background excluded), hard or soft targets.

Contrastive logits always go through ``logsumexp`` / ``cross_entropy`` in float32 (float64
inputs stay float64), with autocast switched off inside, so bf16 / fp16 inputs give a
float32 loss and temperatures down to 1e-3 stay finite.

Under ``torch.distributed`` (initialised, world size > 1) the two global losses gather the
embeddings of every rank *with gradient* so negatives span the global batch. Each rank's loss
is the mean over its own anchors, so the mean of the ranks' losses is the global-batch loss.
The gather's backward sums every rank's gradient into the rank that owns the embedding, so the
gradient reaching a rank's embeddings is ``world_size`` times the global-batch loss's gradient;
DDP's gradient averaging (a division by ``world_size``) cancels that factor exactly, giving the
gradient of the global-batch loss. All ranks must pass the same batch size.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

__all__ = [
    "CUDA_TILE_SIZE",
    "DEFAULT_TILE_SIZE",
    "nt_xent",
    "partition_global_loss",
    "partition_of",
    "segmentation_loss",
    "self_local_contrastive",
    "supervised_local_contrastive",
]

STRATEGIES = ("full", "stride", "block")
FORMS = ("out", "in")

# One similarity tile holds at most tile_size**2 entries; the transient memory of the tiled
# pass is a few such tiles. CPU: 2048 (4M entries, 16 MiB in float32), the fastest of
# 512..4096 measured on CPU; CUDA: 4096 (16M entries, 64 MiB), fewer kernel launches.
DEFAULT_TILE_SIZE = 2048
CUDA_TILE_SIZE = 4096

DICE_EPS = 1e-5


# --------------------------------------------------------------------------------------------
# argument checks and helpers
# --------------------------------------------------------------------------------------------


def _check_temperature(temperature: Any) -> float:
    ok = (
        isinstance(temperature, int | float)
        and not isinstance(temperature, bool)
        and math.isfinite(temperature)
        and temperature > 0
    )
    if not ok:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return float(temperature)


def _check_positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return value


def _check_float(name: str, x: Tensor, ndim: int, layout: str) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor {layout}, got {type(x).__name__}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {layout}, got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got {x.dtype}")


def _check_int(name: str, x: Tensor, shape: tuple[int, ...], ref_name: str, ref: Tensor) -> None:
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if tuple(x.shape) != shape:
        raise ValueError(
            f"{name} shape {tuple(x.shape)} does not match {ref_name} shape {tuple(ref.shape)}"
            f" (expected {shape})"
        )
    if x.is_floating_point() or x.is_complex():
        raise ValueError(f"{name} must be an integer tensor, got {x.dtype}")


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64 (tests); everything else is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


def _world() -> tuple[int, int]:
    """(rank, world size); (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _check_same_batch(batch: int, world: int, device: torch.device) -> None:
    """All ranks must gather equally many rows; say which sizes differ instead of hanging."""
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([batch], dtype=torch.long, device=device))
    batch_sizes = [int(s.item()) for s in sizes]
    if len(set(batch_sizes)) != 1:
        raise ValueError(f"every rank must pass the same batch size, got {batch_sizes} by rank")


def _gather_rows(x: Tensor, world: int, with_grad: bool) -> Tensor:
    """Concatenate ``x`` (B, ...) of every rank in rank order; gradients flow back when asked.

    ``torch.distributed.nn.functional.all_gather``'s backward sums every rank's gradient for a
    slice into the rank that owns it (a reduce-scatter), which the module docstring relies on.
    """
    if with_grad:
        from torch.distributed.nn.functional import all_gather

        parts = list(all_gather(x.contiguous()))
    else:
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


def _global_views(z1: Tensor, z2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Normalised local anchors and the (possibly gathered) global set of views.

    Returns ``anchors`` (2B, D) = [z1; z2] of this rank, ``views`` (2G, D) = [z1 of all ranks;
    z2 of all ranks] (G = global batch), ``self_index`` (2B,) each anchor's row in ``views``
    and ``pair_index`` (2B,) the row of its other view.
    """
    dtype = _compute_dtype(z1)
    z1 = F.normalize(z1.to(dtype), dim=1)
    z2 = F.normalize(z2.to(dtype), dim=1)
    rank, world = _world()
    b = z1.shape[0]
    if world > 1:
        _check_same_batch(b, world, z1.device)
        all1, all2 = _gather_rows(z1, world, True), _gather_rows(z2, world, True)
    else:
        all1, all2 = z1, z2
    g = all1.shape[0]
    local = torch.arange(b, device=z1.device) + rank * b
    self_index = torch.cat([local, local + g])
    pair_index = torch.cat([local + g, local])
    return torch.cat([z1, z2]), torch.cat([all1, all2]), self_index, pair_index


def _mask_self(logits: Tensor, self_index: Tensor) -> Tensor:
    """``logits`` (A, M) with entry (a, self_index[a]) set to -inf (out of place)."""
    eye = torch.zeros_like(logits, dtype=torch.bool)
    eye[torch.arange(logits.shape[0], device=logits.device), self_index] = True
    return logits.masked_fill(eye, float("-inf"))


def _check_pair(z1: Tensor, z2: Tensor) -> None:
    _check_float("z1", z1, 2, "(B, D)")
    _check_float("z2", z2, 2, "(B, D)")
    if z1.shape != z2.shape:
        raise ValueError(f"z1 shape {tuple(z1.shape)} does not match z2 shape {tuple(z2.shape)}")
    if z1.shape[0] < 1:
        raise ValueError(f"z1 must hold at least one embedding, got shape {tuple(z1.shape)}")


# --------------------------------------------------------------------------------------------
# global losses
# --------------------------------------------------------------------------------------------


def nt_xent(z1: Tensor, z2: Tensor, temperature: float = 0.5) -> Tensor:
    """SimCLR's normalised temperature-scaled cross-entropy (Chen et al., ICML 2020).

    ``z1``, ``z2``: (B, D) embeddings of two augmented views of the same B images, row b of
    each being a positive pair; they are L2-normalised here (cosine similarity), so they need
    not be normalised already. With the 2B views u_1..u_2B and s_ik = u_i . u_k / tau:

        l_i = -log( exp(s_i,pos(i)) / sum_{k != i} exp(s_ik) ),   loss = mean_i l_i

    over all 2B anchors: each anchor's positive is its other view, the other 2B - 2 views are
    negatives (reference tau = 0.5). Under torch.distributed the views of every rank are
    gathered with gradient so negatives span the global batch; anchors stay this rank's 2B
    views (see the module docstring for how the gradient scales under DDP).

    Returns a scalar (float32; float64 for float64 inputs).
    """
    tau = _check_temperature(temperature)
    _check_pair(z1, z2)
    with _no_autocast(z1.device):
        anchors, views, self_index, pair_index = _global_views(z1, z2)
        logits = _mask_self(anchors @ views.T / tau, self_index)
        return F.cross_entropy(logits, pair_index)


def partition_of(position: Tensor, n_parts: int) -> Tensor:
    """Partition id in 0..n_parts-1 of each slice from its relative position in [0, 1)."""
    n_parts = _check_positive_int("n_parts", n_parts)
    return (position.to(torch.float64) * n_parts).floor().long().clamp_(0, n_parts - 1)


def partition_global_loss(
    z1: Tensor, z2: Tensor, partition: Tensor, temperature: float = 0.1
) -> Tensor:
    """Chaitanya et al.'s global loss G^D (NeurIPS 2020), in the SupCon "L_out" form.

    ``z1``, ``z2``: (B, D) embeddings of two views of B slices (normalised here);
    ``partition``: (B,) integer id of each slice's partition (its position bucket along the
    volume's slice axis, e.g. ``partition_of(position, n_parts)``). Over the 2B views with
    s_ik = u_i . u_k / tau, the positives of anchor i are P(i) = {k != i : partition_k =
    partition_i}, i.e. its other view and both views of every other slice of the same
    partition (from any volume); every k != i is in the denominator:

        l_i = -1/|P(i)| sum_{p in P(i)} [ s_ip - logsumexp_{k != i} s_ik ],   loss = mean_i l_i

    Gathers across ranks like ``nt_xent``. Returns a scalar (float32; float64 for float64).
    """
    tau = _check_temperature(temperature)
    _check_pair(z1, z2)
    _check_int("partition", partition, (z1.shape[0],), "z1", z1)
    with _no_autocast(z1.device):
        anchors, views, self_index, _ = _global_views(z1, z2)
        part = partition.to(device=z1.device, dtype=torch.long)
        _, world = _world()
        part_all = _gather_rows(part, world, False) if world > 1 else part
        anchor_part = torch.cat([part, part])
        view_part = torch.cat([part_all, part_all])
        logits = _mask_self(anchors @ views.T / tau, self_index)
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)
        positive = (anchor_part[:, None] == view_part[None, :]) & torch.isfinite(logits)
        per_anchor = torch.where(positive, log_prob, 0.0).sum(1) / positive.sum(1)
        return -per_anchor.mean()


# --------------------------------------------------------------------------------------------
# self-supervised local loss
# --------------------------------------------------------------------------------------------


def self_local_contrastive(
    e1: Tensor, e2: Tensor, regions: int = 8, temperature: float = 0.1
) -> Tensor:
    """Chaitanya et al.'s self-supervised local loss (NeurIPS 2020), in a pooled-region form.

    ``e1``, ``e2``: (B, D, H, W) per-pixel embeddings of two intensity-augmented, spatially
    aligned views of B images. Each map is average-pooled into ``regions`` x ``regions`` cells
    (H and W must be divisible by ``regions``) and every cell vector is L2-normalised. Within
    each image the 2R^2 cells (R = regions) of both views form one NT-Xent problem: cell (r, c)
    of view 1 and cell (r, c) of view 2 are positives, all other cells of both views of the
    same image are negatives:

        l_i = -log( exp(s_i,pos(i)) / sum_{k != i, same image} exp(s_ik) ),  s = u.u / tau

    loss = mean over images and the 2R^2 anchors of each. Returns a float32 scalar (float64
    for float64 inputs).
    """
    tau = _check_temperature(temperature)
    regions = _check_positive_int("regions", regions)
    _check_float("e1", e1, 4, "(B, D, H, W)")
    _check_float("e2", e2, 4, "(B, D, H, W)")
    if e1.shape != e2.shape:
        raise ValueError(f"e1 shape {tuple(e1.shape)} does not match e2 shape {tuple(e2.shape)}")
    b, _, h, w = e1.shape
    if h % regions or w % regions:
        raise ValueError(
            f"regions={regions} must divide H={h} and W={w} (e1 shape {tuple(e1.shape)})"
        )
    dtype = _compute_dtype(e1)
    with _no_autocast(e1.device):
        cells = []
        for e in (e1, e2):
            pooled = F.avg_pool2d(e.to(dtype), kernel_size=(h // regions, w // regions))
            cells.append(F.normalize(pooled.flatten(2), dim=1).transpose(1, 2))  # (B, R^2, D)
        u = torch.cat(cells, dim=1)  # (B, 2R^2, D)
        n = u.shape[1]
        logits = torch.bmm(u, u.transpose(1, 2)) / tau
        eye = torch.eye(n, dtype=torch.bool, device=u.device)
        logits = logits.masked_fill(eye, float("-inf"))
        target = (torch.arange(n, device=u.device) + n // 2) % n
        return F.cross_entropy(logits.reshape(b * n, n), target.repeat(b))


# --------------------------------------------------------------------------------------------
# supervised local loss
# --------------------------------------------------------------------------------------------


def _tile_shape(groups: int, rows: int, cols: int, tile_size: int) -> tuple[int, int, int]:
    """(groups, rows, columns) per tile so that one tile holds at most tile_size**2 entries."""
    budget = tile_size * tile_size
    r = max(1, min(rows, tile_size))
    t = max(1, min(cols, budget // r))
    g = max(1, min(groups, budget // (r * t)))
    return g, r, t


def _masked_tile(
    za_scaled: Tensor,
    zc: Tensor,
    anchor_pos: Tensor,
    anchor_lab: Tensor,
    col_lab: Tensor,
    c0: int,
    negatives_only: bool,
) -> Tensor:
    """s = za_scaled @ zc^T for one tile, (g, r, t), with the excluded columns at -inf.

    form "out" excludes k = i (the anchor's own column); form "in" excludes every column with
    the anchor's label (which includes k = i).
    """
    s = torch.bmm(za_scaled, zc.transpose(1, 2))
    if negatives_only:
        s.masked_fill_(anchor_lab[:, :, None] == col_lab[:, None, :], float("-inf"))
    else:
        rel = anchor_pos - c0
        hit = (rel >= 0) & (rel < s.shape[2])
        idx = rel.clamp(0, s.shape[2] - 1)[:, :, None]
        keep = s.gather(2, idx)
        s.scatter_(2, idx, torch.where(hit[:, :, None], float("-inf"), keep))
    return s


def _tiles(
    groups: int, rows: int, cols: int, tile_size: int
) -> Iterator[tuple[slice, slice, slice, int]]:
    """(group slice, row slice, column slice, first column) of every tile, in order."""
    g_step, r_step, c_step = _tile_shape(groups, rows, cols, tile_size)
    for g0 in range(0, groups, g_step):
        for r0 in range(0, rows, r_step):
            for c0 in range(0, cols, c_step):
                yield (
                    slice(g0, g0 + g_step),
                    slice(r0, r0 + r_step),
                    slice(c0, c0 + c_step),
                    c0,
                )


def _tile_logsumexp_(s: Tensor) -> Tensor:
    """logsumexp over the last dim, overwriting ``s``; rows of only -inf give -inf."""
    peak = s.amax(dim=2, keepdim=True)
    peak = torch.where(torch.isfinite(peak), peak, 0.0)
    return s.sub_(peak).exp_().sum(dim=2).log_().add_(peak.squeeze(2))


class _TiledAnchorLogSumExp(torch.autograd.Function):
    """lse[g, a] = logsumexp_{k allowed} z[g, pos[g, a]] . z[g, k] / tau, never forming G x A x M.

    ``z`` (G, M, C) contiguous, ``anchor_pos`` (G, A) positions of the anchors in their group,
    ``labels`` (G, M). Forward: tiles of (groups x anchor rows x columns), online log-sum-exp
    across column tiles. Backward recomputes each tile (like memory-efficient attention). With
    P_ik = exp(s_ik - lse_i) (0 on excluded columns) and upstream gradient g_i:

        d/dz_i (row side)    += g_i * sum_k P_ik z_k / tau
        d/dz_k (column side) += sum_i g_i P_ik z_i / tau

    k = i is always excluded, so no similarity involves z_i twice and there is no diagonal term.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        z: Tensor,
        anchor_pos: Tensor,
        labels: Tensor,
        inv_tau: float,
        negatives_only: bool,
        tile_size: int,
    ) -> Tensor:
        groups, rows = anchor_pos.shape
        cols, dim = z.shape[1], z.shape[2]
        flat_pos = _flat_index(anchor_pos, cols)
        za_scaled = z.reshape(groups * cols, dim).index_select(0, flat_pos)
        za_scaled = za_scaled.mul_(inv_tau).reshape(groups, rows, dim)
        anchor_lab = labels.gather(1, anchor_pos)
        lse = torch.full((groups, rows), float("-inf"), dtype=z.dtype, device=z.device)
        for gs, rs, cs, c0 in _tiles(groups, rows, cols, tile_size):
            s = _masked_tile(
                za_scaled[gs, rs],
                z[gs, cs],
                anchor_pos[gs, rs],
                anchor_lab[gs, rs],
                labels[gs, cs],
                c0,
                negatives_only,
            )
            lse[gs, rs] = torch.logaddexp(lse[gs, rs], _tile_logsumexp_(s))
        ctx.save_for_backward(z, za_scaled, anchor_pos, anchor_lab, labels, lse)
        ctx.inv_tau = inv_tau
        ctx.negatives_only = negatives_only
        ctx.tile_size = tile_size
        return lse

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_lse: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, za_scaled, anchor_pos, anchor_lab, labels, lse = ctx.saved_tensors
        groups, rows = anchor_pos.shape
        cols, dim = z.shape[1], z.shape[2]
        with _no_autocast(z.device):
            # rows whose every column is excluded have lse = -inf and no gradient: P = 0 there
            lse_safe = torch.where(torch.isfinite(lse), lse, float("inf"))
            grad_lse = grad_lse.to(z.dtype)
            grad_z = torch.zeros_like(z)
            grad_rows = torch.zeros_like(za_scaled)
            for gs, rs, cs, c0 in _tiles(groups, rows, cols, ctx.tile_size):
                p = _masked_tile(
                    za_scaled[gs, rs],
                    z[gs, cs],
                    anchor_pos[gs, rs],
                    anchor_lab[gs, rs],
                    labels[gs, cs],
                    c0,
                    ctx.negatives_only,
                )
                p.sub_(lse_safe[gs, rs, None]).exp_().mul_(grad_lse[gs, rs, None])
                grad_rows[gs, rs].baddbmm_(p, z[gs, cs], alpha=ctx.inv_tau)
                grad_z[gs, cs].baddbmm_(p.transpose(1, 2), za_scaled[gs, rs])
            grad_z = grad_z.reshape(groups * cols, dim)
            grad_z.index_add_(0, _flat_index(anchor_pos, cols), grad_rows.reshape(-1, dim))
        return grad_z.reshape(groups, cols, dim), None, None, None, None, None


def _flat_index(pos: Tensor, size: int) -> Tensor:
    """Row indices into a (G * size, ...) flattening of per-group positions ``pos`` (G, A)."""
    offsets = torch.arange(pos.shape[0], device=pos.device)[:, None] * size
    return (pos + offsets).reshape(-1)


def _grouped_supcon(z: Tensor, labels: Tensor, tau: float, form: str, tile_size: int) -> Tensor:
    """Exact supervised contrastive loss within each of G groups of pixels.

    ``z`` (G, M, C) in the compute dtype, ``labels`` (G, M) long >= 0. Inside each group,
    anchors are foreground pixels with at least one positive (and, for form "in", at least
    one negative); the loss is the mean over groups that have anchors of the mean over their
    anchors. Memory O(G*M*C + tile_size**2).
    """
    groups, m, dim = z.shape
    classes = int(labels.max()) + 1
    counts = torch.zeros(groups, classes, dtype=torch.long, device=z.device)
    counts.scatter_add_(1, labels, torch.ones_like(labels))
    same = counts.gather(1, labels)  # (G, M): pixels sharing each pixel's label, itself included
    valid = (labels > 0) & (same >= 2)
    if form == "in":
        valid &= same < m
    per_group = valid.sum(1)
    keep = per_group > 0
    if not bool(keep.any()):
        return z.sum() * 0.0
    if not bool(keep.all()):
        z, labels, valid, same, per_group = (
            z[keep],
            labels[keep],
            valid[keep],
            same[keep],
            per_group[keep],
        )
        groups = z.shape[0]
    z = z.contiguous()
    rows = int(per_group.max())
    # anchors first (stable), then padding rows that point at other pixels and get no weight
    anchor_pos = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)[:, :rows]
    weight = (torch.arange(rows, device=z.device)[None, :] < per_group[:, None]).to(z.dtype)
    weight = weight / (per_group[:, None].to(z.dtype) * groups)

    # positive part: sum_{p in P(i)} z_i . z_p = z_i . (S_{g, y_i} - z_i), S = per-class sums
    flat_z = z.reshape(groups * m, dim)
    class_sum = flat_z.new_zeros(groups * classes, dim)
    class_sum = class_sum.index_add(0, _flat_index(labels, classes), flat_z)
    anchor_lab = labels.gather(1, anchor_pos)
    own_class = class_sum.index_select(0, _flat_index(anchor_lab, classes))
    za = flat_z.index_select(0, _flat_index(anchor_pos, m))
    n_pos = (same.gather(1, anchor_pos) - 1).clamp(min=1).to(z.dtype).reshape(-1)
    mean_positive = (za * (own_class - za)).sum(1) / (n_pos * tau)  # mean_p s_ip

    lse = _TiledAnchorLogSumExp.apply(z, anchor_pos, labels, 1.0 / tau, form == "in", tile_size)
    weight = weight.reshape(-1)
    per_anchor = torch.where(weight > 0, lse.reshape(-1) - mean_positive, 0.0)
    return (per_anchor * weight).sum()


def supervised_local_contrastive(
    emb: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    strategy: str = "full",
    stride: int = 4,
    block_size: int = 16,
    form: str = "out",
    tile_size: int | None = None,
) -> Tensor:
    """Hu et al.'s supervised local contrastive loss (MICCAI 2021), computed exactly.

    ``emb``: (N, C, H, W) per-pixel embeddings, already L2-normalised along C (the local
    head's output; they are *not* renormalised here). ``labels``: (N, H, W) integer label maps,
    0 = background. All N maps (e.g. both intensity views of B slices, N = 2B) contrast with
    each other. With z the pixel embeddings and s_ik = z_i . z_k / tau, anchors are foreground
    pixels i (label > 0), positives P(i) = {j != i : y_j = y_i}, negatives N(i) = {k : y_k !=
    y_i} (background pixels are negatives, never anchors).

    form="out" (SupCon's L_out, the reference code's form; default):
        l_i = -1/|P(i)| sum_{p in P(i)} [ s_ip - logsumexp_{k != i} s_ik ]
    form="in" (the paper's printed formula: only negatives in the denominator):
        l_i = -1/|P(i)| sum_{p in P(i)} [ s_ip - logsumexp_{n in N(i)} s_in ]
    The two differ only in the denominator: "out" includes the positives (and so is bounded
    below by log|P(i)|), "in" does not (it can go below zero and keeps pushing positives
    together after they are ahead of every negative). In both, the positive part is
    -1/|P(i)| sum_p s_ip = -z_i . (S_{y_i} - z_i) / (|P(i)| tau) with S_c the sum of the
    embeddings of class c, so only the log-sum-exp needs all pairs.

    loss = mean of l_i over anchors that have at least one positive (form "in": and at least
    one negative; an anchor without negatives would have an infinite loss). Without any such
    anchor the loss is 0, still connected to the graph (zero gradients).

    strategy:
      - "full": every pixel of every map, exactly. The log-sum-exp runs over tiles of anchor
        rows x pixel columns with an online log-sum-exp and a backward that recomputes the
        tiles, so memory is O(N*H*W*C + tile_size**2), never the N*H*W x N*H*W matrix.
      - "stride": keep every ``stride``-th row and column (emb[:, :, ::stride, ::stride]),
        then "full" (paper: stride 4). stride=1 is "full".
      - "block": split every map into ``block_size`` x ``block_size`` cells at the same
        location across the N maps (H and W divisible by block_size); compute the loss within
        each cell over the N*b*b pixels of that cell, skip cells without an anchor, and take the
        plain mean over the remaining cells (paper: b = 16). All cells run batched through the
        same tiled algorithm. block_size = H = W is "full".

    ``tile_size``: one similarity tile holds at most tile_size**2 entries (default
    ``CUDA_TILE_SIZE`` = 4096 on CUDA, 64 MiB in float32, else ``DEFAULT_TILE_SIZE`` = 2048,
    16 MiB); the tiled pass holds a few tiles at a time.

    Precision: computed in float32 (float64 stays float64) with autocast off, so bf16 inputs
    and autocast regions give a float32 loss; finite down to tau = 1e-3. Returns a scalar.
    """
    tau = _check_temperature(temperature)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {list(STRATEGIES)}, got {strategy!r}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {list(FORMS)}, got {form!r}")
    _check_float("emb", emb, 4, "(N, C, H, W)")
    if tile_size is None:
        tile = CUDA_TILE_SIZE if emb.device.type == "cuda" else DEFAULT_TILE_SIZE
    else:
        tile = _check_positive_int("tile_size", tile_size)
    n, c, h, w = emb.shape
    _check_int("labels", labels, (n, h, w), "emb", emb)
    if strategy == "stride":
        stride = _check_positive_int("stride", stride)
        if stride > h or stride > w:
            raise ValueError(
                f"stride {stride} exceeds the map size H={h}, W={w} (emb shape {tuple(emb.shape)})"
            )
        emb, labels = emb[:, :, ::stride, ::stride], labels[:, ::stride, ::stride]
        h, w = emb.shape[2], emb.shape[3]
    if strategy == "block":
        block_size = _check_positive_int("block_size", block_size)
        if h % block_size or w % block_size:
            raise ValueError(
                f"block_size {block_size} must divide H={h} and W={w} (emb shape {tuple(emb.shape)})"
            )
    if emb.numel() == 0:
        raise ValueError(f"emb must not be empty, got shape {tuple(emb.shape)}")
    labels = labels.to(device=emb.device, dtype=torch.long)
    # value checks read the tensor on the host: only where that costs no device sync
    if labels.device.type == "cpu" and bool((labels < 0).any()):
        raise ValueError("labels must be >= 0 (0 = background)")

    with _no_autocast(emb.device):
        x = emb.to(_compute_dtype(emb))
        if strategy == "block":
            b = block_size
            # (N, C, H/b, b, W/b, b) -> (H/b, W/b, N, b, b, C) -> (cells, N*b*b, C)
            z = x.reshape(n, c, h // b, b, w // b, b).permute(2, 4, 0, 3, 5, 1)
            z = z.reshape((h // b) * (w // b), n * b * b, c)
            y = labels.reshape(n, h // b, b, w // b, b).permute(1, 3, 0, 2, 4)
            y = y.reshape((h // b) * (w // b), n * b * b)
        else:
            z = x.permute(0, 2, 3, 1).reshape(1, n * h * w, c)
            y = labels.reshape(1, n * h * w)
        return _grouped_supcon(z, y, tau, form, tile)


# --------------------------------------------------------------------------------------------
# segmentation
# --------------------------------------------------------------------------------------------


def segmentation_loss(logits: Tensor, target: Tensor, dice_weight: float = 1.0) -> Tensor:
    """Cross-entropy + ``dice_weight`` x soft Dice loss, background excluded (METHOD.md, finetune).

    ``logits``: (B, K, H, W) raw scores of K classes (class 0 = background, K >= 2).
    ``target``: either (B, H, W) integer labels in 0..K-1, or (B, K, H, W) float class
    probabilities (soft targets, e.g. Mixup: lam * onehot(a) + (1 - lam) * onehot(b)).
    With p = softmax(logits) and g the one-hot (or given) target probabilities:

        CE   = mean over pixels of -sum_k g_k log p_k
        Dice = 1 - 1/(K-1) sum_{k=1}^{K-1} (2 sum(p_k g_k) + eps) / (sum p_k + sum g_k + eps)

    the Dice sums running over the whole batch (all B images and pixels) per class, eps =
    1e-5. A foreground class absent from both target and prediction scores 1. Returns a
    float32 scalar (float64 for float64 logits).
    """
    _check_float("logits", logits, 4, "(B, K, H, W)")
    if (
        isinstance(dice_weight, bool)
        or not isinstance(dice_weight, int | float)
        or not (math.isfinite(dice_weight) and dice_weight >= 0)
    ):
        raise ValueError(f"dice_weight must be a finite number >= 0, got {dice_weight!r}")
    b, k, h, w = logits.shape
    if k < 2:
        raise ValueError(
            f"logits need K >= 2 classes (background + foreground), got shape {tuple(logits.shape)}"
        )
    if not isinstance(target, Tensor):
        raise ValueError(f"target must be a torch.Tensor, got {type(target).__name__}")
    dtype = _compute_dtype(logits)
    with _no_autocast(logits.device):
        log_p = F.log_softmax(logits.to(dtype), dim=1)
        if target.is_floating_point():
            if target.shape != logits.shape:
                raise ValueError(
                    f"soft target shape {tuple(target.shape)} does not match logits shape "
                    f"{tuple(logits.shape)}"
                )
            g = target.to(dtype)
            ce = -(g * log_p).sum(1).mean()
        else:
            if target.shape != (b, h, w):
                raise ValueError(
                    f"target shape {tuple(target.shape)} does not match logits shape "
                    f"{tuple(logits.shape)} (expected {(b, h, w)})"
                )
            target = target.long()
            # on CUDA, nll_loss's own device-side check catches this without a host sync
            if target.device.type == "cpu" and bool(((target < 0) | (target >= k)).any()):
                raise ValueError(
                    f"target labels must lie in 0..{k - 1} for logits with K={k} classes"
                )
            ce = F.nll_loss(log_p, target)
            classes = torch.arange(k, device=logits.device)[None, :, None, None]
            g = (target[:, None] == classes).to(dtype)
        if dice_weight == 0:
            return ce
        p = log_p.exp()[:, 1:]
        g = g[:, 1:]
        dims = (0, 2, 3)
        dice = (2 * (p * g).sum(dims) + DICE_EPS) / (p.sum(dims) + g.sum(dims) + DICE_EPS)
        return ce + dice_weight * (1 - dice.mean())
