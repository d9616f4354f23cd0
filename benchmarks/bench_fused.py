"""Benchmark of fused fine-tunings: K fine-tunings trained as one horizontally fused model
(``trainers.fused.run_finetunes_fused``) against the same K run one after another
(``trainers.stages.run_finetune``), K in ``--k`` (default 1 2 4), side by side in one run.

Each fine-tuning: batch ``--batch-size`` (8), Adam, regulariser none, spatial + intensity
augmentation (the fine-tuning defaults), ``--epochs`` epochs of ``--steps-per-epoch`` steps over
its own ``steps x batch`` labelled slices, seeds 0 .. K - 1; no validation or test volumes (the
split holds only the training volumes), so the figures are training alone. U-Net
``ModelConfig(base_channels=--base-channels, depth=--depth)`` (instance norm).

Fused arms: one per ``--passes`` entry (``trainers.fused.FUSED_PASSES``: "vmap", one vmapped
pass of grouped convolutions; "loop", one ``functional_call`` per member with one backward and
one Adam step; "auto", vmap on CUDA and loop on CPU).

Figure: steady-state training slices per second, from the per-epoch reports (``seconds`` of
each epoch, the first ``--warmup-epochs`` left out): separate = all K runs' slices / their
summed epoch seconds; fused = all members' slices / the fused epochs' seconds. ``speedup`` =
fused / separate at that K (per fused arm); ``vs_one`` = fused at K / separate at K = 1 (the throughput of K
fused fine-tunings against one alone: the goal on one GPU is >= 3 at K = 4 with batch 8).
Rounds alternate which arm goes first; figures are medians over ``--rounds``. The load average
is recorded before and after: other processes share the CPU.

Data: ``--data`` a Task04_Hippocampus folder (``prepare_slices`` at 64 x 64 as
``search_spaces/paper_hippocampus_cpu.yaml``, cache in ``--cache``), else synthetic random
slices of ``--image-size`` with three classes.

    python benchmarks/bench_fused.py --device cpu --out results/benchmarks/cpu-2core/bench_fused.json

stdout: one JSON object (machine, load, settings, results); stderr: progress and a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainers.config import DataConfig, FinetuneConfig, ModelConfig  # noqa: E402
from trainers.data import SliceData, Split, prepare_slices  # noqa: E402
from trainers.fused import FUSED_PASSES, run_finetunes_fused  # noqa: E402
from trainers.loop import StageContext  # noqa: E402
from trainers.stages import run_finetune  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_eval import uptime  # noqa: E402

DATA = {"kind": "msd", "image_size": 64, "axis": -1, "flip_axes": (0,)}


def synthetic_data(num_slices: int, image_size: int, seed: int = 0) -> SliceData:
    """Random images in [0, 1) and random labels of 3 classes, 20 slices per volume."""
    rng = np.random.default_rng(seed)
    volumes = -(-num_slices // 20)
    volume = np.repeat(np.arange(volumes, dtype=np.int32), 20)[:num_slices]
    return SliceData(
        images=rng.random((num_slices, image_size, image_size), dtype=np.float32),
        labels=rng.integers(0, 3, (num_slices, image_size, image_size), dtype=np.uint8),
        volume=volume,
        position=(np.arange(num_slices) % 20 / 20).astype(np.float32),
        cases=tuple(f"synthetic_{v:03d}" for v in range(volumes)),
        num_classes=3,
        fingerprint="bench-fused-synthetic",
    )


def real_data(root: str, cache: str, num_slices: int) -> SliceData:
    """The first ``num_slices`` Hippocampus slices (whole volumes' worth, ids unchanged)."""
    data = prepare_slices(DataConfig(root=root, **DATA), cache)
    index = np.arange(min(num_slices, data.images.shape[0]))
    return SliceData(
        images=np.ascontiguousarray(data.images[index]),
        labels=np.ascontiguousarray(data.labels[index]),
        volume=np.ascontiguousarray(data.volume[index]),
        position=np.ascontiguousarray(data.position[index]),
        cases=data.cases,
        num_classes=data.num_classes,
        fingerprint=f"{data.fingerprint}-first{len(index)}",
    )


def contexts(data: SliceData, k: int, device: str, log: list[list[dict]]) -> list[StageContext]:
    volumes = tuple(int(v) for v in np.unique(data.volume))
    split = Split(0, train=volumes, val=(), test=())
    out = []
    for seed in range(k):
        records: list[dict] = []
        log.append(records)
        out.append(
            StageContext(
                data=data,
                split=split,
                labelled=volumes,
                seed=seed,
                device=torch.device(device),
                report=lambda m, c, r=records: r.append(dict(m)),
                checkpoint_every=10**6,
            )
        )
    return out


def measure(arm: str, k: int, data: SliceData, args: argparse.Namespace) -> dict[str, Any]:
    cfg = FinetuneConfig(epochs=args.epochs, batch_size=args.batch_size, lr=1e-3)
    model = ModelConfig(base_channels=args.base_channels, depth=args.depth)
    log: list[list[dict]] = []
    ctxs = contexts(data, k, args.device, log)
    started = time.perf_counter()
    if arm.startswith("fused") and k > 1:
        run_finetunes_fused(cfg, model, ctxs, arm.split("-", 1)[1])
        steady = [r for r in log[0] if r["epoch"] > args.warmup_epochs]
        seconds = sum(r["seconds"] for r in steady)
        slices = sum(
            r["slices_per_s"] * r["seconds"]
            for records in log
            for r in records
            if r["epoch"] > args.warmup_epochs
        )
    else:  # separate (K = 1 fused is one run alone: the same)
        for ctx in ctxs:
            run_finetune(cfg, model, ctx)
        steady = [r for records in log for r in records if r["epoch"] > args.warmup_epochs]
        seconds = sum(r["seconds"] for r in steady)
        slices = sum(r["slices_per_s"] * r["seconds"] for r in steady)
    return {
        "slices_per_s": slices / seconds,
        "steady_seconds": seconds,
        "wall_s": time.perf_counter() - started,
        "final_loss": [records[-1]["loss"] for records in log],
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    num_slices = args.steps_per_epoch * args.batch_size
    if args.data:
        data = real_data(args.data, args.cache, num_slices)
    else:
        data = synthetic_data(num_slices, args.image_size)
    load_before = uptime()
    print(f"  {load_before}", file=sys.stderr, flush=True)
    rounds: dict[str, list[dict[str, Any]]] = {}
    fused_arms = [f"fused-{p}" for p in args.passes]
    for r in range(args.rounds):
        for k in args.k:
            arms = ["separate", *fused_arms] if k > 1 else ["separate"]
            if r % 2:
                arms.reverse()
            for arm in arms:
                result = measure(arm, k, data, args)
                rounds.setdefault(f"{arm} K={k}", []).append(result)
                print(
                    f"  round {r} {arm:8s} K={k}: {result['slices_per_s']:8.1f} slices/s",
                    file=sys.stderr,
                    flush=True,
                )
    load_after = uptime()
    one = (  # separate K = 1: the reference of vs_one (None when --k leaves it out)
        statistics.median(x["slices_per_s"] for x in rounds["separate K=1"])
        if "separate K=1" in rounds
        else None
    )
    results = []
    for k in args.k:
        row: dict[str, Any] = {"k": k}
        for arm in ["separate", *fused_arms] if k > 1 else ["separate"]:
            runs = rounds[f"{arm} K={k}"]
            row[arm] = {
                "slices_per_s_median": statistics.median(x["slices_per_s"] for x in runs),
                "slices_per_s_rounds": [x["slices_per_s"] for x in runs],
                "wall_s_rounds": [x["wall_s"] for x in runs],
            }
        if k > 1:
            for arm in fused_arms:
                fused = row[arm]["slices_per_s_median"]
                row[arm]["speedup"] = fused / row["separate"]["slices_per_s_median"]
                row[arm]["vs_one"] = fused / one if one is not None else None
        results.append(row)
    return {
        "benchmark": "bench_fused",
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
        },
        "load": {"before": load_before, "after": load_after},
        "settings": {
            key: (str(value) if isinstance(value, Path) else value)
            for key, value in vars(args).items()
            if key != "out"
        },
        "data": "hippocampus" if args.data else "synthetic",
        "results": results,
    }


def print_table(report: dict[str, Any]) -> None:
    print(f"{'K':>3} {'arm':>12} {'slices/s':>10} {'speedup':>8} {'vs one':>7}", file=sys.stderr)
    for row in report["results"]:
        for arm, figures in row.items():
            if arm == "k":
                continue
            line = f"{row['k']:>3} {arm:>12} {figures['slices_per_s_median']:10.1f}"
            if "speedup" in figures:
                line += f" {figures['speedup']:8.2f}"
                if figures["vs_one"] is not None:
                    line += f" {figures['vs_one']:7.2f}"
            print(line, file=sys.stderr)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--data", help="Task04_Hippocampus folder (default: synthetic slices)")
    parser.add_argument(
        "--cache", default=os.path.join(tempfile.gettempdir(), "semicon-bench-cache")
    )
    parser.add_argument("--k", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument(
        "--passes",
        nargs="+",
        default=["auto"],
        choices=FUSED_PASSES,
        help="fused arms, one per pass (trainers.fused.FUSED_PASSES; auto: vmap on CUDA, loop on CPU)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps-per-epoch", type=int, default=10)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--out", type=Path, help="also write the JSON object here")
    args = parser.parse_args(argv)
    if args.epochs <= args.warmup_epochs:
        parser.error("--epochs must exceed --warmup-epochs")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = run(args)
    print_table(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
