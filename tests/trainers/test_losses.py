"""Every loss against a slow, obviously-correct reference (loops / dense masks, float64).

Values and gradients must agree within 1e-5 over a grid of shapes, class counts,
temperatures (1e-3 .. 1), forms and strategies; float32 must stay finite at tau = 1e-3;
nt_xent / partition_global_loss under a 2-process gloo group must equal the single-process
loss over the concatenated batch.
"""

from __future__ import annotations

import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from trainers.losses import (
    nt_xent,
    partition_global_loss,
    partition_of,
    segmentation_loss,
    self_local_contrastive,
    supervised_local_contrastive,
)

TOL = {"rtol": 1e-5, "atol": 1e-5}


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def ref_supcon_pixels(
    z: torch.Tensor, y: torch.Tensor, tau: float, form: str
) -> tuple[torch.Tensor, int]:
    """Sum of l_i over valid anchors and their count; z (M, C), y (M,), dense M x M masks."""
    m = z.shape[0]
    same = y[:, None] == y[None, :]
    not_self = ~torch.eye(m, dtype=torch.bool)
    positives = same & not_self
    denominator = not_self if form == "out" else ~same
    anchors = (y > 0) & positives.any(1) & denominator.any(1)
    if not anchors.any():
        return z.sum() * 0.0, 0
    s = z[anchors] @ z.T / tau  # (anchors, M)
    positives, denominator = positives[anchors], denominator[anchors]
    log_denominator = torch.logsumexp(s.masked_fill(~denominator, float("-inf")), dim=1)
    log_prob = torch.where(positives, s - log_denominator[:, None], 0.0)
    per_anchor = -log_prob.sum(1) / positives.sum(1)
    return per_anchor.sum(), int(anchors.sum())


def ref_supervised(emb, labels, tau, strategy="full", stride=4, block_size=16, form="out"):
    if strategy == "stride":
        emb, labels = emb[:, :, ::stride, ::stride], labels[:, ::stride, ::stride]
    n, c, h, w = emb.shape
    cells = []
    if strategy == "block":
        for r in range(0, h, block_size):
            for q in range(0, w, block_size):
                cells.append((slice(r, r + block_size), slice(q, q + block_size)))
    else:
        cells.append((slice(0, h), slice(0, w)))
    losses = []
    for rows, cols in cells:
        z = emb[:, :, rows, cols].permute(0, 2, 3, 1).reshape(-1, c)
        total, count = ref_supcon_pixels(z, labels[:, rows, cols].reshape(-1), tau, form)
        if count:
            losses.append(total / count)
    return torch.stack(losses).mean() if losses else emb.sum() * 0.0


def ref_nt_xent(z1, z2, tau):
    u = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    n = u.shape[0]
    terms = []
    for i in range(n):
        pos = (i + n // 2) % n
        logits = torch.stack([u[i] @ u[k] / tau for k in range(n) if k != i])
        terms.append(-(u[i] @ u[pos] / tau - torch.logsumexp(logits, 0)))
    return torch.stack(terms).mean()


def ref_partition(z1, z2, partition, tau):
    u = torch.cat([F.normalize(z1, dim=1), F.normalize(z2, dim=1)])
    part = torch.cat([partition, partition]).tolist()
    n = u.shape[0]
    terms = []
    for i in range(n):
        others = [k for k in range(n) if k != i]
        log_den = torch.logsumexp(torch.stack([u[i] @ u[k] / tau for k in others]), 0)
        pos = [u[i] @ u[k] / tau - log_den for k in others if part[k] == part[i]]
        terms.append(-torch.stack(pos).mean())
    return torch.stack(terms).mean()


def ref_self_local(e1, e2, regions, tau):
    b, d, h, w = e1.shape
    ch, cw = h // regions, w // regions
    terms = []
    for img in range(b):
        cells = []
        for e in (e1, e2):
            for r in range(regions):
                for q in range(regions):
                    v = e[img, :, r * ch : (r + 1) * ch, q * cw : (q + 1) * cw].mean(dim=(1, 2))
                    cells.append(v / v.norm())
        n = len(cells)
        for i in range(n):
            pos = (i + n // 2) % n
            others = torch.stack([cells[i] @ cells[k] / tau for k in range(n) if k != i])
            terms.append(-(cells[i] @ cells[pos] / tau - torch.logsumexp(others, 0)))
    return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def make_embeddings(n, c, h, w, classes, seed, dtype=torch.float64, fg_fraction=0.5):
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(n, c, h, w, generator=g, dtype=dtype), dim=1)
    fg = torch.rand(n, h, w, generator=g) < fg_fraction
    labels = torch.randint(1, max(classes, 2), (n, h, w), generator=g) * fg
    if classes == 1:
        labels.zero_()
    return emb, labels


def value_and_grad(fn, *tensors):
    leaves = [t.detach().clone().requires_grad_(True) for t in tensors]
    value = fn(*leaves)
    (grads) = torch.autograd.grad(value, leaves)
    return value.detach(), grads


def assert_same_value_and_grad(fn, ref, *tensors, tol=TOL):
    value, grads = value_and_grad(fn, *tensors)
    ref_value, ref_grads = value_and_grad(ref, *tensors)
    torch.testing.assert_close(value, ref_value, **tol)
    for got, want in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


# ---------------------------------------------------------------------------------------------
# supervised local loss
# ---------------------------------------------------------------------------------------------

SHAPES = [(1, 3, 4, 4), (2, 5, 4, 8), (3, 4, 8, 8)]
TEMPERATURES = [1e-3, 0.1, 1.0]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("classes", [2, 4])
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("form", ["out", "in"])
def test_supervised_full_matches_reference(shape, classes, tau, form):
    emb, labels = make_embeddings(*shape, classes, seed=sum(shape) * 10 + classes)
    assert_same_value_and_grad(
        lambda e: supervised_local_contrastive(e, labels, tau, "full", form=form),
        lambda e: ref_supervised(e, labels, tau, "full", form=form),
        emb,
    )


@pytest.mark.parametrize(
    ("strategy", "stride", "block_size", "shape"),
    [
        ("stride", 2, 16, (2, 4, 8, 8)),
        ("stride", 3, 16, (2, 4, 7, 8)),
        ("block", 16, 4, (2, 4, 8, 8)),
        ("block", 16, 2, (3, 3, 4, 6)),
        ("block", 16, 8, (1, 4, 8, 16)),
    ],
)
@pytest.mark.parametrize("tau", TEMPERATURES)
@pytest.mark.parametrize("form", ["out", "in"])
def test_supervised_strategies_match_reference(strategy, stride, block_size, shape, tau, form):
    emb, labels = make_embeddings(*shape, classes=3, seed=7, fg_fraction=0.3)
    kwargs = {"strategy": strategy, "stride": stride, "block_size": block_size, "form": form}
    assert_same_value_and_grad(
        lambda e: supervised_local_contrastive(e, labels, tau, **kwargs),
        lambda e: ref_supervised(e, labels, tau, **kwargs),
        emb,
    )


@pytest.mark.parametrize("form", ["out", "in"])
def test_block_covering_the_map_and_stride_one_equal_full(form):
    emb, labels = make_embeddings(2, 4, 8, 8, classes=3, seed=3)
    full = value_and_grad(lambda e: supervised_local_contrastive(e, labels, 0.2, form=form), emb)
    for kwargs in ({"strategy": "block", "block_size": 8}, {"strategy": "stride", "stride": 1}):
        got = value_and_grad(
            lambda e, kw=kwargs: supervised_local_contrastive(e, labels, 0.2, form=form, **kw), emb
        )
        torch.testing.assert_close(got[0], full[0], **TOL)
        torch.testing.assert_close(got[1][0], full[1][0], **TOL)


@pytest.mark.parametrize("tile_size", [1, 2, 3, 5, 7])
@pytest.mark.parametrize(
    ("strategy", "form"), [("full", "out"), ("full", "in"), ("block", "out"), ("block", "in")]
)
def test_tiny_tiles_give_the_same_loss(tile_size, strategy, form):
    """Many tiles with uneven last tiles (rows, columns and cell groups) change nothing."""
    emb, labels = make_embeddings(2, 3, 4, 6, classes=3, seed=11)
    kwargs = {"strategy": strategy, "block_size": 2, "form": form}
    assert_same_value_and_grad(
        lambda e: supervised_local_contrastive(e, labels, 0.1, tile_size=tile_size, **kwargs),
        lambda e: ref_supervised(e, labels, 0.1, **kwargs),
        emb,
    )


@pytest.mark.parametrize("strategy", ["full", "stride", "block"])
def test_no_foreground_gives_zero_connected_to_the_graph(strategy):
    emb, _ = make_embeddings(2, 4, 8, 8, classes=2, seed=0)
    emb.requires_grad_(True)
    labels = torch.zeros(2, 8, 8, dtype=torch.long)
    loss = supervised_local_contrastive(emb, labels, strategy=strategy, stride=2, block_size=4)
    assert loss.item() == 0.0
    loss.backward()
    assert emb.grad is not None and torch.count_nonzero(emb.grad) == 0


def test_single_pixel_class_has_no_anchor_but_is_a_negative():
    emb, labels = make_embeddings(1, 4, 4, 4, classes=2, seed=5)
    labels = labels.clamp(max=1)
    labels[0, 0, 0] = 2  # the only pixel of class 2: no positive, so not an anchor
    for form in ("out", "in"):
        assert_same_value_and_grad(
            lambda e, f=form: supervised_local_contrastive(e, labels, 0.1, form=f),
            lambda e, f=form: ref_supervised(e, labels, 0.1, form=f),
            emb,
        )
    only = torch.zeros(1, 4, 4, dtype=torch.long)
    only[0, 1, 1] = 3
    assert supervised_local_contrastive(emb, only).item() == 0.0


def test_form_in_skips_anchors_without_negatives():
    """A block entirely of one class has no negatives: no anchor there in form "in"."""
    emb, labels = make_embeddings(2, 4, 4, 4, classes=3, seed=9)
    labels[:, :2, :2] = 1
    assert_same_value_and_grad(
        lambda e: supervised_local_contrastive(e, labels, 0.1, "block", block_size=2, form="in"),
        lambda e: ref_supervised(e, labels, 0.1, "block", block_size=2, form="in"),
        emb,
    )
    everything = torch.ones(2, 4, 4, dtype=torch.long)
    assert supervised_local_contrastive(emb, everything, form="in").item() == 0.0


@pytest.mark.parametrize("strategy", ["full", "stride", "block"])
@pytest.mark.parametrize("form", ["out", "in"])
def test_float32_finite_at_tiny_temperature(strategy, form):
    emb, labels = make_embeddings(2, 16, 16, 16, classes=3, seed=2, dtype=torch.float32)
    emb.requires_grad_(True)
    loss = supervised_local_contrastive(
        emb, labels, 1e-3, strategy, stride=2, block_size=8, form=form, tile_size=64
    )
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert torch.isfinite(emb.grad).all()
    want = ref_supervised(emb.detach().double(), labels, 1e-3, strategy, 2, 8, form)
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-2)


def test_bf16_input_and_autocast_give_a_float32_loss():
    emb, labels = make_embeddings(2, 8, 8, 8, classes=3, seed=4, dtype=torch.float32)
    rounded = emb.bfloat16()
    loss = supervised_local_contrastive(rounded, labels, 0.1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, supervised_local_contrastive(rounded.float(), labels, 0.1))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under = supervised_local_contrastive(emb, labels, 0.1)
    assert under.dtype == torch.float32
    torch.testing.assert_close(under, supervised_local_contrastive(emb, labels, 0.1))


def test_channels_last_embeddings_are_accepted():
    emb, labels = make_embeddings(2, 4, 8, 8, classes=3, seed=6)
    for strategy in ("full", "block"):
        want = supervised_local_contrastive(emb, labels, 0.1, strategy, block_size=4)
        got = supervised_local_contrastive(
            emb.to(memory_format=torch.channels_last), labels, 0.1, strategy, block_size=4
        )
        torch.testing.assert_close(got, want, **TOL)


# ---------------------------------------------------------------------------------------------
# global and self-supervised local losses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("batch", "dim"), [(1, 3), (3, 5), (6, 8)])
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_nt_xent_matches_loop_reference(batch, dim, tau):
    g = torch.Generator().manual_seed(batch * dim)
    z1, z2 = (torch.randn(batch, dim, generator=g, dtype=torch.float64) for _ in range(2))
    assert_same_value_and_grad(
        lambda a, b: nt_xent(a, b, tau), lambda a, b: ref_nt_xent(a, b, tau), z1, z2
    )


@pytest.mark.parametrize(("batch", "parts"), [(2, 1), (5, 2), (8, 4)])
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_partition_loss_matches_loop_reference(batch, parts, tau):
    g = torch.Generator().manual_seed(batch + parts)
    z1, z2 = (torch.randn(batch, 6, generator=g, dtype=torch.float64) for _ in range(2))
    partition = torch.randint(0, parts, (batch,), generator=g)
    assert_same_value_and_grad(
        lambda a, b: partition_global_loss(a, b, partition, tau),
        lambda a, b: ref_partition(a, b, partition, tau),
        z1,
        z2,
    )


def test_partition_of_buckets_positions():
    position = torch.tensor([0.0, 0.24, 0.25, 0.5, 0.999])
    assert partition_of(position, 4).tolist() == [0, 0, 1, 2, 3]


@pytest.mark.parametrize(
    ("shape", "regions"), [((1, 3, 4, 4), 2), ((2, 4, 8, 4), 4), ((2, 3, 6, 6), 1)]
)
@pytest.mark.parametrize("tau", TEMPERATURES)
def test_self_local_matches_loop_reference(shape, regions, tau):
    g = torch.Generator().manual_seed(sum(shape))
    e1, e2 = (torch.randn(*shape, generator=g, dtype=torch.float64) for _ in range(2))
    assert_same_value_and_grad(
        lambda a, b: self_local_contrastive(a, b, regions, tau),
        lambda a, b: ref_self_local(a, b, regions, tau),
        e1,
        e2,
    )


def test_global_and_self_losses_finite_in_float32_at_tiny_temperature():
    g = torch.Generator().manual_seed(0)
    z1, z2 = (torch.randn(16, 32, generator=g).requires_grad_(True) for _ in range(2))
    e1, e2 = (torch.randn(2, 8, 16, 16, generator=g).requires_grad_(True) for _ in range(2))
    partition = torch.arange(16) % 4
    for loss in (
        nt_xent(z1, z2, 1e-3),
        partition_global_loss(z1, z2, partition, 1e-3),
        self_local_contrastive(e1, e2, 4, 1e-3),
    ):
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
    for t in (z1, z2, e1, e2):
        assert torch.isfinite(t.grad).all()


# ---------------------------------------------------------------------------------------------
# distributed: 2-process gloo group on CPU
# ---------------------------------------------------------------------------------------------

WORLD = 2


def _global_batch():
    g = torch.Generator().manual_seed(42)
    z1, z2 = (torch.randn(WORLD * 3, 5, generator=g, dtype=torch.float64) for _ in range(2))
    partition = torch.randint(0, 2, (WORLD * 3,), generator=g)
    return z1, z2, partition


def _distributed_worker(rank: int, port: int, out_dir: str) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    try:
        z1, z2, partition = _global_batch()
        rows = slice(rank * 3, (rank + 1) * 3)
        results = {}
        for name, fn in (
            ("nt_xent", lambda a, b: nt_xent(a, b, 0.5)),
            ("partition", lambda a, b: partition_global_loss(a, b, partition[rows], 0.1)),
        ):
            a = z1[rows].clone().requires_grad_(True)
            b = z2[rows].clone().requires_grad_(True)
            loss = fn(a, b)
            loss.backward()
            results[name] = (loss.detach(), a.grad, b.grad)
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_distributed_gather_equals_single_process_global_batch(tmp_path):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_distributed_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    z1, z2, partition = _global_batch()
    for name, fn in (
        ("nt_xent", lambda a, b: nt_xent(a, b, 0.5)),
        ("partition", lambda a, b: partition_global_loss(a, b, partition, 0.1)),
    ):
        value, (g1, g2) = value_and_grad(fn, z1, z2)
        mean_of_ranks = torch.stack([r[name][0] for r in ranks]).mean()
        torch.testing.assert_close(mean_of_ranks, value, **TOL)
        # each rank's gradient is WORLD x the global loss's: DDP's averaging divides it back
        got1 = torch.cat([r[name][1] for r in ranks]) / WORLD
        got2 = torch.cat([r[name][2] for r in ranks]) / WORLD
        torch.testing.assert_close(got1, g1, **TOL)
        torch.testing.assert_close(got2, g2, **TOL)


# ---------------------------------------------------------------------------------------------
# segmentation loss: tiny hand-computed cases
# ---------------------------------------------------------------------------------------------

EPS = 1e-5


def _onehot_logits(target, k, scale=60.0):
    return scale * F.one_hot(target, k).permute(0, 3, 1, 2).double()


SEGMENTATION_CASES = [
    # (name, logits, target, dice_weight, expected)
    (
        "perfect prediction: CE and Dice both ~0",
        _onehot_logits(torch.tensor([[[0, 1], [2, 1]]]), 3),
        torch.tensor([[[0, 1], [2, 1]]]),
        1.0,
        0.0,
    ),
    (
        "uniform over 2 classes, all foreground",
        torch.zeros(1, 2, 2, 2, dtype=torch.float64),
        torch.ones(1, 2, 2, dtype=torch.long),
        1.0,
        math.log(2) + 1 - (2 * 2.0 + EPS) / (2.0 + 4.0 + EPS),
    ),
    (
        "uniform over 3 classes, class 2 absent",
        torch.zeros(1, 3, 1, 2, dtype=torch.float64),
        torch.tensor([[[0, 1]]]),
        1.0,
        math.log(3) + 1 - ((2 / 3 + EPS) / (2 / 3 + 1 + EPS) + EPS / (2 / 3 + EPS)) / 2,
    ),
    (
        "dice weight 0.5",
        torch.zeros(1, 2, 2, 2, dtype=torch.float64),
        torch.ones(1, 2, 2, dtype=torch.long),
        0.5,
        math.log(2) + 0.5 * (1 - (4.0 + EPS) / (6.0 + EPS)),
    ),
]


@pytest.mark.parametrize(
    ("logits", "target", "dice_weight", "expected"),
    [case[1:] for case in SEGMENTATION_CASES],
    ids=[case[0] for case in SEGMENTATION_CASES],
)
def test_segmentation_loss_table(logits, target, dice_weight, expected):
    got = segmentation_loss(logits, target, dice_weight)
    assert got.item() == pytest.approx(expected, abs=1e-9)


def test_segmentation_loss_soft_targets():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 3, 4, 4, generator=g, dtype=torch.float64)
    a, b = torch.randint(0, 3, (2, 2, 4, 4), generator=g)
    onehot = lambda t: F.one_hot(t, 3).permute(0, 3, 1, 2).double()  # noqa: E731
    # one-hot probabilities are the hard target
    torch.testing.assert_close(segmentation_loss(logits, onehot(a)), segmentation_loss(logits, a))
    # dice weight 0 is plain (soft) cross-entropy: linear in the mixing weight
    lam = 0.3
    mixed = segmentation_loss(logits, lam * onehot(a) + (1 - lam) * onehot(b), 0.0)
    want = lam * F.cross_entropy(logits, a) + (1 - lam) * F.cross_entropy(logits, b)
    torch.testing.assert_close(mixed, want)
    # soft Dice with the given probabilities, by hand
    probs = lam * onehot(a) + (1 - lam) * onehot(b)
    p = logits.softmax(1)
    dices = [
        (2 * (p[:, k] * probs[:, k]).sum() + EPS) / (p[:, k].sum() + probs[:, k].sum() + EPS)
        for k in (1, 2)
    ]
    full = segmentation_loss(logits, probs)
    soft_ce = -(probs * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(full, soft_ce + 1 - torch.stack(dices).mean())


def test_segmentation_loss_gradient_and_dtype():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    target = torch.randint(0, 3, (2, 4, 4), dtype=torch.uint8)
    loss = segmentation_loss(logits.bfloat16(), target)
    assert loss.dtype == torch.float32
    loss.backward()
    assert torch.isfinite(logits.grad).all()


# ---------------------------------------------------------------------------------------------
# bad arguments
# ---------------------------------------------------------------------------------------------

_E = torch.randn(2, 4, 8, 8)
_L = torch.zeros(2, 8, 8, dtype=torch.long)
_Z = torch.randn(4, 3)

BAD_CALLS = [
    ("temperature 0", lambda: nt_xent(_Z, _Z, 0.0), "temperature"),
    (
        "temperature < 0",
        lambda: partition_global_loss(_Z, _Z, torch.zeros(4, dtype=torch.long), -1.0),
        "temperature",
    ),
    ("temperature nan", lambda: supervised_local_contrastive(_E, _L, float("nan")), "temperature"),
    ("temperature inf", lambda: self_local_contrastive(_E, _E, 2, float("inf")), "temperature"),
    ("temperature bool", lambda: nt_xent(_Z, _Z, True), "temperature"),
    ("z shapes", lambda: nt_xent(_Z, torch.randn(5, 3)), r"\(4, 3\).*\(5, 3\)"),
    ("z ndim", lambda: nt_xent(torch.randn(4), torch.randn(4)), r"\(B, D\)"),
    (
        "partition shape",
        lambda: partition_global_loss(_Z, _Z, torch.zeros(3, dtype=torch.long)),
        r"partition shape \(3,\).*\(4, 3\)",
    ),
    ("partition float", lambda: partition_global_loss(_Z, _Z, torch.zeros(4)), "integer"),
    (
        "labels shape",
        lambda: supervised_local_contrastive(_E, torch.zeros(2, 8, 4, dtype=torch.long)),
        r"\(2, 8, 4\).*\(2, 4, 8, 8\)",
    ),
    ("labels float", lambda: supervised_local_contrastive(_E, _L.float()), "integer"),
    ("labels negative", lambda: supervised_local_contrastive(_E, _L - 1), ">= 0"),
    (
        "strategy",
        lambda: supervised_local_contrastive(_E, _L, strategy="tiles"),
        "strategy.*'tiles'",
    ),
    ("form", lambda: supervised_local_contrastive(_E, _L, form="both"), "form.*'both'"),
    (
        "block not dividing",
        lambda: supervised_local_contrastive(_E, _L, strategy="block", block_size=3),
        "block_size 3",
    ),
    (
        "block 0",
        lambda: supervised_local_contrastive(_E, _L, strategy="block", block_size=0),
        "block_size",
    ),
    (
        "stride too large",
        lambda: supervised_local_contrastive(_E, _L, strategy="stride", stride=9),
        "stride 9",
    ),
    (
        "stride 0",
        lambda: supervised_local_contrastive(_E, _L, strategy="stride", stride=0),
        "stride",
    ),
    ("tile 0", lambda: supervised_local_contrastive(_E, _L, tile_size=0), "tile_size"),
    ("regions", lambda: self_local_contrastive(_E, _E, regions=3), "regions=3"),
    (
        "e shapes",
        lambda: self_local_contrastive(_E, torch.randn(2, 4, 8, 4)),
        r"\(2, 4, 8, 8\).*\(2, 4, 8, 4\)",
    ),
    (
        "seg target shape",
        lambda: segmentation_loss(torch.randn(2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long)),
        r"\(2, 4, 5\).*\(2, 3, 4, 4\)",
    ),
    (
        "seg soft shape",
        lambda: segmentation_loss(torch.randn(2, 3, 4, 4), torch.rand(2, 2, 4, 4)),
        r"\(2, 2, 4, 4\).*\(2, 3, 4, 4\)",
    ),
    (
        "seg label range",
        lambda: segmentation_loss(torch.randn(1, 3, 2, 2), torch.full((1, 2, 2), 3)),
        r"0\.\.2",
    ),
    (
        "seg one class",
        lambda: segmentation_loss(torch.randn(1, 1, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long)),
        "K >= 2",
    ),
    (
        "seg dice weight",
        lambda: segmentation_loss(
            torch.randn(1, 2, 2, 2), torch.zeros(1, 2, 2, dtype=torch.long), -1.0
        ),
        "dice_weight",
    ),
]


@pytest.mark.parametrize(
    ("call", "match"), [c[1:] for c in BAD_CALLS], ids=[c[0] for c in BAD_CALLS]
)
def test_bad_arguments_raise_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call()
