"""Benchmark: what a stage node costs beyond its training steps, through the real launch path.

A sweep of many tiny fine-tuning nodes (method ``random``: no parent, so every node is ready
at once) runs twice, side by side in one benchmark process:

- ``launch``: ``semicon-sweep launch SPEC`` run in this process (the CLI's own command: its
  checks, claim and lock, its own local Ray, one Tune trial per node driving a one-worker
  ``TorchTrainer``, tables); a Tune callback wrapped around the launch's progress callback
  stamps each trial's start and end (progress lines on stderr can be cut by Ray's output);
- ``bare``: the same nodes (same spec, another storage folder) one after another in this
  process through ``orchestrator.worker.run_stage`` (no Ray), with as many torch threads as a
  Ray worker gets (1), writing the same epoch records and results to a ``StageStore``.

Per node, from what the store records (``epochs.jsonl``: each epoch's training ``seconds``,
``eval_seconds``, ``time``; ``metrics.json``'s ``timing``: ``driver_started_at``,
``worker_started_at``, ``report_s``, ``last_report_at``, ``stage_ended_at``; ``COMPLETE``'s
``completed_at``) and the launch's progress lines (the Tune trial's start and end):

- ``wall_s``: the node's slot time: Tune trial start -> trial end (bare: the call to
  ``run_stage`` -> result written);
- ``train_s``: sum of the epochs' training seconds (forward, backward, optimiser steps);
- ``eval_s``: validation inside the epochs plus the final evaluation (last report -> stage end);
- ``report_s``: per-epoch reports (epoch record, checkpoint save, ``ray.train.report``);
- ``startup_s``: trial start -> the first epoch's training start (launch; split into
  ``to_driver_s`` trial start -> driver entered, ``to_worker_s`` driver -> Train worker entered,
  ``to_first_epoch_s`` worker -> first epoch's training start: checkpoint, data map, model);
- ``write_s``: stage end -> ``COMPLETE`` (model, metrics, marker);
- ``teardown_s``: ``COMPLETE`` -> trial end (Train shutdown, checkpoint folder removed, Tune);
- ``other_s``: the rest of the wall (between epochs: batch orders, bookkeeping);
- ``overhead_s`` = ``wall_s - train_s``: the slot-seconds the node spent outside training steps.

Sweep-level: ``slot_s`` = concurrency x (first trial start -> last trial end), ``gap_s`` =
``slot_s`` - sum of node walls (slot-seconds with no node running: scheduling gaps); the
launch's process wall (Python + Ray start and stop, tables) is reported beside it.

With ``--nodes-per-run 1 8`` the launch runs once per value (``resources.nodes_per_run``):
bundled nodes share one Train run, and each is timed from its predecessor's ``COMPLETE`` (the
first from the trial's start) to its own (the last to the trial's end), so a bundle's
start-up is charged to its first node and the node walls still add up to the trial's.

    python benchmarks/bench_overhead.py                 # 8 nodes, a few minutes on 2 cores
    python benchmarks/bench_overhead.py --nodes 16 --nodes-per-run 1 8
    python benchmarks/bench_overhead.py --nodes 12 --epochs 2 --out results/.../bench_overhead.json

stdout: one JSON object; stderr: progress and a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
import yaml  # noqa: E402
from bench_ray_stage import emit, log, machine_info, prepare, print_table  # noqa: E402

from orchestrator.plan import build_plan  # noqa: E402
from orchestrator.progress import trial_nodes  # noqa: E402
from orchestrator.spec import Spec, load_spec  # noqa: E402
from orchestrator.store import StageStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("startup_s", "train_s", "eval_s", "report_s", "write_s", "teardown_s", "other_s")


def write_spec(
    folder: Path, name: str, nodes: int, epochs: int, resources: Mapping[str, Any]
) -> Path:
    """A sweep of ``nodes`` tiny independent fine-tuning nodes (method random x label fraction
    x seed); returns the spec's path."""
    seeds = max(1, (nodes + 3) // 4)
    fractions = [round(0.25 * (i + 1), 2) for i in range(min(4, nodes))]
    if len(fractions) * seeds != nodes:
        raise ValueError(f"--nodes must be 1-4 or a multiple of 4, got {nodes}")
    raw = {
        "name": name,
        "dataset": {"kind": "synthetic", "image_size": 32, "synthetic_cases": 8},
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "repeats": 1},
        "model": {
            "base_channels": 4,
            "depth": 2,
            "embed_dim": 8,
            "global_hidden": 16,
            "local_hidden": 8,
        },
        "stages": {"finetune": {"epochs": epochs, "batch_size": 8}},
        "method": "random",
        "label_fraction": fractions,
        "seed": list(range(seeds)),
        "resources": dict(resources),
        "storage": str(folder / name),
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------------------------
# the launch arm


TRIAL_EVENTS: list[tuple[float, tuple[str, ...], str]] = []  # (time, node keys, "start" | "end")


def recording(inner: Any) -> Any:
    """A Tune callback that stamps each trial's start and end, then calls ``inner`` (the
    launch's own progress callback)."""
    from ray.tune import Callback

    class Recorder(Callback):
        def __init__(self, inner: Any) -> None:
            self.inner = inner

        def __getstate__(self) -> dict[str, Any]:
            return {}  # Tune pickles its callbacks; nothing here needs restoring

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            TRIAL_EVENTS.append((time.time(), tuple(trial_nodes(trial.config)), "start"))
            self.inner.on_trial_start(iteration, trials, trial, **info)

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            self.inner.on_trial_result(iteration, trials, trial, result, **info)

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            TRIAL_EVENTS.append((time.time(), tuple(trial_nodes(trial.config)), "end"))
            self.inner.on_trial_complete(iteration, trials, trial, **info)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            TRIAL_EVENTS.append((time.time(), tuple(trial_nodes(trial.config)), "end"))
            self.inner.on_trial_error(iteration, trials, trial, **info)

    return Recorder(inner)


def run_launch(spec_path: Path) -> dict[str, Any]:
    """``semicon-sweep launch SPEC`` in this process (the CLI's own command, its own local Ray);
    each Tune trial's start and end stamped by a callback wrapped around the launch's progress
    callback; the table the CLI prints goes to stderr."""
    import contextlib

    from typer.main import get_command

    import orchestrator.execute as execute
    from orchestrator.cli import app

    original = execute.progress_callback
    execute.progress_callback = lambda *args: recording(original(*args))
    TRIAL_EVENTS.clear()
    started = time.time()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            code = get_command(app).main(["launch", str(spec_path)], standalone_mode=False)
    finally:
        execute.progress_callback = original
    ended = time.time()
    if code not in (None, 0):
        raise RuntimeError(f"launch exited {code}")
    return {"started": started, "ended": ended, "events": list(TRIAL_EVENTS)}


def launch_nodes(spec: Spec, launch: Mapping[str, Any]) -> tuple[dict[str, dict[str, float]], int]:
    """Per node figures of the launch arm; and the concurrency ``node_concurrency`` gave."""
    from orchestrator.resources import node_concurrency

    plan = build_plan(spec)
    store = StageStore(spec.storage)
    start = {keys: at for at, keys, event in launch["events"] if event == "start"}
    end = {keys: at for at, keys, event in launch["events"] if event == "end"}
    cpus = float(os.cpu_count() or 1)
    concurrency = node_concurrency(spec.resources, {"CPU": cpus}, len(plan.nodes))
    nodes = {}
    for keys, began in start.items():
        # a bundle's nodes run in order: each from the previous one's COMPLETE (the first
        # from the trial's start) to its own COMPLETE (the last to the trial's end)
        for index, key in enumerate(keys):
            if not store.is_complete(key):
                raise RuntimeError(f"node {key} did not complete")
            ended = end[keys] if index == len(keys) - 1 else completed_at(store, key)
            nodes[key] = node_figures(store, key, began, ended, first_in_trial=index == 0)
            nodes[key]["bundle_size"] = float(len(keys))
            began = completed_at(store, key)
    if sorted(nodes) != sorted(plan.nodes):
        raise RuntimeError("some nodes did not run")
    return nodes, concurrency


def completed_at(store: StageStore, key: str) -> float:
    return float(json.loads((store.node_dir(key) / "COMPLETE").read_text())["completed_at"])


def node_figures(
    store: StageStore, key: str, began: float, ended: float, first_in_trial: bool = True
) -> dict[str, float]:
    """One node's phases (module docstring) from its store records, ``began`` and ``ended``."""
    records = sorted(store.read_epochs(key), key=lambda r: r["epoch"])
    metrics = store.read_metrics(key) or {}
    timing = metrics.get("timing", {})
    complete = json.loads((store.node_dir(key) / "COMPLETE").read_text())
    first = records[0]
    first_train_start = first["time"] - first["seconds"] - first.get("eval_seconds", 0.0)
    train_s = sum(r["seconds"] for r in records)
    final_eval = timing["stage_ended_at"] - timing["last_report_at"]
    figures = {
        "began": began,
        "ended": ended,
        "wall_s": ended - began,
        "train_s": train_s,
        "eval_s": sum(r.get("eval_seconds", 0.0) for r in records) + final_eval,
        "report_s": timing["report_s"],
        "startup_s": first_train_start - began,
        "write_s": complete["completed_at"] - timing["stage_ended_at"],
        "teardown_s": ended - complete["completed_at"],
        "epochs": len(records),
        "steps": records[-1].get("steps", 0),
    }
    if "driver_started_at" in timing and first_in_trial:
        figures["to_driver_s"] = timing["driver_started_at"] - began
        figures["to_worker_s"] = timing["worker_started_at"] - timing["driver_started_at"]
        figures["to_first_epoch_s"] = first_train_start - timing["worker_started_at"]
    figures["other_s"] = figures["wall_s"] - sum(figures[p] for p in PHASES if p != "other_s")
    figures["overhead_s"] = figures["wall_s"] - train_s
    return figures


# --------------------------------------------------------------------------------------------
# the bare arm


def run_bare(spec: Spec) -> dict[str, dict[str, float]]:
    """Each node through ``run_stage`` in this process (1 torch thread), records in a store."""
    from orchestrator.worker import run_stage

    plan = build_plan(spec)
    store = StageStore(spec.storage)
    caches = prepare(plan, store)
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    nodes = {}
    try:
        for key, node in plan.nodes.items():
            store.write_node(node)
            timing: dict[str, float] = {"report_s": 0.0}

            def report(
                metrics: dict[str, float], _state: Any, key: str = key, timing: dict = timing
            ) -> None:
                entered = time.perf_counter()
                store.append_epoch(key, {**metrics, "node": key, "time": time.time()})
                timing["report_s"] += time.perf_counter() - entered
                timing["last_report_at"] = time.time()

            began = time.time()
            result = run_stage(node, caches[key], store, torch.device("cpu"), report=report)
            timing["stage_ended_at"] = time.time()
            store.write_result(key, result.state, {**result.metrics, "timing": timing})
            nodes[key] = node_figures(store, key, began, time.time())
    finally:
        torch.set_num_threads(previous)
    return nodes


# --------------------------------------------------------------------------------------------


def summarise(
    nodes: Mapping[str, Mapping[str, float]],
    concurrency: int,
    window: tuple[float, float] | None,
    wall_s: float,
) -> dict[str, Any]:
    """Per-node medians and sums; slot-seconds and scheduling gaps over the sweep window."""
    keys = ("wall_s", "overhead_s", *PHASES, "to_driver_s", "to_worker_s", "to_first_epoch_s")
    rows = list(nodes.values())
    median = {k: statistics.median(r[k] for r in rows) for k in keys if all(k in r for r in rows)}
    total = {k: sum(r[k] for r in rows) for k in keys if all(k in r for r in rows)}
    out: dict[str, Any] = {
        "nodes": len(rows),
        "concurrency": concurrency,
        "median_per_node": median,
        "sum_over_nodes": total,
        "process_wall_s": wall_s,
    }
    if window is not None:
        slot_s = concurrency * (window[1] - window[0])
        out.update(
            sweep_window_s=window[1] - window[0],
            slot_s=slot_s,
            gap_s=slot_s - total["wall_s"],
            gap_per_node_s=(slot_s - total["wall_s"]) / len(rows),
            slot_s_per_node=slot_s / len(rows),
            overhead_per_node_s=(slot_s - total["train_s"]) / len(rows),
        )
    else:
        out.update(
            slot_s=total["wall_s"],
            gap_s=0.0,
            gap_per_node_s=0.0,
            slot_s_per_node=total["wall_s"] / len(rows),
            overhead_per_node_s=(total["wall_s"] - total["train_s"]) / len(rows),
        )
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    resources = {
        "workers_per_trial": 1,
        "cpus_per_worker": 1,
        "checkpoint_every": args.checkpoint_every,
        "max_failures": 0,
        **dict(args.resource or []),
    }
    uptime_before = os.getloadavg()
    arms: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
        folder = Path(tmp)
        for arm, extra in args.arms:
            log(f"arm: {arm} (launch)")
            name = "launch-" + arm.replace(" ", "-").replace("_", "-")
            spec_path = write_spec(folder, name, args.nodes, args.epochs, {**resources, **extra})
            spec = load_spec(spec_path)
            launch = run_launch(spec_path)
            nodes, concurrency = launch_nodes(spec, launch)
            window = (
                min(n["began"] for n in nodes.values()),
                max(n["ended"] for n in nodes.values()),
            )
            arms[f"launch {arm}"] = {
                "resources": {**resources, **extra},
                "summary": summarise(
                    nodes, concurrency, window, launch["ended"] - launch["started"]
                ),
                "per_node": nodes,
            }
        log("arm: bare (in-process, no Ray)")
        spec = load_spec(write_spec(folder, "bare", args.nodes, args.epochs, resources))
        started = time.time()
        nodes = run_bare(spec)
        arms["bare"] = {
            "summary": summarise(nodes, 1, None, time.time() - started),
            "per_node": nodes,
        }
    return {
        "benchmark": "overhead",
        "machine": {
            **machine_info("cpu"),
            "load_average_before": uptime_before,
            "load_average_after": os.getloadavg(),
        },
        "settings": {
            "nodes": args.nodes,
            "epochs": args.epochs,
            "resources": resources,
            "model": "base_channels 4, depth 2",
            "data": "synthetic 8 cases, 32 x 32",
        },
        "arms": arms,
    }


def resource_pair(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    return name, yaml.safe_load(value)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--nodes", type=int, default=8, help="fine-tuning nodes (1-4 or a multiple of 4)"
    )
    parser.add_argument("--epochs", type=int, default=3, help="epochs per node (a few steps each)")
    parser.add_argument(
        "--checkpoint-every", type=int, default=5, help="epochs between Train checkpoints"
    )
    parser.add_argument(
        "--resource",
        type=resource_pair,
        action="append",
        help="NAME=VALUE added to the spec's resources (every arm)",
    )
    parser.add_argument("--out", type=Path, help="also write the JSON object here")
    parser.add_argument(
        "--nodes-per-run",
        type=int,
        nargs="+",
        default=[1],
        help="one launch arm per value: resources.nodes_per_run (1: a Train run per node; "
        "> 1: bundles of up to that many nodes per Train run)",
    )
    args = parser.parse_args(argv)
    args.arms = [(f"nodes_per_run {n}", {"nodes_per_run": n}) for n in args.nodes_per_run]
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    rows = [
        {
            "arm": arm,
            **figures["summary"]["median_per_node"],
            "gap_per_node_s": figures["summary"]["gap_per_node_s"],
            "overhead_per_node_s": figures["summary"]["overhead_per_node_s"],
            "process_wall_s": figures["summary"]["process_wall_s"],
        }
        for arm, figures in result["arms"].items()
    ]
    log("per node (medians; gap and overhead/node from the sweep's slot-seconds):")
    print_table(
        rows,
        [
            ("arm", "arm", ""),
            ("wall_s", "wall s", ".2f"),
            ("train_s", "train s", ".2f"),
            ("startup_s", "start-up s", ".2f"),
            ("eval_s", "eval s", ".2f"),
            ("report_s", "report s", ".2f"),
            ("write_s", "write s", ".2f"),
            ("teardown_s", "teardown s", ".2f"),
            ("other_s", "other s", ".2f"),
            ("gap_per_node_s", "gap s", ".2f"),
            ("overhead_per_node_s", "overhead s", ".2f"),
            ("process_wall_s", "process s", ".1f"),
        ],
    )
    emit(result, args.out)


if __name__ == "__main__":
    main()
