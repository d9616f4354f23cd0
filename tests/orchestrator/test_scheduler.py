"""DagScheduler: the order in which a sweep starts its nodes (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.execute import grid_order
from orchestrator.plan import build_plan
from orchestrator.scheduler import DagScheduler
from tests.orchestrator.specs import spec_of

# g1 -> l1 -> f1, g1 -> l2 -> f2 (a shared global), r (random init: no parent), g2 -> f3
PARENTS = {
    "r": None,
    "g2": None,
    "g1": None,
    "l1": "g1",
    "l2": "g1",
    "f1": "l1",
    "f2": "l2",
    "f3": "g2",
}
STAGES = {
    "r": "finetune",
    "g1": "global",
    "g2": "global",
    "l1": "local",
    "l2": "local",
    "f1": "finetune",
    "f2": "finetune",
    "f3": "finetune",
}


def _run(scheduler: DagScheduler, slots: int, fail: frozenset[str] = frozenset()) -> list[str]:
    """Simulate ``slots`` workers finishing nodes first-in first-out; returns the start order."""
    started: list[str] = []
    running: list[str] = []
    while True:
        while len(running) < slots:
            key = scheduler.next()
            if key is None or key == DagScheduler.DONE:
                break
            started.append(key)
            running.append(key)
        if not running:
            assert scheduler.next() == DagScheduler.DONE
            return started
        key = running.pop(0)
        scheduler.finished(key, key not in fail, f"{key} broke")


def test_most_descendants_first_and_children_start_without_a_level_barrier() -> None:
    scheduler = DagScheduler(PARENTS, STAGES)
    order = _run(scheduler, slots=2)
    # g1 (4 descendants) then g2 (1) before r (0); l1 starts when g1 ends, while r has not started
    assert order[:3] == ["g1", "g2", "l1"]
    assert order.index("l2") < order.index("r")  # depth-1 nodes before a depth-0 leaf: no barrier
    assert sorted(order) == sorted(PARENTS)
    assert scheduler.completed and not scheduler.failed and not scheduler.skipped


def test_nothing_ready_waits_instead_of_finishing() -> None:
    scheduler = DagScheduler({"g": None, "f": "g"}, {"g": "global", "f": "finetune"})
    assert scheduler.next() == "g"
    assert scheduler.next() is None  # f waits for g; the sweep is not over
    scheduler.finished("g", True)
    assert scheduler.next() == "f"
    assert scheduler.next() == DagScheduler.DONE  # nothing left to start (f still running)


def test_a_failed_node_skips_its_descendants_with_the_reason() -> None:
    scheduler = DagScheduler(PARENTS, STAGES)
    order = _run(scheduler, slots=1, fail=frozenset({"g1"}))
    assert set(order) == {"g1", "g2", "f3", "r"}
    assert scheduler.failed == {"g1": "g1 broke"}
    assert set(scheduler.skipped) == {"l1", "l2", "f1", "f2"}
    assert scheduler.skipped["l1"] == "parent g1 (global) did not complete: g1 broke"
    assert scheduler.skipped["f1"] == "parent l1 (local) did not complete: g1 broke"


def test_rejects_a_parent_outside_the_nodes_and_an_unknown_finish() -> None:
    with pytest.raises(ValueError, match="parent g is not among"):
        DagScheduler({"f": "g"}, {"f": "finetune"})
    scheduler = DagScheduler({"g": None}, {"g": "global"})
    with pytest.raises(ValueError, match="not running"):
        scheduler.finished("g", True)


def test_ready_fine_tunings_start_in_grid_order_not_by_depth(tmp_path: Path) -> None:
    """With the pretraining complete, the spec's first method's fine-tunings start before a
    later method's parentless ones: a sweep stopped part-way holds whole methods."""
    text = (
        "name: order\n"
        "dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}\n"
        "model: {base_channels: 4, depth: 2}\n"
        "method: [global, random]\n"
        "label_fraction: [0.25, 0.5]\n"
    )
    plan = build_plan(spec_of(tmp_path, text, storage="s"))
    order = grid_order(plan)
    pretrained = {trial.nodes["global"] for trial in plan.trials if "global" in trial.nodes}
    parents = {key: None for key in order if key not in pretrained}  # the global node is done
    scheduler = DagScheduler(parents, {key: plan.nodes[key].stage for key in parents})
    started = [scheduler.next() for _ in parents]
    methods = [next(t.method for t in plan.trials if t.nodes["finetune"] == k) for k in started]
    assert methods == ["global", "global", "random", "random"]
    assert [plan.nodes[key].depth for key in started] == [1, 1, 0, 0]


def test_next_bundle_takes_ready_nodes_of_one_kind_siblings_first() -> None:
    parents = {"g": None, "a": "g", "b": "g", "c": None, "l": "g", "d": "g"}
    stages = {"g": "global", "a": "finetune", "b": "finetune", "c": "finetune", "l": "local"}
    stages["d"] = "finetune"
    scheduler = DagScheduler(parents, stages)
    assert scheduler.next_bundle(4) == ["g"]  # the only global node; c waits for a finetune bundle
    assert scheduler.next_bundle(4) == ["c"]  # nothing else of its kind is ready yet
    assert scheduler.next_bundle(4) is None
    scheduler.finished("g", ok=True)
    bundle = scheduler.next_bundle(2)
    assert bundle[0] in ("a", "b", "d", "l") and len(bundle) <= 2
    assert all(stages[key] == stages[bundle[0]] for key in bundle)
    rest = scheduler.next_bundle(4)
    assert rest is not None and {*bundle, *rest} <= {"a", "b", "d", "l"}
    for key in [*bundle, *rest]:
        scheduler.finished(key, ok=key != "a")
    while (more := scheduler.next_bundle(4)) not in (None, DagScheduler.DONE):
        for key in more:
            scheduler.finished(key, ok=True)
    scheduler.finished("c", ok=True)
    assert scheduler.next_bundle(4) == DagScheduler.DONE
    assert set(scheduler.completed) == {"g", "b", "c", "d", "l"} and set(scheduler.failed) == {"a"}
