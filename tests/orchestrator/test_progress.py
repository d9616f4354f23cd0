"""The progress callback's lines, driven by hand (no Ray instance: Tune's Callback class only)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from types import SimpleNamespace

import torch

from orchestrator.plan import build_plan
from orchestrator.progress import clock, progress_callback
from orchestrator.spec import load_spec
from orchestrator.store import StageStore


def test_a_line_per_node_start_and_end(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: progress-test
            dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
            model: {base_channels: 4, depth: 2}
            method: global
            label_fraction: [0.25, 0.5]
            stages: {finetune: {epochs: 3}}
            """
        )
    )
    plan = build_plan(load_spec(path, overrides={"storage": str(tmp_path / "s")}))
    store = StageStore(tmp_path / "s")
    lines: list[str] = []
    callback = progress_callback(plan, store, lines.append, sweep_start=0.0)
    shared = plan.levels[0][0]
    failed = plan.levels[1][0]
    trial = SimpleNamespace(config={"node_key": shared})
    callback.on_trial_start(0, [], trial)
    callback.on_trial_result(0, [], trial, {"loss": 0.5, "epoch": 1})
    store.write_result(shared, {"w": torch.zeros(1)}, {"loss": 0.5})
    callback.on_trial_complete(0, [], trial)
    store.write_error(failed, "RuntimeError: boom")
    callback.on_trial_complete(0, [], SimpleNamespace(config={"node_key": failed}))
    # the shared global node: what its trials have in common, and how many they are
    assert lines[0].endswith(f"0/3 done | global {shared[:8]} global (2 trials) | start")
    assert "1/3 done" in lines[1] and "done in" in lines[1]
    assert "epoch 1/100 loss 0.5000" in lines[1] and "left" in lines[1]  # an estimate
    assert "FAILED" in lines[2] and "finetune" in lines[2] and "RuntimeError: boom" in lines[2]
    failed_trial = next(t for t in plan.trials if failed in t.nodes.values())
    assert f"global label_fraction={failed_trial.label_fraction}" in lines[2]
    assert "1/3 done" in lines[2]
    assert clock(3725) == "1:02:05"


def test_trackers_see_the_grid_point_not_a_hash(tmp_path: Path) -> None:
    """The searcher's trial config (what MLflow / TensorBoard log as parameters) and the trial
    name carry the node's grid point; the trainable still reads only the node key."""
    from orchestrator.execute import _dag_searcher, node_folder, node_title
    from orchestrator.scheduler import DagScheduler

    path = tmp_path / "spec.yaml"
    path.write_text(
        textwrap.dedent(
            """
            name: tracking-names
            dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
            model: {base_channels: 4, depth: 2}
            method: [global, random]
            label_fraction: [0.25, 0.5]
            """
        )
    )
    plan = build_plan(load_spec(path, overrides={"storage": str(tmp_path / "s")}))
    store = StageStore(tmp_path / "s")
    shared = next(key for key, node in plan.nodes.items() if node.stage == "global")
    assert plan.node_point(shared) == {"stage": "global", "method": "global", "trials": 2}
    random_half = next(t for t in plan.trials if t.method == "random" and t.label_fraction == 0.5)
    key = random_half.nodes["finetune"]
    assert plan.node_point(key) == {
        "stage": "finetune",
        "method": "random",
        "label_fraction": 0.5,
        "trials": 1,
    }
    scheduler = DagScheduler({key: None}, {key: "finetune"})
    config = _dag_searcher(plan, scheduler, store).suggest("trial-1")
    assert config == {"node_key": key, **plan.node_point(key)}
    trial = SimpleNamespace(config=config)
    assert node_folder(trial) == key
    assert node_title(trial) == (
        f"finetune {key[:8]} (method=random, label_fraction=0.5, trials=1)"
    )
