"""The progress callback's lines and the views, driven by hand (no Ray instance: Tune's Callback
class only)."""

from __future__ import annotations

import io
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from rich.console import Console

from orchestrator.plan import Plan, build_plan
from orchestrator.progress import (
    LiveView,
    PlainView,
    ProgressView,
    SweepState,
    as_view,
    clock,
    node_budget,
    node_label,
    progress_callback,
    progress_view,
    use_live_view,
)
from orchestrator.store import StageStore
from tests.orchestrator.specs import spec_of


def test_a_line_per_node_start_and_end(tmp_path: Path) -> None:
    plan = build_plan(
        spec_of(
            tmp_path,
            """
            name: progress-test
            dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
            model: {base_channels: 4, depth: 2}
            method: global
            label_fraction: [0.25, 0.5]
            stages: {finetune: {epochs: 3}}
            """,
            storage="s",
        )
    )
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

    plan = build_plan(
        spec_of(
            tmp_path,
            """
            name: tracking-names
            dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
            model: {base_channels: 4, depth: 2}
            method: [global, random]
            label_fraction: [0.25, 0.5]
            """,
            storage="s",
        )
    )
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


# ---- the views: one state, plain lines or a live table ----------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def small_plan(tmp_path: Path, epochs: int = 3) -> tuple[Plan, StageStore]:
    plan = build_plan(
        spec_of(
            tmp_path,
            f"""
            name: live-view
            dataset: {{kind: synthetic, image_size: 32, synthetic_cases: 8}}
            model: {{base_channels: 4, depth: 2}}
            method: random
            label_fraction: [0.25, 0.5]
            stages: {{finetune: {{epochs: {epochs}}}}}
            """,
            storage="s",
        )
    )
    return plan, StageStore(tmp_path / "s")


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=120), out


def scripted(state: SweepState, view: ProgressView, clock: FakeClock, store: StageStore) -> None:
    """Two fine-tunings at once: the first finishes after 3 epochs of 10 s, the second fails."""
    first, second = list(state.plan.nodes)
    view.event(state.start(first))
    clock.t += 1
    view.event(state.start(second))
    for epoch in (1, 2, 3):
        clock.t += 10
        event = state.result(
            first, {"epoch": epoch, "steps": 4 * epoch, "loss": 1 / epoch, "seconds": 10.0}
        )
        assert event is not None
        view.event(event)
    # the node's last result (node_status, final metrics) is not an epoch
    assert state.result(first, {"node_status": "complete", "loss": 0.3, "steps": 12}) is None
    store.write_result(first, {"w": torch.zeros(1)}, {"loss": 0.3})
    view.event(state.complete(first))
    clock.t += 5
    event = state.result(second, {"epoch": 1, "steps": 4, "loss": 0.9, "seconds": 12.0})
    assert event is not None
    view.event(event)


def test_plain_view_prints_loss_lines_every_30_s_and_the_last_epoch(tmp_path: Path) -> None:
    plan, store = small_plan(tmp_path)
    clock, lines = FakeClock(), []
    state = SweepState(plan, store, sweep_start=clock.t, now=clock)
    view = PlainView(lines.append)
    view.watch(state)
    scripted(state, view, clock, store)
    first, second = list(plan.nodes)
    label = node_label(plan, first)
    assert lines[0] == f"[0:00:00] 0/2 done | finetune {first[:8]} {label} | start"
    assert lines[1].startswith("[0:00:01] 0/2 done") and lines[1].endswith("| start")
    # epochs at +11 s and +21 s are within 30 s of the start; +31 s is not
    assert lines[2] == f"[0:00:31] 0/2 done | finetune {first[:8]} {label} | epoch 3/3 loss 0.3333"
    assert lines[3] == (
        f"[0:00:31] 1/2 done | finetune {first[:8]} {label} | done in 0:00:31, "
        "epoch 3/3 loss 0.3333 | about 0:00:15 left"
    )
    # the second node's epoch at +36 s: 35 s after its start
    second_label = node_label(plan, second)
    assert lines[4:] == [
        f"[0:00:36] 1/2 done | finetune {second[:8]} {second_label} | epoch 1/3 loss 0.9000"
    ]
    clock.t += 10  # 10 s after its last line: no new one
    view.event(state.result(second, {"epoch": 2, "loss": 0.8, "seconds": 12.0}))
    assert len(lines) == 5


def test_live_view_table_header_and_lines_above(tmp_path: Path) -> None:
    plan, store = small_plan(tmp_path)
    clock = FakeClock()
    state = SweepState(plan, store, sweep_start=clock.t, now=clock)
    console, out = terminal()
    view = LiveView(console=console)
    assert "waiting" in render(view)
    view.watch(state)
    with view:
        scripted(state, view, clock, store)
        table, narrow = render(view), render(view, width=80)
    first, second = list(plan.nodes)
    assert view.live is None  # torn down
    # the table: the running node, its grid point, epoch k/N, loss, time per epoch, elapsed, left
    header, columns, *rows = [line.strip() for line in table.splitlines() if line.strip()]
    assert header == "1/2 nodes done, 1 running | elapsed 0:00:36 | about 0:00:15 left"
    assert columns.split() == [
        "stage",
        "node",
        "grid",
        "point",
        "progress",
        "loss",
        "s/epoch",
        "elapsed",
        "left",
    ]
    assert [row.split() for row in rows] == [
        ["finetune", second[:8], "random", "label_fraction=0.5", "epoch", "1/3", "0.9000"]
        + ["12.0", "0:00:35", "0:00:24"]  # 2 epochs left at 12 s
    ]
    # 80 columns: no key column, the grid point folds rather than being cut
    assert second[:8] not in narrow and "label_fraction=0.5" in narrow and "…" not in narrow
    # finished nodes are ordinary lines above the table (kept in the scrollback)
    text = ANSI.sub("", out.getvalue())
    assert f"1/2 done | finetune {first[:8]} random label_fraction=0.25 | done in 0:00:31" in text
    assert "| start" not in text and "| epoch" not in text  # starts and epochs: the table's
    # a failure: counted in the header, printed as a line
    store.write_error(second, "RuntimeError: boom")
    view.event(state.complete(second))
    assert "FAILED after 0:00:35, epoch 1/3 loss 0.9000: RuntimeError: boom" in out.getvalue()
    assert render(view).splitlines()[0].startswith("1/2 nodes done, 1 failed, 0 running")


def render(view: LiveView, width: int = 120) -> str:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=width)
    console.print(view)
    return ANSI.sub("", out.getvalue())


def test_live_view_is_torn_down_on_interrupt(tmp_path: Path) -> None:
    """KeyboardInterrupt (SIGINT, or SIGTERM through session.sigterm_as_interrupt) leaves the
    terminal as it was: the table gone, the cursor back, later lines plain."""
    plan, store = small_plan(tmp_path)
    console, out = terminal()
    view = LiveView(console=console)
    view.watch(SweepState(plan, store, sweep_start=0.0))
    with pytest.raises(KeyboardInterrupt), view:
        view.event(view.state.start(next(iter(plan.nodes))))
        raise KeyboardInterrupt
    assert view.live is None and console._live_stack == []
    console.print("semicon-sweep: interrupted (SIGTERM): relaunch", highlight=False)
    written = out.getvalue()
    assert "\x1b[?25h" in written  # the cursor shown again
    assert written.endswith("semicon-sweep: interrupted (SIGTERM): relaunch\n")


class Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("tty", "plain", "environ", "live"),
    [
        (True, False, {"TERM": "xterm-256color"}, True),
        (False, False, {"TERM": "xterm-256color"}, False),  # a pipe or a file: plain lines
        (True, True, {}, False),  # --plain
        (True, False, {"TERM": "dumb"}, False),
        (True, False, {"SEMICON_SWEEP_PLAIN": "1"}, False),
        (True, False, {"SEMICON_SWEEP_PLAIN": "0"}, True),
        (True, False, {"NO_COLOR": "1"}, True),  # colours off, the table stays
    ],
)
def test_live_view_only_on_a_terminal(
    tty: bool, plain: bool, environ: dict[str, str], live: bool
) -> None:
    stream = Stream(tty)
    assert use_live_view(plain, stream, environ) is live
    view = progress_view(plain, sink=print, stream=stream, environ=environ)
    assert isinstance(view, LiveView if live else PlainView)


def test_view_holds_the_launch_line_until_the_first_line() -> None:
    lines: list[str] = []
    view = as_view(lines.append)
    assert as_view(view) is view
    view.hold("launching")
    assert lines == []
    view("1 node(s) to run")
    assert lines == ["launching", "1 node(s) to run"]


def test_node_budget_from_throttled_results() -> None:
    """Tune may not see every epoch (orchestrator.worker.ReportThrottle): steps per epoch come
    from the last record's epoch, not the number of records."""
    records = [{"epoch": 2, "steps": 20, "seconds": 4.0}, {"epoch": 5, "steps": 50, "seconds": 6.0}]
    budget = node_budget({"steps": 150, "epochs": None}, records)
    assert budget is not None and budget.text == "step 50/150"
    assert budget.per_epoch_s == 5.0 and budget.left_s == 100 * 0.5
    epochs = node_budget({"epochs": 10}, records)
    assert epochs is not None and epochs.text == "epoch 5/10" and epochs.left_s == 25.0
    assert node_budget({"epochs": 10}, []) is None


def test_node_budget_paces_by_the_wall_clock_of_the_current_run() -> None:
    """Short epochs spend most of their time reporting and checkpointing: the wall clock
    between records is the pace, measured over the run since the last resume only."""
    before = [  # an earlier launch, stopped at epoch 3 (checkpoint at 2), hours ago
        {"epoch": e, "steps": 10 * e, "seconds": 0.1, "time": 100.0 + e, "resumed_from": 0}
        for e in (1, 2, 3)
    ]
    resumed = [
        {"epoch": e, "steps": 10 * e, "seconds": 0.1, "time": 9000.0 + 2 * e, "resumed_from": 2}
        for e in (3, 4, 5)
    ]
    budget = node_budget({"epochs": 10}, before + resumed)
    assert budget is not None and budget.per_epoch_s == 2.0 and budget.left_s == 5 * 2.0
    steps = node_budget({"steps": 200, "epochs": None}, before + resumed)
    assert steps is not None and steps.text == "step 50/200" and steps.left_s == 150 * 0.2
    # one record of the current run: no pace yet, the epochs' own seconds stand in
    single = node_budget({"epochs": 10}, [*before, resumed[0]])
    assert single is not None and single.per_epoch_s == 0.1
