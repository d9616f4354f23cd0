"""W&B tracking through Ray's ``WandbLoggerCallback``, without the wandb package: the check
before Ray starts, and the callback's settings with a stand-in ``wandb`` module (no Ray
instance: the callback's W&B actor is never started)."""

from __future__ import annotations

import importlib.util
import os
import types
from pathlib import Path
from typing import Any

import pytest

from orchestrator.execute import node_title
from orchestrator.plan import build_plan
from orchestrator.spec import Spec, SpecError
from orchestrator.tracking import check_tracking, logger_callbacks
from tests.orchestrator.specs import spec_of

SPEC = """
name: tracked
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: random
label_fraction: [0.25, 0.5]
"""


def spec_with(tmp_path: Path, tracking: str) -> Spec:
    return spec_of(tmp_path, SPEC + f"tracking: {tracking}\n", "tracked.yaml", storage="s")


def test_wandb_missing_is_one_line_naming_the_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(SpecError) as err:
        check_tracking(spec_with(tmp_path, "{wandb: {project: semicon}}"))
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'tracked.yaml'}: tracking.wandb: ")
    assert "'wandb' package is not installed" in message
    assert "pip install 'semicon-sweep[wandb]'" in message and "\n" not in message
    check_tracking(spec_with(tmp_path, "{wandb: null}"))  # off: nothing to check


@pytest.fixture
def fake_wandb(monkeypatch: pytest.MonkeyPatch) -> types.ModuleType:
    """A stand-in for the wandb module where Ray's integration looks for it (Ray's callback
    refuses to be built when its ``import wandb`` failed)."""
    import ray.air.integrations.wandb as integration

    module = types.ModuleType("wandb")
    monkeypatch.setattr(integration, "wandb", module)
    for name in ("Image", "Video", "WBValue"):  # wandb's data types, which it imported too
        monkeypatch.setattr(integration, name, type(name, (), {}), raising=False)
    for name in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT_NAME", "WANDB_GROUP_NAME"):
        monkeypatch.delenv(name, raising=False)
    return module


class FakeTrial:
    """What ``WandbLoggerCallback.log_trial_start`` reads of a Tune trial."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config, self.trial_id = config, "abc_00001"
        self.experiment_dir_name = "sweep-1234abcd"
        self.local_path = "/nowhere"

    def __str__(self) -> str:  # Tune: the trial_name_creator's name
        return node_title(self)


def test_wandb_callback_names_runs_and_logs_the_grid_point(
    tmp_path: Path, fake_wandb: types.ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ray.air.integrations.wandb import WandbLoggerCallback

    spec = spec_with(tmp_path, "{wandb: {project: semicon, entity: lab, mode: offline}}")
    callback = logger_callbacks(spec)[-1]
    assert isinstance(callback, WandbLoggerCallback)
    assert callback.project == "semicon" and callback.group == "tracked"  # group: the sweep
    assert callback.kwargs == {
        "entity": "lab",
        "mode": "offline",
        "tags": ["tracked", f"spec-{spec.spec_hash[:12]}"],
    }
    # offline needs no API key: the spec's mode reaches Ray's key check, and only it
    callback.setup()
    assert "WANDB_MODE" not in os.environ
    started: dict[str, Any] = {}
    monkeypatch.setattr(
        callback, "_start_logging_actor", lambda trial, exclude, **init: started.update(init)
    )
    plan = build_plan(spec)
    key = next(k for k, node in plan.nodes.items() if node.label_fraction == 0.5)
    config = {"node_key": key, **plan.node_point(key)}  # what the DAG searcher suggests
    callback.log_trial_start(FakeTrial(config))
    assert started["name"] == f"finetune {key[:8]} (method=random, label_fraction=0.5, trials=1)"
    assert started["config"] == config
    assert started["project"] == "semicon" and started["group"] == "tracked"
    assert started["entity"] == "lab" and started["mode"] == "offline"


def test_wandb_defaults_to_the_sweep_name(tmp_path: Path, fake_wandb: types.ModuleType) -> None:
    callback = logger_callbacks(spec_with(tmp_path, "{wandb: {}}"))[-1]
    assert callback.project == "tracked" and callback.group == "tracked"
    assert set(callback.kwargs) == {"tags"}  # entity and mode: W&B's own defaults
    with pytest.raises(ValueError, match="No WandB API key found"):
        callback.setup()  # online without a key: Ray's own error, when Tune sets it up
