"""Progress lines while a sweep runs: a line per stage node start, finish and failure, and the
node's loss every ``EPOCH_PROGRESS_EVERY_S`` seconds (a Ray Tune callback). Each line names the
node's grid point (``node_label``) and says how many of the sweep's nodes are complete; finish
lines add an estimate of the time left from this launch's finished nodes."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.store import StageStore

EPOCH_PROGRESS_EVERY_S = 30.0
BUNDLE_KEY = "bundle"  # a Tune trial's config: the node keys of its bundle, when it runs several
NOT_AXES = ("stage", "method", "trials")  # the keys of Plan.node_point that are not axes


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


def progress_callback(
    plan: Plan, store: StageStore, progress: Callable[[str], None], sweep_start: float
) -> Any:
    """A ``ray.tune.Callback`` printing a line per node start / finish / failure."""
    from ray.tune import Callback

    class NodeProgress(Callback):
        def __init__(
            self, plan: Plan, store: StageStore, progress: Callable[[str], None], start: float
        ) -> None:
            # attributes, not closure variables: cloudpickle would pickle a closure's cells
            self.plan, self.store, self.progress, self.sweep_start = plan, store, progress, start
            self.started: dict[str, float] = {}
            self.last: dict[str, dict[str, Any]] = {}
            self.printed: dict[str, float] = {}
            self.total = len(plan.nodes)
            self.done = sum(1 for key in plan.nodes if store.is_complete(key))
            self.took: list[float] = []  # this launch's finished nodes, seconds each
            self.running: set[str] = set()
            self.most_running = 1

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into tuner.pkl; the plan, store and progress sink (which
            # may not pickle) are dropped: a sweep never restores a Tuner from that file.
            return {"started": self.started}

        def _line(self, key: str, text: str) -> None:
            node = self.plan.nodes[key]
            since_start = time.monotonic() - self.sweep_start
            label = node_label(self.plan, key)
            self.progress(
                f"[{clock(since_start)}] {self.done}/{self.total} done | {node.stage} {key[:8]}"
                f" {label} | {text}"
            )

        def _eta(self) -> str:
            """Time left: the mean finished node's time x nodes left / nodes run at once."""
            left = self.total - self.done
            if not self.took or left <= 0:
                return ""
            seconds = sum(self.took) / len(self.took) * left / self.most_running
            return f" | about {clock(seconds)} left"

        def _ended(self, key: str) -> None:
            self.running.discard(key)
            if key in self.started:
                self.took.append(time.monotonic() - self.started[key])

        def _loss(self, key: str) -> str:
            last = self.last.get(key, {})
            if "loss" not in last:
                return "no epoch reported"
            config = self.plan.nodes[key].config
            if config.get("steps") is not None:
                budget = f"step {last.get('steps', '?')}/{config['steps']}"
            else:
                budget = f"epoch {last.get('epoch', '?')}/{config.get('epochs', '?')}"
            return f"{budget} loss {float(last['loss']):.4f}"

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            keys = trial_nodes(trial.config)
            for index, key in enumerate(keys):
                self.started[key] = time.monotonic()
                self.running.add(key)
                where = f" ({index + 1}/{len(keys)} of a bundle)" if len(keys) > 1 else ""
                self._line(key, f"start{where}")
            self.most_running = max(self.most_running, len(self.running))

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            # a bundle's reports name their node; a lone node's trial is its node
            key = result.get("node_key") or trial.config["node_key"]
            if key not in self.plan.nodes:
                return
            if "loss" in result:
                self.last[key] = result
                now = time.monotonic()
                if (
                    now - self.printed.get(key, self.started.get(key, now))
                    >= EPOCH_PROGRESS_EVERY_S
                ):
                    self.printed[key] = now
                    self._line(key, self._loss(key))

        def _elapsed(self, key: str) -> str:
            return clock(time.monotonic() - self.started.get(key, time.monotonic()))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for key in trial_nodes(trial.config):
                self._ended(key)
                if self.store.is_complete(key):
                    self.done += 1
                    self._line(key, f"done in {self._elapsed(key)}, {self._loss(key)}{self._eta()}")
                else:
                    error = self.store.read_error(key) or "no result"
                    self._line(
                        key, f"FAILED after {self._elapsed(key)}, {self._loss(key)}: {error}"
                    )

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            for key in trial_nodes(trial.config):
                self._ended(key)
                self._line(
                    key, f"FAILED (trial crashed) after {self._elapsed(key)}, {self._loss(key)}"
                )

    return NodeProgress(plan, store, progress, sweep_start)
