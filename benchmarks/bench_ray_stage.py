"""Benchmark: one finetune stage run bare in-process vs inside Ray (Tune trial -> TorchTrainer).

The same stage node (method ``random``: fine-tuning from random initialisation, on the same
slices, seed and split) runs

- ``bare``: ``orchestrator.worker.run_stage`` in this process, no Ray (what
  ``trainers.pipeline`` does), with as many torch threads as the Ray worker gets
  (``--cpus-per-worker``, default 1);
- ``ray``:  ``orchestrator.execute.run_sweep`` on a local Ray: a Tune trial drives a one-worker
  ``TorchTrainer`` whose worker runs the same ``run_stage``, reporting through
  ``ray.train.report`` every epoch with a checkpoint (every ``--checkpoint-every`` epochs, and
  the last) and otherwise at most once per poll interval of training time, once per value of
  ``--train-poll-s`` (Ray Train's controller collects each report on this poll,
  ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``: Ray's default 2 s, ``run_sweep``'s 0.5 s; a worker's
  next report waits for it).

Figures, from the epoch records (``stages/<key>/epochs.jsonl`` for Ray, the report callback for
bare), the first epoch excluded as warm-up:

- ``compute slices/s``: median over epochs of the stage's own ``slices_per_s`` (training
  slices / training seconds of the epoch: forward, backward, optimiser);
- ``epoch slices/s``: training slices per epoch / median wall interval between consecutive
  epoch records (adds validation, reporting and checkpointing: what a sweep really gets);
- ``start-up s``: wall time from the call (``run_stage`` / ``run_sweep``) to the first epoch
  record, minus that epoch's training seconds: the fixed cost (Ray: trial, Train controller and
  worker processes, process group, data memory-map, model build); ``wall s``: call to result.

Data are preprocessed before timing (both sides read the same memory-mapped cache). Each arm
runs ``--repeats`` times (fresh storage each time); figures are medians over repeats.

    python benchmarks/bench_ray_stage.py --quick              # CPU smoke run, a few minutes on 2 cores
    python benchmarks/bench_ray_stage.py --device cuda --data /path/to/Task04_Hippocampus

stdout: one JSON object; stderr: progress and a short table.

The other Ray benchmarks (``bench_packing.py``, ``bench_reuse.py``) import the shared helpers
below (sizes, spec writing, Ray start, epoch statistics, machine info).
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
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator.execute import run_sweep  # noqa: E402
from orchestrator.plan import Plan, build_plan  # noqa: E402
from orchestrator.session import quiet_ray_env  # noqa: E402
from orchestrator.spec import Spec, load_spec  # noqa: E402
from orchestrator.store import StageStore  # noqa: E402
from trainers.config import DataConfig, from_dict  # noqa: E402
from trainers.data import prepare_slices  # noqa: E402

POLL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"

# (dataset, model, finetune) settings: --quick is a CPU smoke size, the default a GPU-sized run
SIZES: dict[str, dict[str, Any]] = {
    "quick": {
        "dataset": {"kind": "synthetic", "image_size": 32, "synthetic_cases": 8},
        "model": {"base_channels": 8, "depth": 2, "embed_dim": 16, "global_hidden": 32, "local_hidden": 16},
        "finetune": {"epochs": 5, "batch_size": 8},
        "global": {"epochs": 3, "batch_size": 16},
    },
    "full": {
        "dataset": {"kind": "synthetic", "image_size": 64, "synthetic_cases": 48},
        "model": {"base_channels": 32, "depth": 4},
        "finetune": {"epochs": 12, "batch_size": 16},
        "global": {"epochs": 12, "batch_size": 64},
    },
}


# --------------------------------------------------------------------------------------------
# shared helpers (also used by bench_packing.py and bench_reuse.py)


def log(line: str) -> None:
    """Progress to stderr."""
    print(line, file=sys.stderr, flush=True)


def machine_info(device: str) -> dict[str, Any]:
    """Platform, CPU count, load, torch / ray versions and the device's name."""
    import ray

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
        "torch": torch.__version__,
        "ray": ray.__version__,
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def sizes(quick: bool, data_root: str | None) -> dict[str, Any]:
    """The size settings, with ``dataset`` switched to the MSD folder ``data_root`` if given."""
    chosen = json.loads(json.dumps(SIZES["quick" if quick else "full"]))
    if data_root:
        chosen["dataset"] = {"kind": "msd", "root": str(Path(data_root).absolute()),
                             "image_size": chosen["dataset"]["image_size"]}
    return chosen


def write_spec(folder: Path, name: str, size: Mapping[str, Any], **sections: Any) -> Spec:
    """A spec named ``name`` of ``size`` plus ``sections``, stored in ``folder/<name>``."""
    stages = {"finetune": dict(size["finetune"]), "global": dict(size["global"]), **sections.pop("stages", {})}
    raw = {
        "name": name,
        "dataset": size["dataset"],
        "split": {"train": 0.6, "val": 0.2, "test": 0.2, "repeats": 1},
        "model": size["model"],
        "stages": stages,
        "storage": str(folder / name),
        **sections,
    }
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_spec(path)


def prepare(plan: Plan, store: StageStore) -> dict[str, str]:
    """Preprocess every dataset of ``plan`` into the store's cache (untimed); key -> cache folder."""
    folders: dict[str, str] = {}
    for key, node in plan.nodes.items():
        data = prepare_slices(from_dict(DataConfig, node.data, "dataset"), store.cache_dir)
        folders[key] = str(store.cache_dir / data.fingerprint)
    return folders


def start_ray(num_cpus: int, num_gpus: int) -> float:
    """Start a local Ray for the whole benchmark (quiet, no dashboard); returns seconds taken."""
    import ray

    started = time.perf_counter()
    with quiet_ray_env():
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False,
                 logging_level="WARNING")
    return time.perf_counter() - started


def slices_per_epoch(record: Mapping[str, Any]) -> float:
    """Training slices of one epoch (all ranks): ``slices_per_s * seconds``."""
    return float(record["slices_per_s"]) * float(record["seconds"])


def steady_state(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Steady-state figures of one node's epoch records (first epoch excluded; see module doc)."""
    records = sorted(records, key=lambda r: r["epoch"])
    if len(records) < 3:
        raise ValueError(f"need >= 3 epochs for steady-state figures, got {len(records)}")
    steady = records[1:]
    intervals = [b["time"] - a["time"] for a, b in zip(records[:-1], steady, strict=True)]  # ends at each steady epoch
    per_epoch = statistics.median(slices_per_epoch(r) for r in steady)
    interval = statistics.median(intervals)
    return {
        "epochs": len(records),
        "slices_per_epoch": per_epoch,
        "compute_slices_per_s": statistics.median(float(r["slices_per_s"]) for r in steady),
        "epoch_interval_s": interval,
        "epoch_slices_per_s": per_epoch / interval,
        "torch_threads": records[-1].get("torch_threads"),
    }


def median_of(runs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> dict[str, float]:
    """Median over runs of each numeric key."""
    return {k: statistics.median(float(r[k]) for r in runs) for k in keys if all(r.get(k) is not None for r in runs)}


def print_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> None:
    """A plain table on stderr; ``columns``: (key, header, format spec)."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    log("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths, strict=True)))
    for row in rows:
        cells = []
        for (key, _, fmt), width in zip(columns, widths, strict=True):
            value = row.get(key)
            cells.append((format(value, fmt) if isinstance(value, int | float) else str(value)).rjust(width))
        log("  ".join(cells))


# --------------------------------------------------------------------------------------------
# the two arms


def run_bare(spec: Spec, folder: Path, device: str, threads: int) -> dict[str, Any]:
    """The finetune node run in-process; timing from the call to the result."""
    from orchestrator.worker import run_stage

    plan = build_plan(spec)
    store = StageStore(folder)
    cache = prepare(plan, store)
    (key,) = plan.nodes
    records: list[dict[str, Any]] = []

    def report(metrics: dict[str, float], _checkpoint: Any) -> None:
        records.append({**metrics, "time": time.time(), "torch_threads": torch.get_num_threads()})

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        started = time.time()
        run_stage(plan.nodes[key], cache[key], store, torch.device(device), report=report)
        wall = time.time() - started
    finally:
        torch.set_num_threads(previous)
    return {"wall_s": wall, "startup_s": records[0]["time"] - started - records[0]["seconds"], **steady_state(records)}


def run_ray(spec: Spec, poll_s: float | None) -> dict[str, Any]:
    """The finetune node through ``run_sweep`` (Ray already started); timing call -> result."""
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    prepare(plan, store)
    (key,) = plan.nodes
    saved = os.environ.get(POLL_ENV)
    if poll_s is not None:
        os.environ[POLL_ENV] = str(poll_s)
    try:
        started = time.time()
        outcome = run_sweep(plan, store, progress=lambda line: log(f"    {line}"))
        wall = time.time() - started
    finally:
        if saved is None:
            os.environ.pop(POLL_ENV, None)
        else:
            os.environ[POLL_ENV] = saved
    if outcome.failed:
        raise RuntimeError(f"the Ray run failed: {outcome.failed}")
    records = store.read_epochs(key)
    return {"wall_s": wall, "startup_s": records[0]["time"] - started - records[0]["seconds"], **steady_state(records)}


FIGURES = ("wall_s", "startup_s", "slices_per_epoch", "compute_slices_per_s", "epoch_interval_s", "epoch_slices_per_s", "torch_threads")


def run(args: argparse.Namespace) -> dict[str, Any]:
    size = sizes(args.quick, args.data)
    cpus = os.cpu_count() or 1
    gpu = args.device == "cuda"
    threads = args.cpus_per_worker
    resources = {"workers_per_trial": 1, "cpus_per_worker": threads, "gpus_per_worker": 1 if gpu else 0,
                 "checkpoint_every": args.checkpoint_every, "max_failures": 0}
    ray_init_s = start_ray(cpus, 1 if gpu else 0)
    arms: dict[str, list[dict[str, Any]]] = {"bare": []}
    polls = args.train_poll_s
    for poll in polls:
        arms[f"ray poll {poll:g}s"] = []
    with tempfile.TemporaryDirectory(prefix="bench-ray-stage-") as tmp:
        for repeat in range(args.repeats):
            common = {"method": "random", "label_fraction": 1.0, "seed": repeat, "resources": resources}
            log(f"repeat {repeat + 1}/{args.repeats}: bare")
            bare_spec = write_spec(Path(tmp), f"bare{repeat}", size, **common)
            arms["bare"].append(run_bare(bare_spec, Path(bare_spec.storage), args.device, threads))
            for poll in polls:
                log(f"repeat {repeat + 1}/{args.repeats}: ray, Train poll {poll:g} s")
                spec = write_spec(Path(tmp), f"ray{repeat}-{poll:g}".replace(".", "_"), size, **common)
                arms[f"ray poll {poll:g}s"].append(run_ray(spec, poll))
    summary = {arm: median_of(runs, FIGURES) for arm, runs in arms.items()}
    bare = summary["bare"]
    comparison = {
        arm: {
            "startup_overhead_s": figures["startup_s"] - bare["startup_s"],
            "compute_ratio": figures["compute_slices_per_s"] / bare["compute_slices_per_s"],
            "epoch_ratio": figures["epoch_slices_per_s"] / bare["epoch_slices_per_s"],
        }
        for arm, figures in summary.items()
        if arm != "bare"
    }
    return {
        "benchmark": "ray_stage",
        "machine": machine_info(args.device),
        "settings": {"size": size, "resources": resources, "repeats": args.repeats, "train_poll_s": polls,
                     "ray_init_s": ray_init_s, "quick": args.quick},
        "runs": arms,
        "median": summary,
        "ray_vs_bare": comparison,
    }


def bench_parser(description: str, quick_help: str) -> argparse.ArgumentParser:
    """The options every Ray benchmark takes: --quick, --device, --data, --checkpoint-every."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--data", help="an MSD folder (e.g. Task04_Hippocampus) instead of synthetic data")
    parser.add_argument("--checkpoint-every", type=int, default=1, help="epochs between Train checkpoints")
    return parser


def finish_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Add --out, parse, and refuse --device cuda without a CUDA device."""
    parser.add_argument("--out", type=Path, help="also write the JSON object here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    return args


def emit(result: Mapping[str, Any], out: Path | None) -> None:
    """The result as one JSON object on stdout, and in ``out`` when given."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = bench_parser(__doc__.splitlines()[0], "CPU smoke size (tiny U-Net, 32 x 32, 8 synthetic cases, 5 epochs)")
    parser.add_argument("--repeats", type=int, default=None, help="runs per arm (quick 1, else 3)")
    parser.add_argument("--cpus-per-worker", type=int, default=1,
                        help="Ray worker CPUs = torch threads on both sides (default 1: on a shared "
                             "machine, more threads than free cores make torch wait on itself)")
    parser.add_argument("--train-poll-s", type=float, nargs="+", default=[2.0, 0.5],
                        help="Ray Train controller poll intervals to compare (2.0: Ray's default, "
                             "0.5: run_sweep's default)")
    args = finish_args(parser, argv)
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    result = run(args)
    rows = [{"arm": arm, **figures} for arm, figures in result["median"].items()]
    print_table(rows, [("arm", "arm", ""), ("compute_slices_per_s", "compute sl/s", ".0f"),
                       ("epoch_slices_per_s", "epoch sl/s", ".0f"), ("epoch_interval_s", "epoch s", ".2f"),
                       ("startup_s", "start-up s", ".1f"), ("wall_s", "wall s", ".1f"),
                       ("torch_threads", "threads", ".0f")])
    emit(result, args.out)


if __name__ == "__main__":
    main()
