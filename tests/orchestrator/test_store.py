"""The stage store: layout, atomic writes, completion order, epochs, sweep ownership."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from orchestrator.plan import StageNode, build_plan
from orchestrator.store import (
    StageStore,
    StorageConflict,
    StorageError,
    StoredFileError,
    atomic_write,
    atomic_write_json,
    check_storage,
    invalid_nodes,
    invalidate_nodes,
    sha256_of,
)
from tests.orchestrator.specs import spec_of

SPEC = """
name: store-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: global
label_fraction: [0.2, 0.5]
"""


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


def test_a_failure_keeps_its_traceback_until_the_node_succeeds(tmp_path: Path) -> None:
    store = StageStore(tmp_path)
    store.write_error("k", "RuntimeError: boom", "Traceback (most recent call last):\n  ...\n")
    assert store.read_error("k") == "RuntimeError: boom"
    assert store.traceback_path("k").read_text().startswith("Traceback")
    store.write_error("k", "ValueError: no traceback this time")  # a stale one is not kept
    assert not store.traceback_path("k").exists()
    store.write_error("k", "RuntimeError: boom", "Traceback ...")
    store.write_result("k", {"w": torch.zeros(1)}, {"loss": 0.1})
    assert store.read_error("k") is None and not store.traceback_path("k").exists()


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
    plan = build_plan(spec_of(tmp_path, SPEC))
    store = StageStore(tmp_path / "storage")
    node = plan.nodes[plan.levels[0][0]]
    store.write_node(node)
    assert StageNode.from_dict(store.read_node(node.key)) == node


def test_claim_sweep_conflict_and_force(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, SPEC)
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


# ---- COMPLETE is checked, not trusted ----------------------------------------------------------


def finished_node(tmp_path: Path, key: str = "k") -> tuple[StageStore, Path]:
    store = StageStore(tmp_path)
    store.write_result(key, {"w": torch.arange(100.0)}, {"test_dice_pooled_mean": 0.5})
    return store, store.model_path(key)


def test_complete_records_size_and_sha256_of_its_files(tmp_path: Path) -> None:
    store, model = finished_node(tmp_path)
    record = json.loads((store.node_dir("k") / "COMPLETE").read_text())
    assert set(record["files"]) == {"model.pt", "metrics.json"}
    for name, entry in record["files"].items():
        path = store.node_dir("k") / name
        assert entry == {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    assert store.is_complete("k") and store.completion_problem("k") is None


@pytest.mark.parametrize("damage", ["deleted", "truncated", "metrics deleted"])
def test_damaged_files_make_a_node_incomplete_and_are_named(tmp_path: Path, damage: str) -> None:
    store, model = finished_node(tmp_path)
    if damage == "deleted":
        model.unlink()
    elif damage == "truncated":
        model.write_bytes(model.read_bytes()[:100])
    else:
        (store.node_dir("k") / "metrics.json").unlink()
    assert not store.is_complete("k")
    problem = store.completion_problem("k")
    assert problem is not None and "\n" not in problem
    named = model if damage != "metrics deleted" else store.node_dir("k") / "metrics.json"
    assert problem.startswith(f"{named}: ")
    assert ("missing" if "deleted" in damage else "100 bytes, COMPLETE vouches for") in problem


def test_same_size_damage_needs_the_hash(tmp_path: Path) -> None:
    store, model = finished_node(tmp_path)
    model.write_bytes(b"x" * model.stat().st_size)
    assert store.is_complete("k")  # sizes only: a stat per file
    assert not StageStore(tmp_path, verify_hashes=True).is_complete("k")
    with pytest.raises(StoredFileError) as info:  # loading always checks the hash
        store.load_state("k")
    assert str(info.value).startswith(f"{model}: content differs from COMPLETE's sha256")


def test_legacy_complete_without_a_record_is_still_accepted(tmp_path: Path) -> None:
    store, model = finished_node(tmp_path)
    marker = store.node_dir("k") / "COMPLETE"
    marker.write_text(json.dumps({"completed_at": 1.0}))  # as written before the record existed
    assert store.is_complete("k")
    assert set(store.load_state("k")) == {"w"}
    model.write_bytes(model.read_bytes()[:-40])  # a truncated zip lacks its end record
    assert not store.is_complete("k")
    assert store.completion_problem("k") == f"{model}: not a whole torch archive (truncated?)"
    with pytest.raises(StoredFileError) as info:  # no record to compare: torch.load fails
        store.load_state("k")
    message = str(info.value)
    assert message.startswith(f"{model}: cannot load node k's model (") and "\n" not in message
    model.unlink()
    assert store.completion_problem("k") == f"{model}: missing or empty"


def test_invalid_node_and_its_descendants_rerun(tmp_path: Path) -> None:
    plan = build_plan(spec_of(tmp_path, SPEC))
    store = StageStore(tmp_path / "storage")
    for level in plan.levels:
        for key in level:
            store.write_result(key, {"w": torch.zeros(4)}, {})
    assert invalid_nodes(plan, store) == {}
    [root] = plan.levels[0]
    children = plan.levels[1]
    assert children and all(plan.nodes[key].parent == root for key in children)
    model = store.model_path(root)
    model.write_bytes(model.read_bytes()[:10])

    invalid = invalid_nodes(plan, store)
    assert list(invalid) == [root, *children]  # parents first
    assert invalid[root].startswith(f"{model}: 10 bytes")
    for child in children:  # complete themselves, but trained from the lost model
        assert store.is_complete(child)
        assert invalid[child] == f"{store.node_dir(child) / 'COMPLETE'}: its parent {root} reruns"

    lines: list[str] = []
    assert invalidate_nodes(plan, store, lines.append) == invalid
    assert lines[0] == f"node {root} reruns: {invalid[root]}" and len(lines) == 1 + len(children)
    for key in invalid:
        assert not store.is_complete(key)
        assert (store.node_dir(key) / "COMPLETE.invalid").is_file()  # kept for the record
        assert store.read_metrics(key) == {}  # nothing else touched
    assert invalid_nodes(plan, store) == {}  # a relaunch sees plain incomplete nodes
    store.write_result(root, {"w": torch.zeros(4)}, {})
    assert store.is_complete(root)
    assert not (store.node_dir(root) / "COMPLETE.invalid").exists()


# ---- storage checks -------------------------------------------------------------------------


def test_storage_that_is_a_file_or_under_one_is_refused(tmp_path: Path) -> None:
    file = tmp_path / "results.txt"
    file.write_text("keep me")
    for writable in (True, False):
        with pytest.raises(StorageError, match="is a file"):
            check_storage(file, writable=writable)
        with pytest.raises(StorageError) as info:
            check_storage(file / "sweep", writable=writable)
        assert str(info.value) == f"{file / 'sweep'}: not a folder: it lies under the file {file}"
    assert file.read_text() == "keep me"
    check_storage(tmp_path / "new" / "folder")  # to be made: its nearest folder is writable
    assert not (tmp_path / "new").exists()


def test_unwritable_storage_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # running as root makes chmod ineffective, so os.access is mocked: this folder is read-only
    storage = tmp_path / "storage"
    (storage / "stages").mkdir(parents=True)
    real_access = os.access

    def access(path: object, mode: int) -> bool:
        if Path(str(path)) == storage / "stages" and mode & os.W_OK:
            return False
        return real_access(path, mode)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    with pytest.raises(StorageError) as info:
        check_storage(storage, writable=True)
    assert (
        str(info.value)
        == f"{storage / 'stages'}: storage folder cannot be read and written by this user"
    )
    check_storage(storage, writable=False)  # readers need no write access
