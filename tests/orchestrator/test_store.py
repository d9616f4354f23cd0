"""The stage store: layout, atomic writes, completion order, epochs, sweep ownership."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest
import torch

from orchestrator.plan import StageNode, build_plan
from orchestrator.spec import Spec, load_spec
from orchestrator.store import StageStore, StorageConflict, atomic_write, atomic_write_json

SPEC = """
name: store-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: global
label_fraction: [0.2, 0.5]
"""


def spec_of(tmp_path: Path, text: str = SPEC, name: str = "spec.yaml") -> Spec:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return load_spec(path, overrides={"storage": str(tmp_path / "storage")})


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_layout(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    assert store.node_dir("abc") == tmp_path / "stages" / "abc"
    assert store.model_path("abc") == tmp_path / "stages" / "abc" / "model.pt"
    assert (store.cache_dir, store.ray_dir, store.tables_dir) == (
        tmp_path / "cache",
        tmp_path / "ray",
        tmp_path / "tables",
    )
    for bad in ("", "../x", "a/b", ".."):
        with pytest.raises(ValueError, match="node key"):
            store.node_dir(bad)


def test_atomic_write_replaces_whole_file_and_cleans_up_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "data.json"
    atomic_write_json(target, {"a": 1})
    assert json.loads(target.read_text()) == {"a": 1}

    def crash(handle: object) -> None:
        handle.write(b'{"a": 2, "half')  # type: ignore[attr-defined]
        raise RuntimeError("disk died")

    with pytest.raises(RuntimeError, match="disk died"):
        atomic_write(target, crash)
    assert json.loads(target.read_text()) == {"a": 1}  # old content intact
    assert leftovers(tmp_path) == []


def test_result_then_complete(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    key = "k1"
    assert not store.is_complete(key)
    store.write_error(key, "first try failed\n")
    assert store.read_error(key) == "first try failed"
    state = {"encoder.w": torch.arange(6.0).reshape(2, 3), "seg.b": torch.ones(2)}
    store.write_result(key, state, {"test_dice_pooled_mean": 0.8})
    assert store.is_complete(key)
    assert store.read_error(key) is None  # removed on success
    assert store.read_metrics(key) == {"test_dice_pooled_mean": 0.8}
    loaded = store.load_state(key)
    assert set(loaded) == set(state)
    assert torch.equal(loaded["encoder.w"], state["encoder.w"])
    assert leftovers(tmp_path) == []
    # COMPLETE is the newest file: it was written last
    folder = store.node_dir(key)
    complete = (folder / "COMPLETE").stat().st_mtime_ns
    assert (
        complete
        >= (folder / "metrics.json").stat().st_mtime_ns
        >= (folder / "model.pt").stat().st_mtime_ns
    )


def test_failed_result_write_leaves_node_incomplete(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    with pytest.raises(TypeError):  # metrics that JSON cannot hold: a tuple key
        store.write_result("k", {"w": torch.zeros(1)}, {("a", "b"): 1.0})  # type: ignore[dict-item]
    assert store.model_path("k").is_file()
    assert not store.is_complete("k")
    assert leftovers(tmp_path) == []


def test_missing_results(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    assert store.read_metrics("nope") is None
    assert store.read_error("nope") is None
    assert store.read_epochs("nope") == []
    assert store.read_node("nope") is None
    assert store.read_sweep() is None
    with pytest.raises(FileNotFoundError, match="no stored model"):
        store.load_state("nope")


def test_epochs_append_and_skip_torn_line(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    store.append_epoch("k", {"epoch": 0, "loss": 1.5, "seconds": 0.1})
    store.append_epoch("k", {"epoch": 1, "loss": torch.tensor(1.25), "seconds": 0.1})
    with open(store.node_dir("k") / "epochs.jsonl", "a") as handle:
        handle.write('{"epoch": 2, "lo')  # a crash mid-line
    epochs = store.read_epochs("k")
    assert [e["epoch"] for e in epochs] == [0, 1]
    assert epochs[1]["loss"] == 1.25


def test_write_node(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path))
    store = StageStore(tmp_path / "storage")
    node = plan.nodes[plan.levels[0][0]]
    store.write_node(node)
    assert StageNode.from_dict(store.read_node(node.key)) == node


def test_claim_sweep_conflict_and_force(tmp_path: Path) -> None:
    spec = spec_of(tmp_path)
    store = StageStore(spec.storage)
    plan = build_plan(spec)
    store.claim_sweep(spec, plan=plan)
    record = store.read_sweep()
    assert record["name"] == "store-test" and record["spec_hash"] == spec.spec_hash
    assert record["spec"]["name"] == "store-test"
    assert len(record["plan"]["trials"]) == 2
    assert set(record["environment"]) == {
        "torch_version",
        "ray_version",
        "numpy_version",
        "git_commit",
    }

    store.claim_sweep(spec)  # the same spec again (e.g. other resources): fine
    store.write_result("kept", {"w": torch.zeros(1)}, {})

    other = spec_of(tmp_path, SPEC.replace("method: global", "method: random"), "other.yaml")
    before = store.sweep_path.read_bytes()
    with pytest.raises(StorageConflict) as info:
        store.claim_sweep(other)
    message = str(info.value)
    assert str(store.root) in message and "store-test" in message and "--force" in message
    assert spec.spec_hash[:12] in message
    assert store.sweep_path.read_bytes() == before  # nothing written

    store.claim_sweep(other, force=True)
    assert store.read_sweep()["spec_hash"] == other.spec_hash
    assert store.is_complete("kept")  # the stage store survives a forced launch


def test_corrupt_sweep_json_is_a_conflict(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    store.sweep_path.write_text("{not json")
    with pytest.raises(StorageConflict, match="sweep.json"):
        store.read_sweep()
