"""Benchmark: the same small grid with stage reuse vs without (``--no-reuse``).

With reuse (``build_plan(spec)``), trials whose stages compute the same thing share one stage
node: the global pretraining depends on neither the label fraction nor the method's later
stages, so one global node serves every trial of a (seed, split). Without reuse
(``build_plan(spec, reuse=False)``, the CLI's ``launch --no-reuse``) every trial runs its own
copy of every stage. Both arms run the same grid through ``run_sweep`` on a local Ray, each into
a fresh storage folder, with the same resources.

Grid: ``--quick``: method ``global`` x label fractions {0.25, 0.5, 1.0} (3 trials; reuse runs
1 global + 3 finetune nodes, no reuse 3 + 3); default: methods {global, global+local_block} x
label fractions {0.05, 0.1, 0.2} (6 trials; reuse 1 global + 3 local + 6 finetune, no reuse
6 + 3 + 6).

Figures: ``wall s`` of each ``run_sweep`` call; ``stage executions`` (nodes run, by stage) and
``epochs run`` (epoch records written); and, as a check that sharing changes no result, the
largest difference between the two arms' per-trial test Dice (``test_dice_volume_mean``):
shared nodes are seeded the same way, so it is 0 up to run-to-run floating-point
non-determinism.

    python benchmarks/bench_reuse.py --quick
    python benchmarks/bench_reuse.py --quick --label-fractions 0.2 0.35 0.5 0.65 0.8 1.0 --global-epochs 60
    python benchmarks/bench_reuse.py --device cuda

stdout: one JSON object; stderr: progress and a short table.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ray_stage import (  # noqa: E402
    POLL_ENV,
    bench_parser,
    emit,
    finish_args,
    log,
    machine_info,
    prepare,
    print_table,
    sizes,
    start_ray,
    write_spec,
)

from orchestrator.execute import run_sweep  # noqa: E402
from orchestrator.plan import build_plan  # noqa: E402
from orchestrator.store import StageStore  # noqa: E402

GRIDS = {
    "quick": {"method": "global", "label_fraction": [0.25, 0.5, 1.0]},
    "full": {"method": ["global", "global+local_block"], "label_fraction": [0.05, 0.1, 0.2]},
}


def run_arm(folder: Path, name: str, size: dict[str, Any], grid: dict[str, Any], resources: dict[str, Any],
            reuse: bool) -> dict[str, Any]:
    """One sweep of the grid; node counts, wall time and per-trial test Dice."""
    stages = {"local": {"epochs": size["finetune"]["epochs"], "batch_size": 4, "block_size": 8}}
    spec = write_spec(folder, name, size, seed=0, resources=resources, stages=stages, **grid)
    plan = build_plan(spec, reuse=reuse)
    store = StageStore(spec.storage)
    prepare(plan, store)
    started = time.time()
    outcome = run_sweep(plan, store, progress=lambda line: log(f"    {line}"), reuse=reuse)
    wall = time.time() - started
    if outcome.failed:
        raise RuntimeError(f"{name}: failed nodes {outcome.failed}")
    executions = Counter(plan.nodes[key].stage for key in outcome.completed)
    dice = {}
    for trial in plan.trials:
        metrics = store.read_metrics(trial.nodes["finetune"]) or {}
        dice[f"{trial.method}@{trial.label_fraction:g}"] = metrics.get("test_dice_volume_mean", math.nan)
    return {
        "trials": len(plan.trials),
        "wall_s": wall,
        "stage_executions": sum(executions.values()),
        "by_stage": dict(executions),
        "epochs_run": sum(len(store.read_epochs(key)) for key in outcome.completed),
        "test_dice_volume_mean": dice,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = sizes(args.quick, args.data)
    grid = dict(GRIDS["quick" if args.quick else "full"])
    if args.label_fractions:
        grid["label_fraction"] = args.label_fractions
    if args.global_epochs:
        size["global"] = {**size["global"], "epochs": args.global_epochs}
    cpus = os.cpu_count() or 1
    gpu = args.device == "cuda"
    per_worker = {"cpus_per_worker": 1, "gpus_per_worker": 0.25 if gpu else 0}
    resources = {"workers_per_trial": 1, "checkpoint_every": args.checkpoint_every, "max_failures": 0, **per_worker}
    if args.train_poll_s is not None:
        os.environ[POLL_ENV] = str(args.train_poll_s)
    ray_init_s = start_ray(cpus, 1 if gpu else 0)
    with tempfile.TemporaryDirectory(prefix="bench-reuse-") as tmp:
        log("arm: reuse")
        reuse = run_arm(Path(tmp), "reuse", size, grid, resources, reuse=True)
        log("arm: no reuse")
        fresh = run_arm(Path(tmp), "noreuse", size, grid, resources, reuse=False)
    diffs = [abs(reuse["test_dice_volume_mean"][k] - fresh["test_dice_volume_mean"][k]) for k in reuse["test_dice_volume_mean"]]
    return {
        "benchmark": "reuse",
        "machine": machine_info(args.device),
        "settings": {"size": size, "grid": grid, "resources": resources, "ray_init_s": ray_init_s,
                     "train_poll_s": args.train_poll_s, "quick": args.quick},
        "arms": {"reuse": reuse, "no reuse": fresh},
        "reuse_vs_no_reuse": {
            "wall_ratio": reuse["wall_s"] / fresh["wall_s"],
            "executions_saved": fresh["stage_executions"] - reuse["stage_executions"],
            "max_test_dice_difference": max(diffs),
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__.splitlines()[0], "CPU smoke size and a 3-trial grid")
    parser.add_argument("--train-poll-s", type=float, help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2)")
    parser.add_argument("--label-fractions", type=float, nargs="+",
                        help="the grid's label fractions (how many trials share the global stage)")
    parser.add_argument("--global-epochs", type=int, help="epochs of the shared global stage")
    return finish_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    rows = [{"arm": arm, **{k: v for k, v in figures.items() if not isinstance(v, dict)},
             "stages": " ".join(f"{s}:{n}" for s, n in sorted(figures["by_stage"].items()))}
            for arm, figures in result["arms"].items()]
    print_table(rows, [("arm", "arm", ""), ("trials", "trials", ".0f"), ("stage_executions", "executions", ".0f"),
                       ("stages", "by stage", ""), ("epochs_run", "epochs run", ".0f"), ("wall_s", "wall s", ".1f")])
    log(f"max |test Dice difference| between arms: {result['reuse_vs_no_reuse']['max_test_dice_difference']:.2e}")
    emit(result, args.out)


if __name__ == "__main__":
    main()
