"""Progress lines while a sweep runs: a line per stage node start, finish and failure, and the
node's loss every ``EPOCH_PROGRESS_EVERY_S`` seconds (a Ray Tune callback)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from orchestrator.plan import Plan
    from orchestrator.store import StageStore

EPOCH_PROGRESS_EVERY_S = 30.0


def print_progress(line: str) -> None:
    """The default progress sink: one line to stderr, flushed."""
    print(line, file=sys.stderr, flush=True)


def clock(seconds: float) -> str:
    """``h:mm:ss``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours:d}:{minutes:02d}:{secs:02d}"


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

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its callbacks into tuner.pkl; the plan, store and progress sink (which
            # may not pickle) are dropped: a sweep never restores a Tuner from that file.
            return {"started": self.started}

        def _line(self, key: str, text: str) -> None:
            node = self.plan.nodes[key]
            since_start = time.monotonic() - self.sweep_start
            self.progress(f"[{clock(since_start)}] {node.stage:<8} {key} {text}")

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
            key = trial.config["node_key"]
            self.started[key] = time.monotonic()
            users = sum(1 for t in self.plan.trials if key in t.nodes.values())
            self._line(key, f"start (serves {users} trial{'s' * (users != 1)})")

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            key = trial.config["node_key"]
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
            key = trial.config["node_key"]
            if self.store.is_complete(key):
                self._line(key, f"done in {self._elapsed(key)}, {self._loss(key)}")
            else:
                error = self.store.read_error(key) or "no result"
                self._line(key, f"FAILED after {self._elapsed(key)}, {self._loss(key)}: {error}")

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            key = trial.config["node_key"]
            self._line(key, f"FAILED (trial crashed) after {self._elapsed(key)}, {self._loss(key)}")

    return NodeProgress(plan, store, progress, sweep_start)
