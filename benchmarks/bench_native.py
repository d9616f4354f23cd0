"""Benchmark: what the native-resolution test metrics add to a fine-tuning node's final test pass.

Two implementations of the test evaluation of one U-Net on the real Hippocampus test volumes
(split ``--split-index`` of 0.6 / 0.2 / 0.2: 42 of the 208 cases here):

- ``model-sized``: ``trainers.stages.evaluate_model`` (the Dice at 64 x 64, what a node did);
- ``with-native``: ``trainers.native.score_test_volumes`` (the same Dice from the same forward
  pass, plus Dice, HD95 and surface Dice on each volume's own voxel grid).

Model: ``--node DIR``, a stored fine-tuning node folder (``node.json`` + ``model.pt``), so that
predictions look like a trained node's; without it a seeded random-init
``UNet(base_channels=8, depth=4)`` (noisy predictions: many boundary voxels, an upper bound on
the surface metrics' cost). Data: ``prepare_slices`` of ``--data`` at 64 x 64 along the last
axis into ``--cache`` (the first run also writes the native sidecar).

Every (impl, round) runs in a fresh subprocess with one torch thread, rounds interleaving the
impls so that a change in machine load hits both alike; each subprocess imports, loads, warms up
on one volume, then times one test evaluation. The ``with-native`` subprocess also times
``import monai.metrics.utils`` after torch (paid once per worker process). Figures: median and
min seconds over ``--rounds``; the load average before and after each measurement.

    python benchmarks/bench_native.py --data ../shared/data/Task04_Hippocampus \\
        --cache /tmp/native-cache --node results/<sweep>/stages/<finetune key>

stdout: one JSON object; stderr: a short table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

IMPLS = ("model-sized", "with-native")


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """One subprocess's measurement of ``args.impl``."""
    import torch

    torch.set_num_threads(1)
    from trainers.config import DataConfig, ModelConfig, SplitConfig, from_dict
    from trainers.data import make_split, prepare_slices
    from trainers.model import UNet

    out: dict[str, Any] = {}
    if args.impl == "with-native":
        started = time.perf_counter()
        import monai.metrics.utils  # noqa: F401

        out["monai_import_s"] = time.perf_counter() - started
    from trainers.native import score_test_volumes
    from trainers.stages import evaluate_model

    data = prepare_slices(DataConfig(kind="msd", root=args.data, image_size=64), args.cache)
    split = make_split(data.num_volumes, SplitConfig(), args.split_index)
    if args.node:
        node = json.loads((Path(args.node) / "node.json").read_text())
        model = UNet(from_dict(ModelConfig, node["model"], "model"), 1, data.num_classes)
        state = torch.load(Path(args.node) / "model.pt", weights_only=True, map_location="cpu")
        model.load_state_dict(state)
    else:
        torch.manual_seed(0)
        model = UNet(ModelConfig(base_channels=8, depth=4), 1, data.num_classes)
    cpu = torch.device("cpu")

    def run(volumes: tuple[int, ...]) -> dict[str, float]:
        if args.impl == "model-sized":
            return evaluate_model(model, data, volumes, cpu)
        return score_test_volumes(model, data, volumes, cpu)

    run(split.test[:1])  # warm-up
    out["load_before"] = os.getloadavg()[0]
    started = time.perf_counter()
    metrics = run(split.test)
    out["seconds"] = time.perf_counter() - started
    out["load_after"] = os.getloadavg()[0]
    out["volumes"] = len(split.test)
    out["metrics"] = {k: v for k, v in metrics.items() if k != "native_eval_seconds"}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="the Hippocampus MSD folder")
    parser.add_argument("--cache", required=True, help="slice cache folder (prepare_slices)")
    parser.add_argument("--node", help="a stored fine-tuning node folder (node.json, model.pt)")
    parser.add_argument("--split-index", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # one subprocess
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(_measure(args)))
        return
    results: dict[str, list[dict[str, Any]]] = {impl: [] for impl in IMPLS}
    for round_ in range(args.rounds):
        for impl in IMPLS if round_ % 2 == 0 else IMPLS[::-1]:
            command = [sys.executable, __file__, *sys.argv[1:], "--impl", impl]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            results[impl].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {round_} {impl}: {results[impl][-1]['seconds']:.2f} s", file=sys.stderr)
    sized, native = results["model-sized"][0]["metrics"], results["with-native"][0]["metrics"]
    same = all(native[f"test_{k}"] == v for k, v in sized.items())
    summary = {
        impl: {
            "median_s": statistics.median(r["seconds"] for r in runs),
            "min_s": min(r["seconds"] for r in runs),
        }
        for impl, runs in results.items()
    }
    imports = [r["monai_import_s"] for r in results["with-native"]]
    report = {
        "settings": {k: v for k, v in vars(args).items() if k != "impl"},
        "summary": summary,
        "extra_median_s": summary["with-native"]["median_s"] - summary["model-sized"]["median_s"],
        "monai_import_median_s": statistics.median(imports),
        "model_sized_dice_identical": same,
        "native_metrics": {k: v for k, v in native.items() if "native" in k},
        "runs": results,
    }
    for impl, figures in summary.items():
        print(
            f"{impl:12s} median {figures['median_s']:.2f} s, min {figures['min_s']:.2f} s",
            file=sys.stderr,
        )
    print(
        f"MONAI import (once per worker process): median {report['monai_import_median_s']:.2f} s",
        file=sys.stderr,
    )
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
