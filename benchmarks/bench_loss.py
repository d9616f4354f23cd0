"""Benchmark of the supervised local contrastive loss: naive N x N vs stride vs block vs exact.

One run compares, side by side, forward + backward of

- ``naive``:  a plain dense implementation (kept here, in the style of the reference code: the
              N x N similarity, an exp, float masks, log of the masked sum), exact;
- ``stride``: ``supervised_local_contrastive(strategy="stride", stride=4)`` (an approximation);
- ``block``:  ``supervised_local_contrastive(strategy="block", block_size=16)`` (an approximation);
- ``full``:   ``supervised_local_contrastive(strategy="full")``, exact, tiled, memory linear in N,

over N pixels (N = maps x H x W; 64 x 64 maps, 32 x 32 when N is not a multiple of 4096),
C = 128 channels, tau = 0.1, form "out". Inputs are seeded: L2-normalised random embeddings and
label maps with two small foreground blobs (classes 1 and 2) per map, about 5 % foreground as
in Hippocampus. Each figure is the median over ``--repeats`` timed runs after ``--warmup``
untimed ones. Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` above what the inputs
hold; on CPU each (impl, N) runs in a fresh subprocess and reports its peak RSS growth
(``getrusage(RUSAGE_SELF).ru_maxrss``) over the baseline taken after imports and input
creation, so every figure is isolated. The loss value of each is reported so that full == naive
can be checked.

    python benchmarks/bench_loss.py                      # CPU, N in [2048, 8192]
    python benchmarks/bench_loss.py --device cuda --out results/bench_loss_h100.json

stdout: one JSON object (machine, torch, device, settings, results, target checks);
stderr: a short human-readable table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainers.losses import (  # noqa: E402
    CUDA_TILE_SIZE,
    DEFAULT_TILE_SIZE,
    supervised_local_contrastive,
)

IMPLS = ("naive", "stride", "block", "full")
CPU_SIZES = (2048, 8192)
CUDA_SIZES = (16384, 32768, 49152, 65536, 131072)
TEMPERATURE = 0.1
STRIDE = 4
BLOCK = 16
# naive holds about this many N x N float32 matrices at its peak (similarity, exp, masks,
# log-probabilities and their gradients); used to skip sizes that cannot fit on the GPU
NAIVE_MATRICES = 7


# --------------------------------------------------------------------------------------------
# the naive baseline
# --------------------------------------------------------------------------------------------


def naive_supervised_local(
    emb: torch.Tensor, labels: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Dense SupCon L_out over all N x N pixel pairs, the way the reference code computes it.

    emb (B, C, H, W) L2-normalised along C, labels (B, H, W); anchors are foreground pixels with
    at least one positive; returns the mean over anchors of
    -1/|P(i)| sum_p [ s_ip - log sum_{k != i} exp(s_ik) ], s = z.z / temperature.
    """
    c = emb.shape[1]
    z = emb.permute(0, 2, 3, 1).reshape(-1, c).float()
    y = labels.reshape(-1)
    m = z.shape[0]
    logits = z @ z.T / temperature
    logits = logits - logits.max(dim=1, keepdim=True).values.detach()
    not_self = 1.0 - torch.eye(m, device=z.device)
    positive = (y[:, None] == y[None, :]).float() * not_self
    exp_logits = torch.exp(logits) * not_self
    log_prob = logits - torch.log(exp_logits.sum(1, keepdim=True))
    n_pos = positive.sum(1)
    anchors = (y > 0) & (n_pos > 0)
    mean_log_prob = (positive * log_prob).sum(1)[anchors] / n_pos[anchors]
    return -mean_log_prob.mean()


def loss_fn(
    impl: str, tile_size: int | None
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    if impl == "naive":
        return lambda e, y: naive_supervised_local(e, y, TEMPERATURE)
    if impl == "stride":
        return lambda e, y: supervised_local_contrastive(e, y, TEMPERATURE, "stride", stride=STRIDE)
    if impl == "block":
        return lambda e, y: supervised_local_contrastive(
            e, y, TEMPERATURE, "block", block_size=BLOCK
        )
    if impl == "full":
        return lambda e, y: supervised_local_contrastive(
            e, y, TEMPERATURE, "full", tile_size=tile_size
        )
    raise ValueError(f"unknown impl {impl!r}; choose from {list(IMPLS)}")


# --------------------------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------------------------


def map_side(n: int) -> int:
    for side in (64, 32):
        if n % (side * side) == 0:
            return side
    raise ValueError(f"N={n} must be a multiple of 1024 (32 x 32 maps) or 4096 (64 x 64 maps)")


def make_inputs(
    n: int, channels: int, device: torch.device, dtype: torch.dtype, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (maps, C, side, side) unit embeddings and blob label maps totalling n pixels."""
    side = map_side(n)
    maps = n // (side * side)
    g = torch.Generator().manual_seed(seed)
    emb = F.normalize(torch.randn(maps, channels, side, side, generator=g), dim=1)
    yy, xx = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    labels = torch.zeros(maps, side, side, dtype=torch.long)
    radius = 0.086 * side  # two discs of this radius cover ~4.6 % of the map
    for i in range(maps):
        for cls in (1, 2):
            cy, cx = (torch.rand(2, generator=g) * 0.5 + 0.25) * side
            disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2
            labels[i][disc] = cls
    return emb.to(device=device, dtype=dtype), labels.to(device)


# --------------------------------------------------------------------------------------------
# measurement
# --------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runs(
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    emb: torch.Tensor,
    labels: torch.Tensor,
    warmup: int,
    repeats: int,
) -> tuple[list[float], float]:
    """Times (ms) of ``repeats`` forward+backward runs after ``warmup`` untimed ones; the loss."""
    leaf = emb.detach().requires_grad_(True)
    value = math.nan
    times = []
    for i in range(warmup + repeats):
        leaf.grad = None
        _sync(emb.device)
        start = time.perf_counter()
        loss = fn(leaf, labels)
        loss.backward()
        _sync(emb.device)
        if i >= warmup:
            times.append((time.perf_counter() - start) * 1e3)
        value = float(loss.detach())
        del loss
    return times, value


def measure_in_process(
    impl: str,
    n: int,
    channels: int,
    dtype: torch.dtype,
    device: torch.device,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """CUDA: time and peak allocated memory above the inputs, in this process."""
    emb, labels = make_inputs(n, channels, device, dtype, args.seed)
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    try:
        times, value = time_runs(
            loss_fn(impl, args.tile_size), emb, labels, args.warmup, args.repeats
        )
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "out of memory"}
    peak = torch.cuda.max_memory_allocated(device) - base
    return _record(times, value, peak)


def measure_in_subprocess(
    impl: str, n: int, channels: int, args: argparse.Namespace
) -> dict[str, Any]:
    """CPU: a fresh interpreter per (impl, N) so that each peak RSS figure is isolated."""
    spec = {
        "impl": impl, "n": n, "channels": channels, "seed": args.seed,
        "warmup": args.warmup, "repeats": args.repeats, "tile_size": args.tile_size,
        "threads": args.threads,
    }  # fmt: skip
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"status": f"failed (exit {proc.returncode}): {tail}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    emb, labels = make_inputs(
        spec["n"], spec["channels"], torch.device("cpu"), torch.float32, spec["seed"]
    )
    fn = loss_fn(spec["impl"], spec["tile_size"])
    base_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    times, value = time_runs(fn, emb, labels, spec["warmup"], spec["repeats"])
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_kib
    return _record(times, value, peak_kib * 1024)


def _record(times: list[float], value: float, peak_bytes: int) -> dict[str, Any]:
    return {
        "status": "ok",
        "median_ms": statistics.median(times),
        "min_ms": min(times),
        "times_ms": [round(t, 3) for t in times],
        "peak_mib": peak_bytes / 2**20,
        "loss": value,
    }


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def machine_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["device_name"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        info["allow_tf32_matmul"] = torch.backends.cuda.matmul.allow_tf32
    return info


def find(results: list[dict[str, Any]], impl: str, n: int, dtype: str) -> dict[str, Any] | None:
    for r in results:
        if (r["impl"], r["n"], r["dtype"]) == (impl, n, dtype) and r["status"] == "ok":
            return r
    return None


def check_targets(results: list[dict[str, Any]], device: torch.device) -> dict[str, Any]:
    """The issue's targets, evaluated on what this run measured (None: not measured)."""
    if device.type == "cpu":
        full, naive = (
            find(results, "full", 8192, "float32"),
            find(results, "naive", 8192, "float32"),
        )
        if full is None or naive is None:
            return {"cpu_n8192": None}
        return {
            "cpu_n8192": {
                "full_no_slower_than_naive": full["median_ms"] <= naive["median_ms"],
                "full_peak_at_most_15pct_of_naive": full["peak_mib"] <= 0.15 * naive["peak_mib"],
                "time_ratio_full_over_naive": full["median_ms"] / naive["median_ms"],
                "memory_ratio_full_over_naive": full["peak_mib"] / naive["peak_mib"],
                "abs_loss_difference": abs(full["loss"] - naive["loss"]),
            }
        }
    full = find(results, "full", 65536, "float32")
    if full is None:
        return {"cuda_n65536": None}
    return {
        "cuda_n65536": {
            "fwd_bwd_at_most_60ms": full["median_ms"] <= 60.0,
            "peak_at_most_4gib": full["peak_mib"] <= 4 * 1024,
            "median_ms": full["median_ms"],
            "peak_mib": full["peak_mib"],
        }
    }


def print_table(results: list[dict[str, Any]]) -> None:
    header = (
        f"{'impl':<7} {'N':>7} {'dtype':<9} {'median ms':>10} {'min ms':>9} {'peak MiB':>10}"
        f" {'loss':>12}  status"
    )
    print(header, file=sys.stderr)
    print("-" * len(header), file=sys.stderr)
    for r in results:
        if r["status"] == "ok":
            cells = (
                f"{r['median_ms']:>10.1f} {r['min_ms']:>9.1f} {r['peak_mib']:>10.1f}"
                f" {r['loss']:>12.6f}"
            )
        else:
            cells = f"{'-':>10} {'-':>9} {'-':>10} {'-':>12}"
        print(f"{r['impl']:<7} {r['n']:>7} {r['dtype']:<9} {cells}  {r['status']}", file=sys.stderr)


def naive_fits(n: int, device: torch.device) -> bool:
    free, _ = torch.cuda.mem_get_info(device)
    return NAIVE_MATRICES * 4 * n * n <= 0.9 * free


def run(args: argparse.Namespace) -> dict[str, Any]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    sizes = args.sizes or (CUDA_SIZES if device.type == "cuda" else CPU_SIZES)
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])
    results = []
    for dtype in dtypes:
        for n in sizes:
            for impl in args.impls:
                row: dict[str, Any] = {
                    "impl": impl,
                    "n": n,
                    "dtype": str(dtype).removeprefix("torch."),
                }
                if device.type == "cpu":
                    row.update(measure_in_subprocess(impl, n, args.channels, args))
                elif impl == "naive" and not naive_fits(n, device):
                    row["status"] = (
                        f"skipped: ~{NAIVE_MATRICES} N x N fp32 matrices exceed free memory"
                    )
                else:
                    row.update(measure_in_process(impl, n, args.channels, dtype, device, args))
                results.append(row)
                print_progress(row)
    return {
        "benchmark": "supervised_local_contrastive forward+backward",
        "machine": machine_info(device),
        "settings": {
            "channels": args.channels,
            "temperature": TEMPERATURE,
            "form": "out",
            "stride": STRIDE,
            "block_size": BLOCK,
            "tile_size": args.tile_size
            or (CUDA_TILE_SIZE if device.type == "cuda" else DEFAULT_TILE_SIZE),
            "warmup": args.warmup,
            "repeats": args.repeats,
            "seed": args.seed,
            "memory": "cuda: max_memory_allocated above inputs"
            if device.type == "cuda"
            else "cpu: peak RSS growth of a fresh subprocess per (impl, N) over its post-input baseline",
        },  # fmt: skip
        "results": results,
        "targets": check_targets(results, device),
    }


def print_progress(row: dict[str, Any]) -> None:
    status = row["status"] if row["status"] != "ok" else f"{row['median_ms']:.1f} ms"
    print(
        f"  {row['impl']:<7} N={row['n']:<7} {row['dtype']:<9} {status}",
        file=sys.stderr,
        flush=True,
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sizes", type=int, nargs="+", help="pixel counts N (default per device)")
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs (cpu 1, cuda 3)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (cpu 5, cuda 10)")
    parser.add_argument("--tile-size", type=int, help="full's tile size (default: the loss's own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 on a contended machine"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON object here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    args.warmup = (3 if cuda else 1) if args.warmup is None else args.warmup
    args.repeats = (10 if cuda else 5) if args.repeats is None else args.repeats
    if args.repeats < 1 or args.warmup < 0 or args.channels < 1 or (args.threads or 1) < 1:
        parser.error("--repeats and --channels must be >= 1, --warmup >= 0, --threads >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    report = run(args)
    print_table(report["results"])
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
