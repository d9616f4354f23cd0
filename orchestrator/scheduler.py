"""Which stage node to start next: the DAG of a sweep's incomplete nodes, without Ray."""

from __future__ import annotations

from collections.abc import Mapping


class DagScheduler:
    """Which incomplete node to start next, as soon as its parent is complete (Ray-free).

    ``parents``: node key -> parent key, or None when the node can start now (no parent, or the
    parent complete already); a parent must itself be one of the keys. ``stages``: key -> stage
    name (for messages). Among the ready nodes the one with the most descendants goes first (a
    shared pretraining node unlocks every trial it serves), ties in the order of ``parents``.

    ``next()`` gives a key to start, None when nothing is ready until a running node ends, or
    ``DONE`` when nothing is left to start. ``finished(key, ok, why)`` records a node's end; a
    failed node's descendants are dropped into ``skipped`` (key -> reason) and never started.
    """

    DONE = "DONE"

    def __init__(self, parents: Mapping[str, str | None], stages: Mapping[str, str]) -> None:
        for key, parent in parents.items():
            if parent is not None and parent not in parents:
                raise ValueError(f"node {key}: parent {parent} is not among the nodes to run")
        self.parents = dict(parents)
        self.stages = dict(stages)
        self.children: dict[str, list[str]] = {key: [] for key in parents}
        for key, parent in parents.items():
            if parent is not None:
                self.children[parent].append(key)
        order = {key: i for i, key in enumerate(parents)}
        self.priority = {key: (-self._descendants(key), order[key]) for key in parents}
        self.waiting: list[str] = list(parents)
        self.running: set[str] = set()
        self.completed: list[str] = []
        self.failed: dict[str, str] = {}
        self.skipped: dict[str, str] = {}

    def _descendants(self, key: str) -> int:
        return sum(1 + self._descendants(child) for child in self.children[key])

    def ready(self) -> list[str]:
        """The waiting nodes whose parent is complete (or that have none), by priority."""
        done = set(self.completed)
        ready = [
            key for key in self.waiting if self.parents[key] is None or self.parents[key] in done
        ]
        return sorted(ready, key=self.priority.__getitem__)

    def next_bundle(self, limit: int) -> list[str] | str | None:
        """Like ``next``, but up to ``limit`` ready nodes of one stage kind, to run one after
        another in one Train run: the first is ``next()``'s, the others the next ready nodes of
        its kind by priority (siblings of one parent first). None or ``DONE`` as ``next``."""
        key = self.next()
        if key is None or key == self.DONE:
            return key
        same_kind = [k for k in self.ready() if self.stages[k] == self.stages[key]]
        parent = self.parents[key]
        mates = sorted(same_kind, key=lambda k: self.parents[k] != parent)[: limit - 1]
        for mate in mates:
            self.waiting.remove(mate)
            self.running.add(mate)
        return [key, *mates]

    def next(self) -> str | None:
        ready = self.ready()
        if not ready:
            return self.DONE if not self.waiting else None
        key = ready[0]
        self.waiting.remove(key)
        self.running.add(key)
        return key

    def finished(self, key: str, ok: bool, why: str = "did not complete") -> None:
        if key not in self.running:
            raise ValueError(f"node {key} is not running")
        self.running.discard(key)
        if ok:
            self.completed.append(key)
            return
        self.failed[key] = why
        self._skip_children(key, why)

    def _skip_children(self, key: str, why: str) -> None:
        for child in self.children[key]:
            if child in self.waiting:
                self.waiting.remove(child)
                self.skipped[child] = f"parent {key} ({self.stages[key]}) did not complete: {why}"
                self._skip_children(child, why)
