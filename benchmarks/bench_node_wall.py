"""Benchmark: a reproduction node's wall time on real data, before and after issue 11's work.

The same real-data sweep (Task04_Hippocampus, ``search_spaces/paper_hippocampus_cpu.yaml``'s
protocol: 1,200 fine-tuning steps at batch 8, validation every 150 steps, a base-8 U-Net, one
CPU per worker, two workers at a time on 2 cores) runs twice, one arm after the other in this
benchmark process, each through ``python -m orchestrator launch`` in a subprocess:

- ``before``: the project as it was at ``--before`` (default 512e958, the commit before the
  work on per-node costs began), extracted with ``git archive`` into a temporary folder and put
  first on ``PYTHONPATH``; one Tune trial and one Train run per node;
- ``after``: this checkout, with ``resources.nodes_per_run`` = ``--nodes-per-run`` (bundles of
  sibling nodes in one Train run) and the streamed evaluation.

The subset is one split's fine-tuning nodes that need no pretraining parent (methods ``random``
and ``mixup`` x label fractions 5, 10, 20 %, split 0: six nodes that are ready at once), so the
two arms run the same nodes with the same seeds and must print the same Dice.

Per node, from what each arm's store records: ``wall_s`` (the worker's wall for the node, as
``metrics.json`` records it: data, model, training, validation, final evaluation, reports),
``train_s`` (sum of the epochs' training seconds) and ``wall_s - train_s``. Per sweep: the
launch's process wall (Ray start and stop, tables included) and ``slot_s_per_node`` =
concurrency x process wall / nodes, the slot-seconds a node costs the sweep; ``overhead_s_per_node``
= ``slot_s_per_node`` - mean ``train_s``. Load averages are recorded before and after each arm
(a shared machine inflates both arms; the figures are only comparable at similar loads).

    python benchmarks/bench_node_wall.py --out results/benchmarks/cpu-2core/bench_node_wall.json

stdout: one JSON object; stderr: progress and a short table. About 15-25 min on 2 cores.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

ROOT = Path(__file__).resolve().parents[1]
SPEC = ROOT / "search_spaces" / "paper_hippocampus_cpu.yaml"


def log(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def subset_spec(data_root: Path, resources: dict[str, Any]) -> dict[str, Any]:
    """The reproduction's protocol restricted to six parent-less fine-tuning nodes of split 0,
    with ``resources`` added to the spec's own."""
    raw = yaml.safe_load(SPEC.read_text())
    raw["name"] = "node-wall"
    raw["dataset"]["root"] = str(data_root)
    raw["method"] = ["random", "mixup"]
    raw["split_index"] = [0]
    raw["resources"].update(resources)
    return raw


def extract_revision(revision: str, folder: Path) -> Path:
    """The tracked files of ``revision`` in ``folder`` (``git archive``: no worktree left)."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", "--format=tar", revision],
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder


def run_arm(name: str, tree: Path, spec: dict[str, Any], work: Path) -> dict[str, Any]:
    """Launch ``spec`` with the code of ``tree``; the arm's figures from its store."""
    storage = work / f"{name}-storage"
    spec_path = work / f"{name}.yaml"
    spec_path.write_text(yaml.safe_dump({**spec, "storage": str(storage)}, sort_keys=False))
    env = {
        **os.environ,
        "PYTHONPATH": str(tree),
        "RAY_USAGE_STATS_ENABLED": "0",
        "SEMICON_SWEEP_PLAIN": "1",
    }
    which = subprocess.run(
        [sys.executable, "-c", "import orchestrator; print(orchestrator.__file__)"],
        cwd=tree,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    if not which.startswith(str(tree)):
        raise RuntimeError(f"{name}: orchestrator imported from {which}, not {tree}")
    load_before = os.getloadavg()
    log(f"== {name}: {tree} (load {load_before[0]:.1f})")
    started = time.perf_counter()
    with open(work / f"{name}.log", "w") as stderr:
        proc = subprocess.run(
            [sys.executable, "-m", "orchestrator", "launch", str(spec_path), "--plain"],
            cwd=tree,
            env=env,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    wall = time.perf_counter() - started
    load_after = os.getloadavg()
    if proc.returncode != 0:
        raise RuntimeError(f"{name}: launch exited {proc.returncode}; see {work / name}.log")
    nodes = []
    for folder in sorted((storage / "stages").iterdir()):
        metrics = json.loads((folder / "metrics.json").read_text())
        epochs = [json.loads(line) for line in (folder / "epochs.jsonl").read_text().splitlines()]
        train_s = sum(e["seconds"] for e in epochs)
        eval_s = sum(e.get("eval_seconds", 0.0) for e in epochs)
        nodes.append(
            {
                "node": folder.name,
                "wall_s": metrics["wall_s"],
                "train_s": train_s,
                "epoch_eval_s": eval_s if any("eval_seconds" in e for e in epochs) else None,
                "not_training_s": metrics["wall_s"] - train_s,
            }
        )
    trials = pd.read_parquet(storage / "tables" / "trials.parquet")
    resources = spec["resources"]
    per_trial = int(resources.get("cpus_per_worker", 1)) * int(
        resources.get("workers_per_trial", 1)
    )
    concurrency = max(1, (os.cpu_count() or 1) // per_trial)
    slot = concurrency * wall / len(nodes)
    mean_train = statistics.fmean(n["train_s"] for n in nodes)
    return {
        "tree": str(tree),
        "launch_wall_s": wall,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "nodes": nodes,
        "mean_wall_s": statistics.fmean(n["wall_s"] for n in nodes),
        "mean_train_s": mean_train,
        "mean_not_training_s": statistics.fmean(n["not_training_s"] for n in nodes),
        "concurrency": concurrency,
        "slot_s_per_node": slot,
        "overhead_s_per_node": slot - mean_train,
        "test_dice": trials.sort_values("trial_id")[
            ["trial_id", "test_dice_volume_mean", "test_dice_pooled_mean"]
        ].to_dict("list"),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", default="512e958", help="git revision of the 'before' arm")
    parser.add_argument(
        "--data",
        type=Path,
        default=Path(os.environ.get("SEMICON_DATA", ROOT.parent / "shared" / "data"))
        / "Task04_Hippocampus",
    )
    parser.add_argument("--nodes-per-run", type=int, default=3)
    parser.add_argument(
        "--after-resource",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="another resources.NAME for the after arm (YAML value), e.g. fuse_finetunes=true",
    )
    parser.add_argument(
        "--order",
        default="before,after",
        choices=["before,after", "after,before"],
        help="which arm runs first (a shared machine's load drifts; swap to balance)",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if not (args.data / "dataset.json").is_file():
        sys.exit(f"bench_node_wall: no Task04_Hippocampus at {args.data} (--data)")
    head = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="bench-node-wall-") as tmp:
        work = Path(tmp)
        before_tree = extract_revision(args.before, work / "before-tree")
        after_resources = {"nodes_per_run": args.nodes_per_run}
        for item in args.after_resource:
            name, _, value = item.partition("=")
            after_resources[name] = yaml.safe_load(value)
        plans = {
            "before": (before_tree, subset_spec(args.data, {})),
            "after": (ROOT, subset_spec(args.data, after_resources)),
        }
        ran = {name: run_arm(name, *plans[name], work) for name in args.order.split(",")}
        arms = {name: ran[name] for name in plans}
    dice = [
        arm["test_dice"]["test_dice_volume_mean"] + arm["test_dice"]["test_dice_pooled_mean"]
        for arm in arms.values()
    ]
    result = {
        "benchmark": "bench_node_wall",
        "before": args.before,
        "after": head,
        "after_resources": after_resources,
        "order": args.order,
        "cpu_count": os.cpu_count(),
        "arms": arms,
        "test_dice_max_abs_diff": max(abs(a - b) for a, b in zip(*dice, strict=True)),
    }
    for name, arm in arms.items():
        log(
            f"{name:>6}: node wall {arm['mean_wall_s']:.1f} s (training {arm['mean_train_s']:.1f}"
            f" s, not training {arm['mean_not_training_s']:.1f} s); slot-seconds per node "
            f"{arm['slot_s_per_node']:.1f}, overhead {arm['overhead_s_per_node']:.1f} s; launch "
            f"{arm['launch_wall_s']:.0f} s; load {arm['load_average_before'][0]:.1f} -> "
            f"{arm['load_average_after'][0]:.1f}"
        )
    log(f"test Dice max |before - after|: {result['test_dice_max_abs_diff']:.2e}")
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
