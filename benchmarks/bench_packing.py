"""Benchmark: 1 finetune trial on the whole device vs 4 trials packed onto it (fractional resources).

Both arms run through ``orchestrator.execute.run_sweep`` on a local Ray (one Tune trial per
node, each driving a one-worker ``TorchTrainer``); the finetune nodes differ only in their seed
(same data, size and work):

- ``1 trial``: one node with the whole device: on GPU ``gpus_per_worker: 1``; on CPU
  ``cpus_per_worker`` = every CPU (the worker's torch uses that many threads);
- ``4 packed``: four nodes at once, each with a quarter of the device: on GPU
  ``gpus_per_worker: 0.25`` (four processes share the GPU; nothing isolates their memory or
  compute, the fraction is only Ray's bookkeeping); on CPU ``cpus_per_worker`` = CPUs / 4 (0.5
  on 2 cores). A fractional CPU is likewise only a scheduling token: Ray pins nothing, the four
  processes time-share the cores, and Ray sets each worker's ``OMP_NUM_THREADS`` to
  max(1, floor(CPUs)) = 1 thread.

Figures (steady state: the first epoch of each node excluded):

- ``aggregate epoch slices/s``: sum over the arm's nodes of training slices per epoch / median
  wall interval between the node's epoch records (the 1-trial arm: its one node);
- ``aggregate compute slices/s``: the same with the stage's own training seconds;
- ``wall s``: the arm's ``run_sweep`` call; for a grid of 4 the comparison is 4 x the 1-trial
  wall (run one after the other) vs the packed wall;
- ``overlap``: the share of the packed nodes' steady epochs that ended while all four nodes were
  training (near 1: the sum above is a true concurrent throughput).

    python benchmarks/bench_packing.py --quick          # CPU smoke run
    python benchmarks/bench_packing.py --device cuda --data /path/to/Task04_Hippocampus

stdout: one JSON object; stderr: progress and a short table. Set ``--train-poll-s`` (Ray Train's
``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, default 2 s) below the epoch time when epochs are short.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
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
    steady_state,
    write_spec,
)

from orchestrator.execute import run_sweep  # noqa: E402
from orchestrator.plan import build_plan  # noqa: E402
from orchestrator.store import StageStore  # noqa: E402

PACKED = 4


def overlap(store: StageStore, keys: list[str]) -> float:
    """Share of the nodes' steady epoch records written while every node was training."""
    records = {key: sorted(store.read_epochs(key), key=lambda r: r["epoch"]) for key in keys}
    start = max(r[0]["time"] for r in records.values())  # every node has finished epoch 1
    end = min(r[-1]["time"] for r in records.values())  # no node has finished
    steady = [rec for r in records.values() for rec in r[1:]]
    return sum(start <= rec["time"] <= end for rec in steady) / len(steady)


def run_arm(folder: Path, name: str, size: dict[str, Any], seeds: list[int], resources: dict[str, Any]) -> dict[str, Any]:
    """One sweep of finetune nodes (one per seed); aggregate figures over its nodes."""
    spec = write_spec(folder, name, size, method="random", label_fraction=1.0, seed=seeds, resources=resources)
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    prepare(plan, store)
    started = time.time()
    outcome = run_sweep(plan, store, progress=lambda line: log(f"    {line}"))
    wall = time.time() - started
    if outcome.failed:
        raise RuntimeError(f"{name}: failed nodes {outcome.failed}")
    keys = list(plan.nodes)
    nodes = {key: steady_state(store.read_epochs(key)) for key in keys}
    return {
        "nodes": len(keys),
        "wall_s": wall,
        "aggregate_epoch_slices_per_s": sum(n["epoch_slices_per_s"] for n in nodes.values()),
        "aggregate_compute_slices_per_s": sum(n["compute_slices_per_s"] for n in nodes.values()),
        "per_node_epoch_slices_per_s": statistics.median(n["epoch_slices_per_s"] for n in nodes.values()),
        "overlap": overlap(store, keys) if len(keys) > 1 else 1.0,
        "torch_threads": statistics.median(n["torch_threads"] for n in nodes.values()),
        "per_node": nodes,
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = sizes(args.quick, args.data)
    cpus = os.cpu_count() or 1
    gpu = args.device == "cuda"
    if gpu:
        whole = {"cpus_per_worker": max(1, cpus // PACKED), "gpus_per_worker": 1}
        quarter = {"cpus_per_worker": max(1, cpus // PACKED), "gpus_per_worker": 1 / PACKED}
    else:
        whole = {"cpus_per_worker": cpus, "gpus_per_worker": 0}
        quarter = {"cpus_per_worker": cpus / PACKED, "gpus_per_worker": 0}
    common = {"workers_per_trial": 1, "checkpoint_every": args.checkpoint_every, "max_failures": 0}
    if args.train_poll_s is not None:
        os.environ[POLL_ENV] = str(args.train_poll_s)
    ray_init_s = start_ray(cpus, 1 if gpu else 0)
    arms: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-packing-") as tmp:
        log("arm: 1 trial, whole device")
        arms["1 trial"] = run_arm(Path(tmp), "single", size, [0], {**common, **whole})
        log(f"arm: {PACKED} trials, 1/{PACKED} device each")
        arms[f"{PACKED} packed"] = run_arm(
            Path(tmp), "packed", size, list(range(PACKED)), {**common, **quarter, "max_concurrent_trials": PACKED}
        )
    single, packed = arms["1 trial"], arms[f"{PACKED} packed"]
    return {
        "benchmark": "packing",
        "machine": machine_info(args.device),
        "settings": {"size": size, "whole_device": whole, "packed_share": quarter, "ray_init_s": ray_init_s,
                     "train_poll_s": args.train_poll_s, "quick": args.quick},
        "arms": arms,
        "packed_vs_single": {
            "aggregate_epoch_speedup": packed["aggregate_epoch_slices_per_s"] / single["aggregate_epoch_slices_per_s"],
            "aggregate_compute_speedup": packed["aggregate_compute_slices_per_s"] / single["aggregate_compute_slices_per_s"],
            "grid_of_4_wall_s": {"one_after_another_est": PACKED * single["wall_s"], "packed": packed["wall_s"]},
        },
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__.splitlines()[0], "CPU smoke size (see bench_ray_stage.SIZES)")
    parser.add_argument("--train-poll-s", type=float, help="RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (Ray's default: 2)")
    return finish_args(parser, argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    rows = [{"arm": arm, **{k: v for k, v in figures.items() if k != "per_node"}} for arm, figures in result["arms"].items()]
    print_table(rows, [("arm", "arm", ""), ("nodes", "nodes", ".0f"),
                       ("aggregate_epoch_slices_per_s", "agg epoch sl/s", ".0f"),
                       ("aggregate_compute_slices_per_s", "agg compute sl/s", ".0f"),
                       ("per_node_epoch_slices_per_s", "node epoch sl/s", ".0f"),
                       ("overlap", "overlap", ".2f"), ("wall_s", "wall s", ".1f"), ("torch_threads", "threads", ".0f")])
    emit(result, args.out)


if __name__ == "__main__":
    main()
