"""CUDA checks: run by benchmarks/gpu.sh on a GPU machine; skipped (with the reason) elsewhere.

They check what the CPU suite cannot: the exact supervised loss on the GPU equals the float64
CPU value (also from bf16 inputs, within bf16's precision), augmentation and the loss's dense
parts make no host syncs, and every stage runs under bf16 autocast with channels_last.
"""

from __future__ import annotations

import pytest
import torch

from trainers.augment import global_views, intensity_views, spatial_augment
from trainers.config import FinetuneConfig, GlobalConfig, LocalConfig, ModelConfig, SplitConfig
from trainers.data import SliceData, labelled_subset, make_split
from trainers.loop import StageContext
from trainers.losses import segmentation_loss, supervised_local_contrastive
from trainers.model import UNet
from trainers.registry import STAGE_KINDS

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine"),
]

CUDA = torch.device("cuda")
TINY = ModelConfig(base_channels=8, depth=2, embed_dim=16, global_hidden=32, local_hidden=16)


def _embeddings(n: int, c: int, h: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    emb = torch.nn.functional.normalize(
        torch.randn(n, c, h, h, generator=g, dtype=torch.float64), dim=1
    )
    labels = torch.zeros(n, h, h, dtype=torch.long)
    labels[:, h // 4 : h // 2, h // 4 : h // 2] = 1
    labels[:, h // 2 : 3 * h // 4, h // 4 : h // 2] = 2
    return emb.to(device), labels.to(device)


@pytest.mark.parametrize("strategy", ["full", "stride", "block"])
@pytest.mark.parametrize("form", ["out", "in"])
def test_supervised_loss_on_cuda_matches_cpu_float64(strategy: str, form: str) -> None:
    emb, labels = _embeddings(8, 32, 32, torch.device("cpu"))
    kwargs = {"temperature": 0.1, "strategy": strategy, "stride": 2, "block_size": 16, "form": form}
    reference = supervised_local_contrastive(emb, labels, **kwargs)
    on_gpu = supervised_local_contrastive(emb.float().cuda(), labels.cuda(), **kwargs)
    assert on_gpu.dtype == torch.float32
    torch.testing.assert_close(on_gpu.double().cpu(), reference, rtol=1e-4, atol=1e-4)
    bf16 = supervised_local_contrastive(emb.bfloat16().cuda(), labels.cuda(), **kwargs)
    torch.testing.assert_close(bf16.double().cpu(), reference, rtol=3e-2, atol=3e-2)


def test_full_loss_gradient_on_cuda_matches_cpu() -> None:
    emb, labels = _embeddings(4, 16, 32, torch.device("cpu"))
    cpu = emb.clone().requires_grad_(True)
    supervised_local_contrastive(cpu, labels, temperature=0.1).backward()
    gpu = emb.float().cuda().requires_grad_(True)
    supervised_local_contrastive(gpu, labels.cuda(), temperature=0.1).backward()
    torch.testing.assert_close(gpu.grad.double().cpu(), cpu.grad, rtol=1e-4, atol=1e-5)


def test_augmentation_and_segmentation_loss_make_no_host_sync() -> None:
    x = torch.rand(8, 1, 64, 64, device=CUDA)
    y = torch.randint(0, 3, (8, 64, 64), device=CUDA)
    g = torch.Generator(device=CUDA).manual_seed(0)
    logits = torch.randn(8, 3, 64, 64, device=CUDA, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        global_views(x, g)
        intensity_views(x, g)
        spatial_augment(x, y, g)
        segmentation_loss(logits, y).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_unet_bf16_channels_last_forward_backward() -> None:
    model = UNet(TINY).to(CUDA).to(memory_format=torch.channels_last)
    x = torch.rand(4, 1, 32, 32, device=CUDA).to(memory_format=torch.channels_last)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(x)
        z = model.global_embedding(x)
        e = model.local_embedding(x)
    assert logits.shape == (4, 3, 32, 32)
    assert z.dtype == torch.float32 and e.dtype == torch.float32
    (logits.float().mean() + z.sum() + e.sum()).backward()
    assert all(p.grad is not None for p in model.encoder.parameters())


@pytest.mark.parametrize(
    ("stage", "cfg"),
    [
        ("global", GlobalConfig(epochs=1, batch_size=8)),
        ("local", LocalConfig(strategy="full", epochs=1, batch_size=2)),
        ("local", LocalConfig(strategy="block", block_size=8, epochs=1, batch_size=2)),
        ("finetune", FinetuneConfig(epochs=1, batch_size=4, regulariser="mean_teacher")),
    ],
    ids=["global", "local_full", "local_block", "finetune_mean_teacher"],
)
def test_every_stage_runs_on_cuda(stage: str, cfg: object, synthetic_slices: SliceData) -> None:
    split = make_split(synthetic_slices.num_volumes, SplitConfig(), 0)
    reports: list[dict[str, float]] = []
    ctx = StageContext(
        data=synthetic_slices,
        split=split,
        labelled=labelled_subset(split, 0.5),
        seed=0,
        device=CUDA,
        report=lambda metrics, _checkpoint: reports.append(metrics),
    )
    result = STAGE_KINDS[stage].run(cfg, TINY, ctx)
    assert len(reports) == 1 and torch.isfinite(torch.tensor(reports[0]["loss"]))
    assert all(t.device.type == "cpu" for t in result.state.values())


@pytest.mark.parametrize("fused_pass", ["vmap", "loop"])
def test_fused_finetunes_run_on_cuda_close_to_separate(
    fused_pass: str, synthetic_slices: SliceData
) -> None:
    """Two fine-tunings fused on CUDA (bf16 autocast) against separate runs: the same metric
    names, close losses, and each member's weight update (final - initial) equal to the
    separate run's within 10 % of its norm (bf16 rounding differs between a grouped and a plain
    convolution, and Adam's normalised steps amplify it on near-zero gradients)."""
    from trainers import seed_everything
    from trainers.fused import run_finetunes_fused
    from trainers.stages import run_finetune

    split = make_split(synthetic_slices.num_volumes, SplitConfig(), 0)
    cfg = FinetuneConfig(steps=4, batch_size=4, lr=1e-3)
    members = ((0, 0.2), (1, 0.5))

    def contexts() -> list[StageContext]:
        return [
            StageContext(
                data=synthetic_slices,
                split=split,
                labelled=labelled_subset(split, fraction),
                seed=seed,
                device=CUDA,
            )
            for seed, fraction in members
        ]

    fused = run_finetunes_fused(cfg, TINY, contexts(), fused_pass)
    alone = [run_finetune(cfg, TINY, ctx) for ctx in contexts()]
    for (seed, _), f, a in zip(members, fused, alone, strict=True):
        assert f.metrics["loss"] == pytest.approx(a.metrics["loss"], rel=2e-2)
        assert f.metrics.keys() == a.metrics.keys()
        seed_everything(seed)
        init = UNet(TINY, in_channels=1, num_classes=synthetic_slices.num_classes).state_dict()
        moved = torch.cat([(a.state[n] - init[n]).flatten() for n in init])
        apart = torch.cat([(f.state[n] - a.state[n]).flatten() for n in init])
        assert moved.norm() > 0 and apart.norm() <= 0.1 * moved.norm()
