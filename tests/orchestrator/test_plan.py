"""Planning: grid expansion, node sharing, key stability and propagation, levels, summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestrator.plan import Plan, build_plan
from orchestrator.store import StageStore
from tests.orchestrator.specs import spec_of

REPO = Path(__file__).resolve().parents[2]

BASE = """
name: plan-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: [global, global+local_block]
label_fraction: [0.2, 0.5]
seed: [0, 1]
stages:
  global: {temperature: 0.5}
  local: {block_size: 8, temperature: 0.1}
  finetune: {lr: 0.0005}
"""


def stage_counts(plan: Plan) -> dict[str, int]:
    return {stage: counts["nodes"] for stage, counts in plan.summary()["stages"].items()}


def test_trials_follow_grid_order(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, BASE))
    assert [t.trial_id for t in plan.trials] == [f"t{i:04d}" for i in range(8)]
    first, last = plan.trials[0], plan.trials[-1]
    assert (first.method, first.label_fraction, first.seed) == ("global", 0.2, 0)
    assert (last.method, last.label_fraction, last.seed) == ("global+local_block", 0.5, 1)
    assert first.params == {"method": "global", "label_fraction": 0.2, "seed": 0}
    assert list(last.nodes) == ["global", "local", "finetune"]
    assert list(first.nodes) == ["global", "finetune"]


def test_reuse_counts(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, BASE))
    # one global pretraining per seed serves both methods and both fractions;
    # supervised local depends on (fraction, seed); finetune on everything
    assert stage_counts(plan) == {"global": 2, "local": 4, "finetune": 8}
    summary = plan.summary()
    assert summary["trials"] == 8
    assert all(counts["to_run"] == counts["nodes"] for counts in summary["stages"].values())
    globals_by_seed = {t.seed: t.nodes["global"] for t in plan.trials}
    assert all(t.nodes["global"] == globals_by_seed[t.seed] for t in plan.trials)
    assert plan.nodes[globals_by_seed[0]].label_fraction is None


def test_temperature_grid_shares_global_and_unlabelled_nodes(tmp_path: Path) -> None:
    text = BASE.replace("method: [global, global+local_block]", "method: global+local_block")
    text += (
        "grid:\n  stages.local.temperature: [0.05, 0.1, 0.5]\n  stages.local.block_size: [8, 16]\n"
    )
    plan = build_plan(spec_of(tmp_path, text))
    assert len(plan.trials) == 2 * 2 * 3 * 2
    assert stage_counts(plan) == {"global": 2, "local": 2 * 2 * 3 * 2, "finetune": 24}


def test_no_reuse_gives_one_node_per_trial_and_stage(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, BASE), reuse=False)
    with_local = sum(1 for t in plan.trials if "local" in t.nodes)
    assert stage_counts(plan) == {"global": 8, "local": with_local, "finetune": 8}


def test_levels_by_depth(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, BASE))
    assert [len(level) for level in plan.levels] == [2, 4 + 4, 4]
    for depth, level in enumerate(plan.levels):
        for key in level:
            node = plan.nodes[key]
            assert node.depth == depth
            if node.parent is not None:
                assert node.parent in plan.levels[depth - 1]
    local = next(n for n in plan.nodes.values() if n.stage == "local")
    assert local.init_parts == ("encoder",)
    finetune = next(
        n for n in plan.nodes.values() if n.stage == "finetune" and n.parent == local.key
    )
    assert finetune.init_parts == ("encoder", "decoder")


def keys_by_trial(plan: Plan) -> dict[str, dict[str, str]]:
    return {t.trial_id: dict(t.nodes) for t in plan.trials}


def test_upstream_change_propagates_to_children_only(tmp_path: Path) -> None:
    base = build_plan(spec_of(tmp_path, BASE))
    warmer = build_plan(
        spec_of(tmp_path, BASE.replace("temperature: 0.5", "temperature: 0.7"), "b.yaml")
    )
    lr = build_plan(spec_of(tmp_path, BASE.replace("lr: 0.0005", "lr: 0.001"), "c.yaml"))
    for trial in base.trials:
        old = trial.nodes
        changed_global = keys_by_trial(warmer)[trial.trial_id]
        assert all(changed_global[stage] != old[stage] for stage in old)  # every descendant
        changed_lr = keys_by_trial(lr)[trial.trial_id]
        assert changed_lr["global"] == old["global"]
        assert changed_lr.get("local") == old.get("local")
        assert changed_lr["finetune"] != old["finetune"]


def test_split_repeats_do_not_change_keys(tmp_path: Path) -> None:
    base = build_plan(spec_of(tmp_path, BASE + "split_index: 0\n"))
    more = build_plan(spec_of(tmp_path, BASE + "split_index: 0\nsplit: {repeats: 4}\n", "b.yaml"))
    assert keys_by_trial(base) == keys_by_trial(more)
    other = build_plan(spec_of(tmp_path, BASE + "split_index: 1\nsplit: {repeats: 4}\n", "c.yaml"))
    assert keys_by_trial(other)["t0000"]["global"] != keys_by_trial(base)["t0000"]["global"]


def test_keys_stable_across_processes(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, BASE)
    here = keys_by_trial(build_plan(spec))
    code = (
        "import json, sys\n"
        "from orchestrator.spec import load_spec\n"
        "from orchestrator.plan import build_plan\n"
        "plan = build_plan(load_spec(sys.argv[1], overrides={'storage': sys.argv[2]}))\n"
        "print(json.dumps({t.trial_id: t.nodes for t in plan.trials}))\n"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code, spec.path, str(tmp_path / "elsewhere")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    # another process, hash seed and storage folder: the same keys
    assert json.loads(out.stdout) == here


def test_summary_counts_completed_nodes(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, BASE))
    store = StageStore(tmp_path / "storage")
    key = plan.levels[0][0]
    store.write_result(key, {"w": torch.zeros(1)}, {"loss": 1.0})
    summary = plan.summary(store.is_complete)
    assert summary["stages"]["global"] == {"nodes": 2, "to_run": 1}
    assert summary["stages"]["finetune"] == {"nodes": 8, "to_run": 8}


def test_plan_round_trip(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, BASE))
    data = json.loads(json.dumps(plan.to_dict()))
    again = Plan.from_dict(plan.spec, data)
    assert again.trials == plan.trials
    assert again.nodes == plan.nodes
    assert again.levels == plan.levels


def test_msd_fingerprint_needs_readable_data(tmp_path: Path) -> None:
    from trainers.data import DatasetError

    data = tmp_path / "empty"
    data.mkdir()
    text = BASE.replace(
        "dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}",
        f"dataset: {{kind: msd, root: {data}, image_size: 32}}",
    )
    with pytest.raises(DatasetError):
        build_plan(spec_of(tmp_path, text))


def test_settings_a_stage_does_not_read_do_not_split_nodes(tmp_path: Path) -> None:
    # block strategy never reads stride; fine-tuning without a regulariser never reads mixup_alpha
    text = (
        BASE + "grid:\n  stages.local.stride: [2, 4]\n  stages.finetune.mixup_alpha: [0.5, 1.0]\n"
    )
    plan = build_plan(spec_of(tmp_path, text))
    assert len(plan.trials) == 8 * 4
    assert stage_counts(plan) == {"global": 2, "local": 4, "finetune": 8}
    stride = BASE.replace("method: [global, global+local_block]", "method: global+local_stride")
    strided = build_plan(
        spec_of(tmp_path, stride + "grid:\n  stages.local.stride: [2, 4]\n", "b.yaml")
    )
    assert stage_counts(strided)["local"] == 2 * 2 * 2  # now stride matters


def test_world_size_and_device_change_keys_but_cpus_do_not(tmp_path: Path) -> None:
    """batch_size is per DDP rank and CUDA runs bf16: both change a stage's result, so a
    relaunch with other workers or GPUs must not reuse nodes computed the other way."""
    base = keys_by_trial(build_plan(spec_of(tmp_path, BASE)))
    more_cpus = BASE + "resources: {cpus_per_worker: 2}\n"
    assert keys_by_trial(build_plan(spec_of(tmp_path, more_cpus, "cpus.yaml"))) == base
    for name, resources in [("ddp", "{workers_per_trial: 2}"), ("gpu", "{gpus_per_worker: 0.25}")]:
        other = keys_by_trial(
            build_plan(spec_of(tmp_path, BASE + f"resources: {resources}\n", f"{name}.yaml"))
        )
        assert all(other[t][s] != base[t][s] for t in base for s in base[t]), name


def test_validation_frequency_does_not_split_nodes(tmp_path: Path) -> None:
    sparse = BASE.replace("finetune: {lr: 0.0005}", "finetune: {lr: 0.0005, val_every: 5}")
    assert sparse != BASE
    base = keys_by_trial(build_plan(spec_of(tmp_path, BASE)))
    assert keys_by_trial(build_plan(spec_of(tmp_path, sparse, "sparse.yaml"))) == base


def test_budget_kind_and_flip_axes_enter_keys_only_when_they_change_the_run(
    tmp_path: Path,
) -> None:
    """A step budget is a different computation from an epoch budget (new keys); validation
    cadence in steps is not; flips bound from the dataset give the same key as the same flips
    written in the stage."""
    base = keys_by_trial(build_plan(spec_of(tmp_path, BASE)))
    steps = BASE.replace("finetune: {lr: 0.0005}", "finetune: {lr: 0.0005, steps: 40}")
    stepped = keys_by_trial(build_plan(spec_of(tmp_path, steps, "steps.yaml")))
    assert all(stepped[t]["finetune"] != base[t]["finetune"] for t in base)
    assert all(stepped[t]["global"] == base[t]["global"] for t in base)
    cadence = steps.replace("steps: 40}", "steps: 40, val_every_steps: 10}")
    assert keys_by_trial(build_plan(spec_of(tmp_path, cadence, "cadence.yaml"))) == stepped
    # lr_schedule "constant" is what ran before the setting existed: same keys; a decay is new
    constant = steps.replace("steps: 40}", "steps: 40, lr_schedule: constant}")
    assert keys_by_trial(build_plan(spec_of(tmp_path, constant, "constant.yaml"))) == stepped
    assert (
        spec_of(tmp_path, constant, "constant.yaml").spec_hash
        == spec_of(tmp_path, steps, "steps.yaml").spec_hash
    )
    poly = steps.replace("steps: 40}", "steps: 40, lr_schedule: poly}")
    decayed = keys_by_trial(build_plan(spec_of(tmp_path, poly, "poly.yaml")))
    assert all(decayed[t]["finetune"] != stepped[t]["finetune"] for t in base)
    assert all(decayed[t]["global"] == stepped[t]["global"] for t in base)
    # the synthetic dataset's default flip axes are (0,): writing them in the stage changes nothing
    written = BASE.replace(
        "finetune: {lr: 0.0005}", "finetune: {lr: 0.0005, augment: {flip_axes: [0]}}"
    )
    assert keys_by_trial(build_plan(spec_of(tmp_path, written, "written.yaml"))) == base
    both = BASE.replace(
        "finetune: {lr: 0.0005}", "finetune: {lr: 0.0005, augment: {flip_axes: [0, 1]}}"
    )
    flipped = keys_by_trial(build_plan(spec_of(tmp_path, both, "both.yaml")))
    assert all(flipped[t]["finetune"] != base[t]["finetune"] for t in base)
