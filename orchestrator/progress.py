"""Progress while a sweep runs: node events from one state, shown by one of two views.

The shape::

    Tune callback (progress_callback) -> SweepState (start / result / complete / crashed)
        -> ProgressEvent -> ProgressView: PlainView (lines) | LiveView (a rich live table)

``SweepState`` is the one home of what the views show: how many of the sweep's nodes are
complete or failed, each running node's budget done (``node_budget``, shared with
``orchestrator.tables.node_progress``), its loss, time per epoch and time left, and the sweep's
time left (``SweepState.eta_s``). Each event carries its own line (``ProgressEvent.line``):
the node's grid point (``node_label``), how many nodes are complete, and what happened.

Views (``progress_view`` picks one):

- ``PlainView``: a line per node start, finish and failure, and the node's loss every
  ``EPOCH_PROGRESS_EVERY_S`` seconds; finish lines add an estimate of the time left. The view
  whenever stderr is not a terminal (a log file, a pipe, CI).
- ``LiveView``: on a terminal, a table of the running nodes (stage, key, grid point, epoch or
  step k/N, loss, seconds per epoch, elapsed, time left) under a header with k of N nodes done,
  the failed count, the elapsed time and the sweep's time left, redrawn twice a second; finish
  and failure lines, and every other line of the sweep, are printed above the table, so the
  scrollback keeps the history. The table is removed when the sweep ends or is interrupted.
  ``launch --plain``, ``SEMICON_SWEEP_PLAIN=1`` or ``TERM=dumb`` keep plain lines on a terminal
  (``NO_COLOR`` only turns colours off).

A view is a context manager around the sweep (``run_sweep`` enters it once Ray is up, so a
live table is torn down before Ray shuts down and before an "interrupted" line) and a callable
taking a line, so it goes wherever a ``Callable[[str], None]`` progress sink goes.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, TextIO

if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.store import StageStore

EPOCH_PROGRESS_EVERY_S = 30.0
BUNDLE_KEY = "bundle"  # a Tune trial's config: the node keys of its bundle, when it runs several
NOT_AXES = ("stage", "method", "trials")  # the keys of Plan.node_point that are not axes
PLAIN_ENV = "SEMICON_SWEEP_PLAIN"  # set (not "0"): plain lines on a terminal too
LIVE_REFRESH_PER_S = 2
LIVE_ROWS = 20  # running nodes listed in the live table; the rest are counted
LIVE_COLUMNS = ("stage", "node", "grid point", "progress", "loss", "s/epoch", "elapsed", "left")
LIVE_KEY_WIDTH = 110  # terminals narrower than this get no node key column
EPOCH_KEYS = ("epoch", "steps", "loss", "seconds")  # what SweepState keeps of a Tune result
PACE_WINDOW = 20  # epoch records a node's wall-clock pace is measured over


def trial_nodes(config: Any) -> list[str]:
    """The node keys a Tune trial runs: its bundle (``BUNDLE_KEY``), or its one node."""
    bundle = config.get(BUNDLE_KEY)
    return list(bundle) if bundle else [str(config["node_key"])]


def print_progress(line: str) -> None:
    """The default progress sink: one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


def node_label(plan: Plan, key: str) -> str:
    """The grid point a node computes, in words (``Plan.node_point``): e.g. "random
    label_fraction=0.05 split=1"; a node serving several trials names what they share and how
    many they are."""
    point = plan.node_point(key)
    parts = [str(point["method"])] if "method" in point else []
    parts += [f"{name}={value}" for name, value in point.items() if name not in NOT_AXES]
    if point["trials"] > 1:
        parts.append(f"({point['trials']} trials)")
    return " ".join(parts)


# --------------------------------------------------------------------------------------------
# a node's budget and time left


@dataclass(frozen=True)
class Budget:
    """How far a node is: ``done`` of ``total`` epochs or steps (``unit``), its pace in seconds
    per epoch and the time left at that pace."""

    unit: Literal["epoch", "step"]
    done: int
    total: int
    per_epoch_s: float
    left_s: float

    @property
    def text(self) -> str:
        """``"epoch 41/120"`` or ``"step 648/1200"``."""
        return f"{self.unit} {self.done}/{self.total}"


def wall_pace(records: Sequence[Mapping[str, Any]], unit: str) -> float | None:
    """Wall seconds per ``unit`` (``"epoch"`` or ``"steps"``) over the last ``PACE_WINDOW``
    records of the node's current run (same ``resumed_from``) that carry a ``time``; None with
    fewer than two of them. Wall time counts what an epoch's ``seconds`` leaves out (reporting,
    checkpoints, validation), which can be most of a short epoch."""
    last = records[-1]
    run = [
        r
        for r in records[-PACE_WINDOW:]
        if "time" in r and unit in r and r.get("resumed_from") == last.get("resumed_from")
    ]
    if len(run) < 2:
        return None
    units = float(run[-1][unit]) - float(run[0][unit])
    seconds = float(run[-1]["time"]) - float(run[0]["time"])
    return seconds / units if units > 0 and seconds >= 0 else None


def node_budget(config: Mapping[str, Any], records: Sequence[Mapping[str, Any]]) -> Budget | None:
    """A node's ``Budget`` from its epoch records (``epochs.jsonl`` lines, or the per-epoch
    results Tune received, which may skip epochs: ``orchestrator.worker.ReportThrottle``) and
    its stage config (a budget in ``epochs`` or in ``steps``); None without records.

    The pace is the wall clock's between records (``wall_pace``) where they carry a ``time``,
    else the mean of their ``seconds`` (training time per epoch)."""
    if not records:
        return None
    last = records[-1]
    per_epoch = wall_pace(records, "epoch")
    if per_epoch is None:
        per_epoch = sum(float(r.get("seconds", 0.0)) for r in records) / len(records)
    if config.get("steps") is not None:
        done, total = int(last.get("steps", 0)), int(config["steps"])
        per_step = wall_pace(records, "steps")
        if per_step is None:
            epochs = int(last.get("epoch", len(records)))
            per_step = per_epoch * epochs / max(done, 1)
        return Budget("step", done, total, per_epoch, max(total - done, 0) * per_step)
    done, total = int(last.get("epoch", 0)), int(config.get("epochs") or 0)
    return Budget("epoch", done, total, per_epoch, max(total - done, 0) * per_epoch)


# --------------------------------------------------------------------------------------------
# the sweep's state and its events

EventKind = Literal["start", "epoch", "done", "failed", "crashed"]


@dataclass(frozen=True)
class ProgressEvent:
    """Something that happened to one node: ``kind``, when (``at``: seconds since the sweep
    started), the sweep's counts after it, and ``detail``, what the line says about it."""

    kind: EventKind
    key: str
    stage: str
    label: str
    at: float
    done: int
    total: int
    detail: str

    @property
    def line(self) -> str:
        """``[h:mm:ss] k/N done | <stage> <key[:8]> <grid point> | <detail>``."""
        return (
            f"[{clock(self.at)}] {self.done}/{self.total} done | {self.stage} {self.key[:8]}"
            f" {self.label} | {self.detail}"
        )


class SweepState:
    """What a sweep's progress views show, kept from Tune's trial hooks (no Ray here).

    ``now``: the clock (``time.monotonic``; ``sweep_start`` is on it)."""

    def __init__(
        self,
        plan: Plan,
        store: StageStore,
        sweep_start: float,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self.plan, self.store, self.sweep_start, self.now = plan, store, sweep_start, now
        self.total = len(plan.nodes)
        self.done = sum(1 for key in plan.nodes if store.is_complete(key))
        self.failed = 0  # nodes that failed in this launch
        self.started: dict[str, float] = {}
        self.records: dict[str, list[dict[str, Any]]] = {}  # per-epoch results, per node
        self.took: list[float] = []  # this launch's finished nodes, seconds each
        self.running: dict[str, None] = {}  # in start order
        self.most_running = 1
        self._labels: dict[str, str] = {}

    def label(self, key: str) -> str:
        """``node_label`` of node ``key`` (kept: it scans the plan's trials)."""
        if key not in self._labels:
            self._labels[key] = node_label(self.plan, key)
        return self._labels[key]

    # ---- what the views read

    def elapsed(self) -> float:
        """Seconds since the sweep started."""
        return self.now() - self.sweep_start

    def node_elapsed(self, key: str) -> float:
        """Seconds since node ``key`` started (0 when it has not)."""
        now = self.now()
        return now - self.started.get(key, now)

    def eta_s(self) -> float | None:
        """The sweep's time left: the mean finished node's time x nodes left / nodes run at
        once; None before a node of this launch finished (or when none is left)."""
        left = self.total - self.done
        if not self.took or left <= 0:
            return None
        return sum(self.took) / len(self.took) * left / self.most_running

    def last(self, key: str) -> dict[str, Any]:
        """Node ``key``'s last per-epoch result ({} before its first)."""
        records = self.records.get(key)
        return records[-1] if records else {}

    def budget(self, key: str) -> Budget | None:
        """Node ``key``'s budget done and time left (``node_budget``) from the results so far."""
        return node_budget(self.plan.nodes[key].config, self.records.get(key, []))

    def loss_text(self, key: str) -> str:
        """``"epoch 3/100 loss 0.5000"`` (or ``step``), or ``"no epoch reported"``."""
        last = self.last(key)
        if "loss" not in last:
            return "no epoch reported"
        config = self.plan.nodes[key].config
        if config.get("steps") is not None:
            budget = f"step {last.get('steps', '?')}/{config['steps']}"
        else:
            budget = f"epoch {last.get('epoch', '?')}/{config.get('epochs', '?')}"
        return f"{budget} loss {float(last['loss']):.4f}"

    # ---- transitions, each returning its event

    def _event(self, kind: EventKind, key: str, detail: str) -> ProgressEvent:
        node = self.plan.nodes[key]
        return ProgressEvent(
            kind=kind,
            key=key,
            stage=node.stage,
            label=self.label(key),
            at=self.elapsed(),
            done=self.done,
            total=self.total,
            detail=detail,
        )

    def _ended(self, key: str) -> None:
        self.running.pop(key, None)
        if key in self.started:
            self.took.append(self.now() - self.started[key])
        if self.records.get(key):
            self.records[key] = self.records[key][-1:]  # the last, for its end line

    def start(self, key: str, bundle: tuple[int, int] | None = None) -> ProgressEvent:
        """Node ``key`` started; ``bundle``: its (position, size) in a bundle of nodes that run
        one after another in one Train run."""
        self.started[key] = self.now()
        self.running[key] = None
        self.most_running = max(self.most_running, len(self.running))
        where = f" ({bundle[0]}/{bundle[1]} of a bundle)" if bundle is not None else ""
        return self._event("start", key, f"start{where}")

    def result(self, key: str, result: Mapping[str, Any]) -> ProgressEvent | None:
        """A Tune result: an ``epoch`` event when it is an epoch's (has a loss); the node's
        last result (``node_status``, its final metrics) is not an epoch."""
        if "loss" not in result or "node_status" in result:
            return None
        record = {name: result[name] for name in EPOCH_KEYS if name in result}
        record["time"] = self.now()  # when the driver heard of it: the node's wall-clock pace
        self.records.setdefault(key, []).append(record)
        return self._event("epoch", key, self.loss_text(key))

    def complete(self, key: str) -> ProgressEvent:
        """The node's trial ended: ``done`` when the store holds its result, else ``failed``."""
        took = clock(self.node_elapsed(key))
        self._ended(key)
        if self.store.is_complete(key):
            self.done += 1
            eta = self.eta_s()
            left = f" | about {clock(eta)} left" if eta is not None else ""
            return self._event("done", key, f"done in {took}, {self.loss_text(key)}{left}")
        self.failed += 1
        error = self.store.read_error(key) or "no result"
        return self._event("failed", key, f"FAILED after {took}, {self.loss_text(key)}: {error}")

    def crashed(self, key: str) -> ProgressEvent:
        """The node's trial driver crashed (Tune gave up on it)."""
        took = clock(self.node_elapsed(key))
        self._ended(key)
        self.failed += 1
        return self._event(
            "crashed", key, f"FAILED (trial crashed) after {took}, {self.loss_text(key)}"
        )


# --------------------------------------------------------------------------------------------
# views


class ProgressView:
    """Where a sweep's progress goes: lines (``line``, or calling the view) and node events
    (``event``); a context manager around the sweep. ``hold(line)`` keeps a line back until the
    view's first output (the launch line waits until Ray is up)."""

    def __init__(self) -> None:
        self._held: list[str] = []
        self.state: SweepState | None = None

    def hold(self, line: str) -> None:
        self._held.append(line)

    def watch(self, state: SweepState) -> None:
        """The state the events come from (once the sweep knows its nodes)."""
        self.state = state

    def line(self, text: str) -> None:
        while self._held:
            self._write(self._held.pop(0))
        self._write(text)

    def __call__(self, text: str) -> None:
        self.line(text)

    def event(self, event: ProgressEvent) -> None:
        raise NotImplementedError

    def _write(self, text: str) -> None:
        raise NotImplementedError

    def __enter__(self) -> ProgressView:
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class PlainView(ProgressView):
    """A line per node start, finish and failure, and a running node's loss every ``every_s``
    seconds, to ``sink``."""

    def __init__(
        self, sink: Callable[[str], None] = print_progress, every_s: float = EPOCH_PROGRESS_EVERY_S
    ) -> None:
        super().__init__()
        self.sink, self.every_s = sink, every_s
        self.printed: dict[str, float] = {}  # node -> when (event.at) its last line was

    def _write(self, text: str) -> None:
        self.sink(text)

    def event(self, event: ProgressEvent) -> None:
        if event.kind == "start":
            self.printed[event.key] = event.at
        elif event.kind == "epoch":
            if event.at - self.printed.get(event.key, event.at) < self.every_s:
                return
            self.printed[event.key] = event.at
        self.line(event.line)


class LiveView(ProgressView):
    """On a terminal: a live table of the running nodes under a header line (``rich.live``);
    finish and failure lines and the sweep's other lines are printed above it."""

    def __init__(self, console: Any = None, refresh_per_second: float = LIVE_REFRESH_PER_S):
        super().__init__()
        from rich.console import Console

        self.console = console if console is not None else Console(stderr=True)
        self.refresh_per_second = refresh_per_second
        self.live: Any = None

    def _write(self, text: str) -> None:
        # not markup ("[0:01:02]" would be read as a tag), wrapped by the terminal, not by rich
        self.console.print(text, markup=False, highlight=False, emoji=False, soft_wrap=True)

    def event(self, event: ProgressEvent) -> None:
        if event.kind in ("done", "failed", "crashed"):
            self.line(event.line)
        if self.live is not None:
            self.live.refresh()

    def __enter__(self) -> LiveView:
        from rich.live import Live

        self.live = Live(
            self,
            console=self.console,
            refresh_per_second=self.refresh_per_second,
            transient=True,  # the table goes when the sweep ends; the lines above it stay
        )
        self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        live, self.live = self.live, None
        if live is not None:
            live.stop()

    def __rich_console__(self, console: Any, options: Any) -> Any:
        """The header and the table (drawn anew on every refresh: the clocks tick). The node key
        column only where the terminal is wide (``LIVE_KEY_WIDTH``); the grid point folds."""
        from rich.table import Table
        from rich.text import Text

        state = self.state
        if state is None:
            yield Text("waiting for the sweep's first nodes ...", style="dim")
            return
        eta = state.eta_s()
        failed = f", {state.failed} failed" if state.failed else ""
        yield Text.assemble(
            (f"{state.done}/{state.total} nodes done", "bold"),
            f"{failed}, {len(state.running)} running | elapsed {clock(state.elapsed())} | ",
            f"about {clock(eta)} left" if eta is not None else "time left: after the first node",
        )
        wide = options.max_width >= LIVE_KEY_WIDTH
        table = Table(box=None, header_style="bold", pad_edge=False)
        for name in LIVE_COLUMNS:
            if name == "node" and not wide:
                continue
            table.add_column(
                name,
                justify="left" if name in ("stage", "node", "grid point") else "right",
                no_wrap=name != "grid point",
                overflow="fold",
            )
        running = list(state.running)  # a copy: Tune's thread may change it while this draws
        for key in running[:LIVE_ROWS]:
            cells = self.row(state, key)
            table.add_row(*(cells if wide else cells[:1] + cells[2:]))
        if len(running) > LIVE_ROWS:
            more = [f"... and {len(running) - LIVE_ROWS} more"]
            table.add_row(*(["", ""] if wide else [""]), *more, *[""] * 5)
        yield table

    @staticmethod
    def row(state: SweepState, key: str) -> list[str]:
        """A running node's cells (``LIVE_COLUMNS``)."""
        last, budget = state.last(key), state.budget(key)
        return [
            state.plan.nodes[key].stage,
            key[:8],
            state.label(key),
            budget.text if budget is not None else "starting",
            f"{float(last['loss']):.4f}" if "loss" in last else "",
            f"{budget.per_epoch_s:.1f}" if budget is not None else "",
            clock(state.node_elapsed(key)),
            clock(budget.left_s) if budget is not None else "",
        ]


def use_live_view(
    plain: bool = False, stream: TextIO | None = None, environ: Mapping[str, str] | None = None
) -> bool:
    """Whether a sweep's progress is the live table: ``stream`` (stderr) is a terminal, and
    neither ``plain`` (``launch --plain``) nor ``SEMICON_SWEEP_PLAIN`` (set, not "0") nor
    ``TERM=dumb`` asks for plain lines."""
    stream = sys.stderr if stream is None else stream
    environ = os.environ if environ is None else environ
    if plain or environ.get(PLAIN_ENV, "0") not in ("", "0") or environ.get("TERM") == "dumb":
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty is not None and isatty())
    except ValueError:  # a closed stream
        return False


def progress_view(
    plain: bool = False,
    sink: Callable[[str], None] = print_progress,
    stream: TextIO | None = None,
    environ: Mapping[str, str] | None = None,
) -> ProgressView:
    """The view for this process (``use_live_view``): ``LiveView`` on stderr, else
    ``PlainView`` writing lines to ``sink``."""
    if use_live_view(plain, stream, environ):
        return LiveView()
    return PlainView(sink)


def as_view(progress: Callable[[str], None] | ProgressView) -> ProgressView:
    """``progress`` itself when it is a view, else a ``PlainView`` writing lines to it."""
    return progress if isinstance(progress, ProgressView) else PlainView(progress)


# --------------------------------------------------------------------------------------------
# the Tune callback


def progress_callback(
    plan: Plan,
    store: StageStore,
    progress: Callable[[str], None] | ProgressView,
    sweep_start: float,
) -> Any:
    """A ``ray.tune.Callback`` turning node starts, results and ends into ``SweepState``
    events for the view ``progress`` (a plain line sink is wrapped in a ``PlainView``)."""
    from ray.tune import Callback

    class NodeProgress(Callback):
        def __init__(self, state: SweepState, view: ProgressView) -> None:
            # attributes, not closure variables: cloudpickle would pickle a closure's cells
            self.state, self.view = state, view
            self.closed: set[str] = set()  # nodes whose end was shown

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into tuner.pkl; the state and view (plan, store, a
            # sink or a console, which may not pickle) are dropped: a sweep never restores a
            # Tuner from that file.
            return {"started": dict(self.state.started)}

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            # a bundle's nodes run one after another: the first starts now, each next one with
            # its first report (``on_trial_result``)
            self._start(trial_nodes(trial.config)[0], trial)

        def _start(self, key: str, trial: Any) -> None:
            keys = trial_nodes(trial.config)
            bundle = (keys.index(key) + 1, len(keys)) if len(keys) > 1 else None
            self.view.event(self.state.start(key, bundle))

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            # a bundle's reports name their node; a lone node's trial is its node
            key = result.get("node_key") or trial.config["node_key"]
            if key not in self.state.plan.nodes:
                return
            if key not in self.state.running:
                keys = trial_nodes(trial.config)
                for earlier in keys[: keys.index(key)] if key in keys else []:
                    self._close(earlier, trial, crashed=False)
                self._start(key, trial)
            event = self.state.result(key, result)
            if event is not None:
                self.view.event(event)

        def _close(self, key: str, trial: Any, crashed: bool) -> None:
            """The node's end, once: ``done`` / ``failed`` from the store (or ``crashed``); a
            bundle-mate that ended before its first report gets its start line first."""
            if key in self.closed:
                return
            self.closed.add(key)
            if key not in self.state.running and len(trial_nodes(trial.config)) > 1:
                self._start(key, trial)
            self.view.event(self.state.crashed(key) if crashed else self.state.complete(key))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for key in trial_nodes(trial.config):
                self._close(key, trial, crashed=False)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for key in trial_nodes(trial.config):
                self._close(key, trial, crashed=True)

    view = as_view(progress)
    state = SweepState(plan, store, sweep_start)
    view.watch(state)
    return NodeProgress(state, view)
