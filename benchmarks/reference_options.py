"""Measure the reference network's choices against ours under a sweep spec's exact protocol.

Two deviations from the reference code (xhu248/semi_cotrast_seg) are options of ``model``:
``decoder_norm`` ("same": InstanceNorm in the decoder too, ours; "none": the reference's
unnormalised decoder) and ``global_grid`` (4: the global head flattens a 4 x 4 grid of the
centre, ours; 1: global average pooling, the reference's). This script runs, in-process (no
Ray), one method per option under every setting of a spec's grid point except the model option,
for each split given, and writes per-run test Dice plus the paired difference (variant - ours)
with its 95 % t interval.

    SEMICON_DATA=../shared/data python benchmarks/reference_options.py \
        search_spaces/paper_hippocampus_cpu.yaml --label-fraction 0.05 --splits 0 1 2 \
        --out results/reproductions/paper_hippocampus_cpu/reference_options.json

Comparisons (each arm fine-tuned under the spec's step budget, same seed and split):
- ``decoder_norm``: method ``random`` with decoder_norm same vs none (isolates the decoder);
- ``global_grid``: method ``global`` with global_grid 4 vs 1 (the head only matters through
  global pretraining).
``--ours-from STORAGE`` takes the "ours" arm from a finished sweep of the same spec instead of
re-running it (its node computes the same thing: CPU runs are deterministic).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

from orchestrator.spec import load_spec
from orchestrator.stats import paired_summary
from trainers.pipeline import run_pipeline

COMPARISONS = {
    # option: (method, ours, reference)
    "decoder_norm": ("random", "same", "none"),
    "global_grid": ("global", 4, 1),
}
METRICS = ("test_dice_pooled_mean", "test_dice_pooled_c1", "test_dice_pooled_c2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("spec", help="a sweep spec (its stage settings and model are used)")
    p.add_argument("--label-fraction", type=float, default=0.05)
    p.add_argument("--splits", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--options", nargs="+", default=list(COMPARISONS), choices=list(COMPARISONS))
    p.add_argument("--ours-from", help="a finished sweep of the spec: take the 'ours' arm from it")
    p.add_argument(
        "--arms",
        nargs="+",
        default=["reference", "ours"],
        choices=["reference", "ours"],
        help="which arms to produce (e.g. only the reference while the sweep computes ours)",
    )
    p.add_argument(
        "--combine",
        help="a JSON this script wrote: reuse its reference arms (nothing is run for those)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "semicon-sweep"))
    p.add_argument("--out", help="write the JSON here too")
    return p.parse_args(argv)


def run_arm(spec: Any, method: str, fraction: float, split: int, model: Any, cache: str) -> dict:
    point = spec.configure({"method": method, "label_fraction": fraction, "split": split})
    started = time.perf_counter()
    out = run_pipeline(dataclasses.replace(point, model=model), device="cpu", cache_dir=cache)
    metrics = {k: float(out["metrics"][k]) for k in METRICS}
    return {**metrics, "wall_s": time.perf_counter() - started}


def ours_from_sweep(storage: str, method: str, fraction: float, split: int) -> dict | None:
    """The arm from a sweep's trials table, re-collected so that it is current."""
    from orchestrator.cli import recorded_plan
    from orchestrator.tables import collect

    plan, store = recorded_plan(Path(storage))
    trials = collect(plan, store).trials
    match = trials[
        (trials["method"] == method)
        & (trials["label_fraction"] == fraction)
        & (trials["split"] == split)
        & (trials["status"] == "ok")
    ]
    return None if match.empty else {k: float(match.iloc[0][k]) for k in METRICS}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    previous = json.loads(Path(args.combine).read_text())["results"] if args.combine else {}
    results: dict[str, Any] = {}
    for option in args.options:
        method, ours, reference = COMPARISONS[option]
        runs = []
        for split in args.splits:
            row: dict[str, Any] = {"split": split}
            # the reference arm first: a sweep running meanwhile may have finished "ours" by then
            for arm, value in (("reference", reference), ("ours", ours)):
                if arm not in args.arms:
                    continue
                model = dataclasses.replace(spec.model, **{option: value})
                earlier = [
                    r[arm] for r in previous.get(option, {}).get("runs", []) if r["split"] == split
                ]
                recorded = (
                    ours_from_sweep(args.ours_from, method, args.label_fraction, split)
                    if arm == "ours" and args.ours_from
                    else (earlier[0] if earlier and arm == "reference" else None)
                )
                row[arm] = recorded or run_arm(
                    spec, method, args.label_fraction, split, model, args.cache_dir
                )
                if not recorded:
                    row[arm]["source"] = "run here"
                elif "source" not in row[arm]:
                    row[arm]["source"] = "sweep"
                print(f"{option} {arm}={value} split {split}: {row[arm]}", file=sys.stderr)
            runs.append(row)
        pairs = [r for r in runs if "reference" in r and "ours" in r]
        deltas = {
            m: paired_summary([r["reference"][m] - r["ours"][m] for r in pairs])
            for m in METRICS
            if pairs
        }
        results[option] = {
            "method": method,
            "ours": ours,
            "reference": reference,
            "runs": runs,
            "reference_minus_ours": deltas,
        }
    report = {
        "spec": args.spec,
        "label_fraction": args.label_fraction,
        "splits": args.splits,
        "machine": {"platform": platform.platform(), "torch": torch.__version__},
        "threads": args.threads,
        "results": results,
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
