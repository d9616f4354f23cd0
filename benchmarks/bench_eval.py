"""Benchmark of a fine-tuning node's final evaluation: Dice on the val and test volumes.

One run compares, side by side, the final evaluation (``evaluate_model`` on ``split.val``, then
on ``split.test``) of one U-Net on the real Hippocampus slices as a sweep node does it:

- ``old``:      the implementation before the streamed evaluation (kept here): every slice of the
                volumes copied into memory, forward passes of 256 slices, all argmax predictions
                concatenated, then ``evaluate_volumes`` over the whole set;
- ``new``:      ``trainers.stages.evaluate_model``: slices read batch by batch (32 on CPU,
                ``eval_batch_size``), each batch's predictions added to per-volume confusion
                counts at once, memory bounded by one batch;
- ``new-b256``: the same with batches of 256 (separates the batch size from the streaming).

Data: ``trainers.data.prepare_slices`` with the dataset settings of
``search_spaces/paper_hippocampus_cpu.yaml`` (64 x 64 slices along the last axis) and its split
(0.6 / 0.2 / 0.2, split ``--split-index``): 42 + 42 volumes of the 208 Hippocampus cases here.
Model: ``UNet(ModelConfig(base_channels=16, depth=4, norm="instance"))`` seeded, trained for
``--train-steps`` Adam steps on the labelled training slices first so that predictions (and so
Dice) look like a real node's (0: random init).

Every (impl, round) runs in a fresh subprocess, rounds interleaving the impls so that a change
in machine load hits all of them alike; each subprocess warms up on one batch, then times one
val + test evaluation. Figures: median and min seconds over ``--rounds``; peak memory = the
largest resident set size sampled every 5 ms during the evaluation minus the RSS before it
(after imports, data, model and warm-up; memory-mapped slices read count, alike in every impl),
and the subprocess's whole peak RSS (``getrusage(RUSAGE_SELF).ru_maxrss``). The load
average (``os.getloadavg``) is recorded before and after each measurement: other processes
share the CPU. Dice: every metric of every impl must equal ``old``'s (NaN-aware).

    python benchmarks/bench_eval.py --data ../shared/data/Task04_Hippocampus \\
        --out results/benchmarks/cpu-2core/bench_eval.json

stdout: one JSON object (machine, load, settings, results, Dice check, target check);
stderr: progress and a short table.
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
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from trainers.config import DataConfig, ModelConfig, SplitConfig  # noqa: E402
from trainers.data import SliceData, labelled_subset, make_split, prepare_slices  # noqa: E402
from trainers.losses import segmentation_loss  # noqa: E402
from trainers.metrics import evaluate_volumes  # noqa: E402
from trainers.model import UNet, unwrap_model  # noqa: E402
from trainers.stages import evaluate_model  # noqa: E402

IMPLS = ("old", "new", "new-b256")
TARGET_S = 5.0  # final val + test evaluation of a base-16 node, 2-core CPU (issue item)
# search_spaces/paper_hippocampus_cpu.yaml
DATA = {"kind": "msd", "image_size": 64, "axis": -1, "flip_axes": (0,)}
SPLIT = SplitConfig(train=0.6, val=0.2, test=0.2, repeats=4)


# --------------------------------------------------------------------------------------------
# the previous implementation
# --------------------------------------------------------------------------------------------


def old_evaluate_model(
    model: torch.nn.Module,
    data: SliceData,
    volumes: tuple[int, ...],
    device: torch.device,
    batch_size: int = 256,
) -> dict[str, float]:
    """``evaluate_model`` before the streamed evaluation: all slices in memory, predictions of
    every batch concatenated, then ``evaluate_volumes`` over the whole set (CPU path)."""
    if not volumes:
        return {}
    index = data.slices_of(volumes)
    images = torch.from_numpy(np.ascontiguousarray(data.images[index]))
    labels = torch.from_numpy(data.labels[index].astype(np.int64))
    volume = torch.from_numpy(data.volume[index].astype(np.int64))
    module = unwrap_model(model)
    was_training = module.training
    module.eval()
    predictions = []
    try:
        with torch.inference_mode():
            for start in range(0, images.shape[0], batch_size):
                x = images[start : start + batch_size].to(device, non_blocking=True)
                predictions.append(module(x).argmax(1))
    finally:
        module.train(was_training)
    return evaluate_volumes(torch.cat(predictions), labels, volume, data.num_classes)


def evaluate(impl: str, model: torch.nn.Module, data: SliceData, split: Any) -> dict[str, Any]:
    """One final evaluation (val, then test) by ``impl``: {"val": metrics, "test": metrics}."""
    cpu = torch.device("cpu")
    if impl == "old":
        return {v: old_evaluate_model(model, data, getattr(split, v), cpu) for v in ("val", "test")}
    batch = 256 if impl == "new-b256" else None
    return {v: evaluate_model(model, data, getattr(split, v), cpu, batch) for v in ("val", "test")}


# --------------------------------------------------------------------------------------------
# setup (parent) and one measurement (subprocess)
# --------------------------------------------------------------------------------------------


def load_data(root: str, cache: str) -> SliceData:
    return prepare_slices(DataConfig(root=root, **DATA), cache)


def build_model(spec: dict[str, Any], num_classes: int) -> UNet:
    torch.manual_seed(spec["seed"])
    cfg = ModelConfig(base_channels=spec["base_channels"], depth=spec["depth"], norm="instance")
    return UNet(cfg, in_channels=1, num_classes=num_classes)


def train_briefly(model: UNet, data: SliceData, split: Any, steps: int, seed: int) -> float:
    """``steps`` Adam steps (lr 2e-3, batches of 16) on the labelled 20 % of the training
    volumes, so that the evaluated predictions look like a trained node's; the last loss.
    (The weights are saved beside the slice cache and reused by later runs.)"""
    index = data.slices_of(labelled_subset(split, 0.2))
    images = torch.from_numpy(np.ascontiguousarray(data.images[index]))
    labels = torch.from_numpy(data.labels[index].astype(np.int64))
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    loss = torch.tensor(math.nan)
    model.train()
    for _ in range(steps):
        batch = torch.randint(len(index), (16,), generator=gen)
        loss = segmentation_loss(model(images[batch]), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())


def rss_bytes() -> int:
    """This process's resident set size now (Linux ``/proc/self/statm``)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RssSampler:
    """Samples ``rss_bytes`` every ``interval`` s in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak = interval, rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak = max(self.peak, rss_bytes())

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    data = load_data(spec["root"], spec["cache"])
    split = make_split(data.num_volumes, SPLIT, spec["split_index"])
    model = build_model(spec, data.num_classes)
    model.load_state_dict(torch.load(spec["weights"], weights_only=True))
    warm_batch = 256 if spec["impl"] == "old" else 32
    with torch.inference_mode():
        model.eval()(torch.from_numpy(np.ascontiguousarray(data.images[:warm_batch])))
    base_rss = rss_bytes()
    load_before = os.getloadavg()[0]
    with RssSampler() as sampler:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        start = time.perf_counter()
        scores = evaluate(spec["impl"], model, data, split)
        seconds = time.perf_counter() - start
    end = resource.getrusage(resource.RUSAGE_SELF)
    max_rss_kib = end.ru_maxrss  # KiB on Linux
    return {
        "seconds": seconds,
        "cpu_seconds": (end.ru_utime + end.ru_stime) - (usage.ru_utime + usage.ru_stime),
        "peak_mib": (sampler.peak - base_rss) / 2**20,
        "baseline_rss_mib": base_rss / 2**20,
        "peak_rss_mib": max_rss_kib / 1024,
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "scores": scores,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """One (impl, round) in a fresh interpreter, so that its peak RSS is its own."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"{spec['impl']}: worker failed (exit {proc.returncode}): {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def dice_check(scores: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every impl's metrics against ``old``'s: equal keys, largest absolute difference."""
    reference = scores.get("old") or next(iter(scores.values()))
    out: dict[str, Any] = {}
    for impl, got in scores.items():
        diffs, mismatched = [], []
        for subset in ("val", "test"):
            if got[subset].keys() != reference[subset].keys():
                mismatched.append(f"{subset}: keys differ")
                continue
            for key, value in reference[subset].items():
                if not same(float(value), float(got[subset][key])):
                    mismatched.append(f"{subset}_{key}")
                    diffs.append(abs(float(value) - float(got[subset][key])))
        out[impl] = {
            "identical": not mismatched,
            "max_abs_diff": max(diffs, default=0.0),
            "differing": mismatched,
        }
    return out


def machine_info() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads_default": torch.get_num_threads(),
    }


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def run(args: argparse.Namespace) -> dict[str, Any]:
    uptime_start = uptime()
    print(f"  {uptime_start}", file=sys.stderr, flush=True)
    data = load_data(args.data, args.cache)
    split = make_split(data.num_volumes, SPLIT, args.split_index)
    slices = {v: int(data.slices_of(getattr(split, v)).size) for v in ("val", "test")}
    base = {"seed": args.seed, "base_channels": args.base_channels, "depth": args.depth}
    model = build_model(base, data.num_classes)
    # trained once per setting, kept beside the slice cache (training is slow on a busy CPU)
    weights = Path(args.cache) / (
        f"model-b{args.base_channels}-d{args.depth}-steps{args.train_steps}-seed{args.seed}-"
        f"split{args.split_index}-{data.fingerprint}.pt"
    )
    if weights.is_file():
        model.load_state_dict(torch.load(weights, weights_only=True))
        trained = f"weights of {args.train_steps} training steps from {weights}"
    else:
        started = time.perf_counter()
        last_loss = train_briefly(model, data, split, args.train_steps, args.seed)
        trained = (
            f"{args.train_steps} training steps in {time.perf_counter() - started:.1f} s "
            f"(last loss {last_loss:.3f})"
        )
        torch.save(model.state_dict(), weights)
    print(
        f"  {len(split.val)} + {len(split.test)} volumes, {slices['val']} + {slices['test']} "
        f"slices; {trained}",
        file=sys.stderr,
        flush=True,
    )
    rows: dict[str, list[dict[str, Any]]] = {impl: [] for impl in args.impls}
    for round_ in range(args.rounds):
        for impl in args.impls:
            spec = {
                **base, "impl": impl, "root": args.data, "cache": args.cache,
                "split_index": args.split_index, "weights": str(weights),
                "threads": args.threads,
            }  # fmt: skip
            row = measure(spec)
            rows[impl].append(row)
            print(
                f"  round {round_ + 1} {impl:<9} {row['seconds']:6.2f} s "
                f"(cpu {row['cpu_seconds']:6.2f} s)  "
                f"{row['peak_mib']:7.1f} MiB  load {row['load_before']:.2f} -> "
                f"{row['load_after']:.2f}",
                file=sys.stderr,
                flush=True,
            )
    results = []
    for impl, measured in rows.items():
        seconds = [r["seconds"] for r in measured]
        cpu = [r["cpu_seconds"] for r in measured]
        results.append(
            {
                "impl": impl,
                "median_s": statistics.median(seconds),
                "min_s": min(seconds),
                "seconds": [round(s, 3) for s in seconds],
                "median_cpu_s": statistics.median(cpu),
                "cpu_seconds": [round(s, 3) for s in cpu],
                "peak_mib": max(r["peak_mib"] for r in measured),
                "peak_rss_mib": max(r["peak_rss_mib"] for r in measured),
                "baseline_rss_mib": max(r["baseline_rss_mib"] for r in measured),
                "load": [[round(r["load_before"], 2), round(r["load_after"], 2)] for r in measured],
                "scores": measured[0]["scores"],
            }
        )
    new = next((r for r in results if r["impl"] == "new"), None)
    old = next((r for r in results if r["impl"] == "old"), None)
    targets: dict[str, Any] = {"target_s": TARGET_S}
    if new is not None:
        targets["new_median_s"] = new["median_s"]
        targets["met"] = new["median_s"] <= TARGET_S
        if old is not None:
            targets["speedup_median"] = old["median_s"] / new["median_s"]
            targets["memory_ratio"] = new["peak_mib"] / max(old["peak_mib"], 1e-9)
    return {
        "benchmark": "final evaluation of a fine-tuning node: Dice on val + test volumes",
        "machine": machine_info(),
        "load": {"start": uptime_start, "end": uptime()},
        "settings": {
            "data": args.data,
            "dataset": {**DATA, "flip_axes": list(DATA["flip_axes"])},
            "split": {"train": SPLIT.train, "val": SPLIT.val, "test": SPLIT.test},
            "split_index": args.split_index,
            "volumes": {"val": len(split.val), "test": len(split.test)},
            "slices": slices,
            "model": {**base, "norm": "instance"},
            "train_steps": args.train_steps,
            "trained": trained,
            "rounds": args.rounds,
            "threads": args.threads or torch.get_num_threads(),
            "memory": "peak_mib: largest RSS (sampled every 5 ms) during the evaluation minus "
            "the RSS before it, in a fresh subprocess per (impl, round) after imports, data, "
            "model and a one-batch warm-up; peak_rss_mib: that subprocess's ru_maxrss",
        },
        "results": results,
        "dice_vs_old": dice_check({r["impl"]: r["scores"] for r in results}),
        "targets": targets,
    }


def print_table(report: dict[str, Any]) -> None:
    print(
        "\n| impl | median s | min s | median CPU s | peak growth MiB | peak RSS MiB "
        "| Dice = old |",
        file=sys.stderr,
    )
    print("|---|---|---|---|---|---|---|", file=sys.stderr)
    for row in report["results"]:
        check = report["dice_vs_old"][row["impl"]]["identical"]
        print(
            f"| {row['impl']} | {row['median_s']:.2f} | {row['min_s']:.2f} | "
            f"{row['median_cpu_s']:.2f} | "
            f"{row['peak_mib']:.1f} | {row['peak_rss_mib']:.0f} | {'yes' if check else 'NO'} |",
            file=sys.stderr,
        )
    print(f"load: {report['load']['start']}  ->  {report['load']['end']}", file=sys.stderr)


def default_data() -> str:
    shared = os.environ.get("SEMICON_DATA", str(ROOT.parent / "shared" / "data"))
    return str(Path(shared) / "Task04_Hippocampus")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=default_data(), help="Task04_Hippocampus folder")
    parser.add_argument(
        "--cache",
        default=str(Path(tempfile.gettempdir()) / "semicon-bench-eval-cache"),
        help="slice cache folder (prepare_slices)",
    )
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--base-channels", type=int, default=16)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--split-index", type=int, default=0)
    parser.add_argument("--train-steps", type=int, default=60, help="0: random init")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs per impl")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's); 1 on a contended machine"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON object here")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.train_steps < 0 or (args.threads or 1) < 1:
        parser.error("--rounds and --threads must be >= 1, --train-steps >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(json.loads(args.worker))))
        return
    report = run(args)
    print_table(report)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
