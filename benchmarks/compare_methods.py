"""Run several methods in-process (no Ray) under one budget on an MSD folder and compare test Dice.

Example (the issue-2 check on the real data, CPU, small width):

    python benchmarks/compare_methods.py --root ../shared/data/Task04_Hippocampus \
        --methods random global+local_block --label-fraction 0.1 --base-channels 16 \
        --global-epochs 8 --local-epochs 15 --finetune-epochs 30 --out results/x.json

Every method gets the same split, seed, model width and fine-tuning budget; pretraining stages
get the epochs given. Prints one JSON object (configuration, machine, per-method metrics and
stage wall times) and a short table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from trainers.config import (
    DataConfig,
    FinetuneConfig,
    GlobalConfig,
    LocalConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
)
from trainers.pipeline import PipelineConfig, run_pipeline


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="MSD-layout folder")
    p.add_argument("--methods", nargs="+", default=["random", "global+local_block"])
    p.add_argument("--label-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--split-index", type=int, default=0)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--global-epochs", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--local-epochs", type=int, default=15)
    p.add_argument("--local-batch", type=int, default=4)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--finetune-epochs", type=int, default=30)
    p.add_argument("--finetune-batch", type=int, default=8)
    p.add_argument("--finetune-lr", type=float, default=5e-4)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "semicon-sweep"))
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--out", help="write the JSON here too")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    stages = StageConfigs(
        global_=GlobalConfig(epochs=args.global_epochs, batch_size=args.global_batch),
        local=LocalConfig(
            epochs=args.local_epochs, batch_size=args.local_batch, block_size=args.block_size
        ),
        finetune=FinetuneConfig(
            epochs=args.finetune_epochs, batch_size=args.finetune_batch, lr=args.finetune_lr
        ),
    )
    model = ModelConfig(base_channels=args.base_channels, depth=args.depth)
    data = DataConfig(kind="msd", root=args.root, image_size=args.image_size)
    rows: list[dict[str, Any]] = []
    for method in args.methods:
        cfg = PipelineConfig(
            data=data,
            method=method,
            label_fraction=args.label_fraction,
            model=model,
            stages=stages,
            split=SplitConfig(),
            seed=args.seed,
            split_index=args.split_index,
            cache_dir=args.cache_dir,
        )
        started = time.perf_counter()

        def progress(stage: str, metrics: dict[str, float], method: str = method) -> None:
            shown = {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)}
            print(f"[{method}] {stage} {shown}", file=sys.stderr, flush=True)

        out = run_pipeline(cfg, report=progress)
        wall = time.perf_counter() - started
        final = out["metrics"]
        rows.append(
            {
                "method": method,
                "wall_s": round(wall, 1),
                "labelled_volumes": len(out["labelled"]),
                **{k: v for k, v in final.items() if k.startswith(("test_", "val_"))},
                "stage_seconds": {
                    s: round(m.get("train_seconds", float("nan")), 1)
                    for s, m in out["stages"].items()
                },
            }
        )
    result = {
        "args": vars(args),
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "results": rows,
    }
    print(json.dumps(result, indent=1))
    print(f"\n{'method':<22} {'pooled Dice':>11} {'per-volume Dice':>15} {'wall s':>8}")
    for row in rows:
        print(
            f"{row['method']:<22} {row.get('test_dice_pooled_mean', float('nan')):>11.4f} "
            f"{row.get('test_dice_volume_mean', float('nan')):>15.4f} {row['wall_s']:>8.1f}"
        )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
