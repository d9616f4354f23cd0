"""``resources.fuse_finetunes``: a bundle's fine-tunings trained fused in one worker
(``orchestrator.worker.train_bundle`` -> ``trainers.fused``), each written as an ordinary node.

Fast: the option's validation and its absence from node keys; a bundle in Train's local mode
(no cluster) fused against the same bundle unfused. Ray (``ray`` + ``slow``): a launch with
fused bundles gives the trials table of an unfused launch, to float tolerance.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from orchestrator.plan import build_plan
from orchestrator.spec import Resources, load_spec
from orchestrator.store import StageStore
from tests.orchestrator.test_execute import launch, write_spec
from trainers.config import ConfigError

# the in-process bundles compare fused and plain runs on one torch thread
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# steps, not epochs: the label fractions then have equal step budgets, which fusing needs
FINETUNE = {"steps": 6, "batch_size": 4, "lr": 1e-3}
FRACTIONS = [0.25, 0.5, 1.0]
TIMING = ("seconds", "wall_s", "gpu_s", "_at", "slices_per_s", "report_s", "time")


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


def test_fuse_finetunes_is_checked_and_stays_out_of_node_keys(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="resources.fuse_finetunes: must be true or false"):
        Resources(nodes_per_run=2, fuse_finetunes="yes")
    with pytest.raises(ConfigError, match="resources.fuse_finetunes: .*nodes_per_run >= 2"):
        Resources(fuse_finetunes=True)
    with pytest.raises(ConfigError, match="resources.fuse_finetunes: .*workers_per_trial 1"):
        Resources(nodes_per_run=4, workers_per_trial=2, fuse_finetunes=True)
    plans = [
        build_plan(
            load_spec(
                write_spec(
                    _mkdir(tmp_path / f"fuse-{fuse}"),
                    "keys",
                    method="random",
                    label_fraction=FRACTIONS,
                    stages={"finetune": FINETUNE},
                    resources={"nodes_per_run": 3, "fuse_finetunes": fuse},
                ),
                overrides={"storage": str(tmp_path / "s")},
            )
        )
        for fuse in (False, True)
    ]
    assert list(plans[0].nodes) == list(plans[1].nodes)
    assert plans[0].spec.spec_hash == plans[1].spec.spec_hash


def _bundle(
    tmp_path: Path, name: str, fuse: bool, finetune: dict[str, Any] = FINETUNE
) -> tuple[StageStore, list[str]]:
    """The three fine-tunings of FRACTIONS as one bundle in Train's local mode."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from orchestrator.progress import BUNDLE_KEY
    from orchestrator.worker import FUSE_KEY, NodeJob, train_node
    from trainers.config import DataConfig, from_dict
    from trainers.data import prepare_slices

    spec = load_spec(
        write_spec(
            tmp_path,
            name,
            method="random",
            label_fraction=FRACTIONS,
            stages={"finetune": finetune},
        ),
        overrides={"storage": str(tmp_path / name)},
    )
    plan = build_plan(spec)
    store = StageStore(spec.storage)
    keys = [trial.nodes["finetune"] for trial in plan.trials]
    data = prepare_slices(
        from_dict(DataConfig, plan.nodes[keys[0]].data, "dataset"), store.cache_dir
    )
    jobs = [
        NodeJob(
            node=plan.nodes[key],
            storage=str(store.root),
            cache=str(store.cache_dir / data.fingerprint),
        ).to_dict()
        for key in keys
    ]
    for key in keys:
        store.write_node(plan.nodes[key])
    TorchTrainer(
        train_node,
        train_loop_config={BUNDLE_KEY: jobs, "max_failures": 0, FUSE_KEY: fuse},
        scaling_config=ray.train.ScalingConfig(num_workers=0),
        run_config=ray.train.RunConfig(name=name, storage_path=str(tmp_path / "train")),
    ).fit()
    return store, keys


def _untimed(record: dict[str, Any]) -> dict[str, Any]:
    return {
        k: v
        for k, v in record.items()
        if not any(part in k for part in TIMING) and k not in ("timing", "fused", "train_seconds")
    }


def test_fused_bundle_writes_ordinary_nodes_equal_to_the_unfused_bundle(tmp_path: Path) -> None:
    plain, keys = _bundle(tmp_path, "plain", fuse=False)
    fused, fused_keys = _bundle(tmp_path, "fused", fuse=True)
    assert keys == fused_keys
    for key in keys:
        assert fused.is_complete(key) and fused.read_error(key) is None
        metrics = fused.read_metrics(key)
        assert metrics["fused"] == 3 and metrics["wall_s"] > 0 and "timing" in metrics
        expected = plain.read_metrics(key)
        assert "fused" not in expected
        for name, value in _untimed(expected).items():
            assert metrics[name] == pytest.approx(value, rel=1e-4, abs=1e-4, nan_ok=True), name
        records = fused.read_epochs(key)
        assert [r["epoch"] for r in records] == [r["epoch"] for r in plain.read_epochs(key)]
        assert all(r["fused"] == 3 for r in records)
        for got, want in zip(records, plain.read_epochs(key), strict=True):
            assert got["loss"] == pytest.approx(want["loss"], rel=1e-4, abs=1e-5)
        state, want_state = fused.load_state(key), plain.load_state(key)
        for name, tensor in want_state.items():
            torch.testing.assert_close(state[name], tensor, rtol=1e-3, atol=1e-4)
        assert not (fused.node_dir(key) / "resume.pt").exists()


def test_a_failing_fused_member_reruns_alone_and_the_others_complete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Member 1's loss turns non-finite in the fused run (a poisoned loss there only): members
    0 and 2 complete fused; member 1 reruns in the bundle's ordinary loop, where it completes
    unfused with the unfused bundle's result."""
    import trainers.fused as fused_module

    original = fused_module.targets_loss
    calls = {"n": 0}

    def poisoned(logits: torch.Tensor, targets: Any, dice_weight: float) -> torch.Tensor:
        calls["n"] += 1
        loss = original(logits, targets, dice_weight)
        return loss * float("nan") if calls["n"] % 3 == 2 else loss

    monkeypatch.setattr(fused_module, "targets_loss", poisoned)
    store, keys = _bundle(tmp_path, "poisoned", fuse=True)
    plain, _ = _bundle(tmp_path, "plain", fuse=False)
    assert calls["n"] > 0 and all(store.is_complete(key) for key in keys)
    assert [store.read_metrics(key).get("fused") for key in keys] == [3, None, 3]
    alone, expected = store.read_metrics(keys[1]), plain.read_metrics(keys[1])
    for name, value in _untimed(expected).items():
        assert alone[name] == pytest.approx(value, rel=1e-4, abs=1e-4, nan_ok=True), name
    records = store.read_epochs(keys[1])
    assert [r["epoch"] for r in records] == [r["epoch"] for r in plain.read_epochs(keys[1])]
    assert all("fused" not in r for r in records)


@pytest.mark.ray
@pytest.mark.slow
def test_launch_with_fused_finetunes_gives_the_unfused_trials_table(
    ray_cluster: str, tmp_path: Path
) -> None:
    tables = {}
    for fuse in (False, True):
        spec_path = write_spec(  # one sweep name: the tables' "sweep" column
            _mkdir(tmp_path / f"fuse-{fuse}"),
            "fused-e2e",
            method="random",
            label_fraction=FRACTIONS,
            stages={"finetune": FINETUNE},
            resources={"nodes_per_run": 4, "max_concurrent_trials": 1, "fuse_finetunes": fuse},
        )
        storage = tmp_path / f"storage-{fuse}"
        result = launch([str(spec_path), "--storage", str(storage)])
        assert result.exit_code == 0, result.output
        tables[fuse] = pd.read_parquet(storage / "tables" / "trials.parquet")
        metrics = [StageStore(storage).read_metrics(key) for key in tables[fuse]["key_finetune"]]
        assert all(("fused" in m) == fuse for m in metrics)
    plain, fused = tables[False], tables[True]
    assert list(plain.columns) == list(fused.columns) and len(plain) == len(FRACTIONS)
    assert (fused["status"] == "ok").all()
    for column in plain.columns:
        if any(part in column for part in TIMING) or column.endswith("_s"):
            continue
        if pd.api.types.is_float_dtype(plain[column]):
            np.testing.assert_allclose(fused[column], plain[column], rtol=1e-4, atol=1e-4)
        else:
            assert list(fused[column]) == list(plain[column]), column


def test_unfusable_fine_tunings_run_one_after_another(tmp_path: Path) -> None:
    """An epoch budget over different labelled counts gives different step budgets: fusing is
    refused and the bundle runs its nodes one by one, as without the option."""
    store, keys = _bundle(tmp_path, "epochs", fuse=True, finetune={"epochs": 1, "batch_size": 4})
    assert all(store.is_complete(key) for key in keys)
    assert all("fused" not in store.read_metrics(key) for key in keys)
