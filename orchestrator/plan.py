"""From a spec to a DAG of content-addressed stage nodes.

Each grid point becomes a ``Trial``: the chain of stages its method runs (e.g. global ->
local -> finetune). Each stage of a trial becomes a ``StageNode`` whose ``key`` is

    key = sha256(canonical JSON of what the stage's computation depends on)[:16]

namely: the stage name, its config (after the method's overrides, less the settings its own
choices leave unused: ``relevant_settings``), the model config, the data
fingerprint (content, not location), the split fractions and split index, the seed, the label
fraction only if the stage reads labels, the parent node's key, the parts loaded from the
parent, ``trainers.STAGE_CODE_VERSION`` and the execution that changes the arithmetic (DDP world
size, since ``batch_size`` is per rank and NT-Xent negatives span ranks; CPU fp32 vs CUDA bf16).
Trials whose stages compute the same thing get the
same key and share one node: e.g. one global pretraining per (seed, split) serves every
temperature x block size x label fraction. ``split.repeats`` is left out of the key because a
split depends only on its index and fractions (``trainers.data.make_split``).

With ``reuse=False`` the trial id is added to every key, giving one node per trial and stage
(the benchmark's ``--no-reuse``).

Nodes are grouped into ``levels`` by depth (0 = no parent), for display and ordering; the
executor starts each incomplete node as soon as its parent is complete, whatever its level.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from orchestrator.spec import Spec
from trainers import STAGE_CODE_VERSION
from trainers.config import DataConfig, from_dict, hash_form, to_dict
from trainers.data import data_fingerprint
from trainers.registry import get_stage, stage_names

KEY_LENGTH = 16


@dataclass(frozen=True)
class StageNode:
    """One stage computation, shared by every trial that needs exactly it.

    ``config``/``model``/``data``/``split`` are the plain-dict forms (``trainers.config.to_dict``)
    of the stage's config after the method's overrides, the model, the data and split configs.
    ``label_fraction`` is None when the stage reads no labels; ``parent`` is the key of the node
    whose final weights it starts from (``init_parts`` of them), None at depth 0.
    """

    key: str
    stage: str
    config: dict[str, Any]
    model: dict[str, Any]
    data: dict[str, Any]
    split: dict[str, Any]
    split_index: int
    seed: int
    label_fraction: float | None
    parent: str | None
    init_parts: tuple[str, ...]
    depth: int

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form (``node.json``)."""
        out = dataclasses.asdict(self)
        out["init_parts"] = list(self.init_parts)
        return out

    @property
    def data_ident(self) -> str:
        """Its dataset and preprocessing as one string: nodes that read the same slices share
        it (``datasets``)."""
        return json.dumps(self.data, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StageNode:
        """Inverse of ``to_dict``."""
        values = dict(data)
        values["init_parts"] = tuple(values.get("init_parts", ()))
        return cls(**values)


@dataclass(frozen=True)
class Trial:
    """One grid point: its axis values and the node key of each stage its method runs."""

    trial_id: str
    params: dict[str, Any]
    method: str
    label_fraction: float
    seed: int
    split_index: int
    nodes: dict[str, str]

    @property
    def final_key(self) -> str:
        """The key of the trial's last node: the one that trains and scores its model."""
        return list(self.nodes.values())[-1]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Trial:
        """Inverse of ``to_dict``."""
        return cls(**dict(data))


@dataclass(frozen=True)
class Plan:
    """The trials of a spec and the distinct stage nodes they need, by depth."""

    spec: Spec
    trials: list[Trial]
    nodes: dict[str, StageNode]
    levels: list[list[str]]

    @property
    def stages(self) -> list[str]:
        """Stage names present in the plan, in pipeline order."""
        present = {node.stage for node in self.nodes.values()}
        return [stage for stage in stage_names() if stage in present]

    def summary(self, is_complete: Callable[[str], bool] | None = None) -> dict[str, Any]:
        """``{"trials": n, "stages": {stage: {"nodes": distinct, "to_run": not complete}}}``.

        ``is_complete(key)``: e.g. ``StageStore.is_complete``; without it every node counts as
        to run.
        """
        stages: dict[str, dict[str, int]] = {}
        for stage in self.stages:
            keys = [key for key, node in self.nodes.items() if node.stage == stage]
            done = sum(1 for key in keys if is_complete is not None and is_complete(key))
            stages[stage] = {"nodes": len(keys), "to_run": len(keys) - done}
        return {"trials": len(self.trials), "stages": stages}

    def node_point(self, key: str) -> dict[str, Any]:
        """The grid point node ``key`` computes, as plain values: ``stage``, then ``method`` and
        every grid axis value that all the trials it serves share, and ``trials`` (how many).
        E.g. a shared global pretraining: {"stage": "global", "split": 0, "trials": 9}."""
        serving = [trial for trial in self.trials if key in trial.nodes.values()]
        point: dict[str, Any] = {"stage": self.nodes[key].stage}
        if serving and all(trial.method == serving[0].method for trial in serving):
            point["method"] = serving[0].method
        for name, value in serving[0].params.items() if serving else ():
            if name != "method" and all(trial.params.get(name) == value for trial in serving):
                point[name] = value
        point["trials"] = len(serving)
        return point

    def to_dict(self) -> dict[str, Any]:
        """The trials and nodes as plain data (recorded in ``sweep.json``; no spec)."""
        return {
            "trials": [trial.to_dict() for trial in self.trials],
            "nodes": {key: node.to_dict() for key, node in self.nodes.items()},
        }

    @classmethod
    def from_dict(cls, spec: Spec, data: Mapping[str, Any]) -> Plan:
        """Rebuild a recorded plan (no data access: keys are taken as recorded)."""
        trials = [Trial.from_dict(t) for t in data.get("trials", [])]
        nodes = {key: StageNode.from_dict(n) for key, n in data.get("nodes", {}).items()}
        return cls(spec=spec, trials=trials, nodes=nodes, levels=_levels(nodes))


def datasets(nodes: Iterable[StageNode]) -> dict[str, DataConfig]:
    """The distinct datasets ``nodes`` read: ``data_ident`` -> its ``DataConfig``."""
    found: dict[str, DataConfig] = {}
    for node in nodes:
        if node.data_ident not in found:
            found[node.data_ident] = from_dict(DataConfig, node.data, "dataset")
    return found


def node_key(material: Mapping[str, Any]) -> str:
    """``sha256(canonical JSON)[:16]``: identical across processes and machines."""
    text = json.dumps(material, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:KEY_LENGTH]


# every stage's budget is epochs or steps: the other one is unused
_BUDGET_SETTINGS = (
    (lambda c: c.get("steps") is None, ("steps",)),
    (lambda c: c.get("steps") is not None, ("epochs",)),
)


def relevant_settings(stage: str, config: Mapping[str, Any]) -> dict[str, Any]:
    """The stage config without the settings its own choices leave unused (for node keys):
    its kind's ``unused_settings`` (``trainers.registry``), the budget it does not use and the
    settings at their ``trainers.config.LATE_DEFAULTS``.

    E.g. a supervised local stage with strategy "block" never reads ``stride``; a finetune
    stage without a regulariser never reads ``mixup_alpha`` or the Mean Teacher settings.
    """
    unused = get_stage(stage).unused(config)
    for applies, names in _BUDGET_SETTINGS:
        if applies(config):
            unused.update(names)
    return hash_form({name: value for name, value in config.items() if name not in unused})


def build_plan(spec: Spec, reuse: bool = True) -> Plan:
    """Expand the grid into trials and merge identical stage nodes.

    Trial ids are ``t0000``, ``t0001``, ... in grid order (the last axis varies fastest).
    Raises ``trainers.data.DatasetError`` when an msd dataset cannot be fingerprinted.
    """
    fingerprints: dict[DataConfig, str] = {}
    # batch_size is per DDP rank and CUDA runs in bf16: both change what a stage computes
    execution = {
        "world_size": spec.resources.workers_per_trial,
        "device": "cuda" if spec.resources.gpus_per_worker > 0 else "cpu",
    }
    nodes: dict[str, StageNode] = {}
    trials: list[Trial] = []
    for index, params in enumerate(spec.points()):
        trial_id = f"t{index:04d}"
        point = spec.configure(params)
        if point.data not in fingerprints:
            fingerprints[point.data] = data_fingerprint(point.data)
        fingerprint = fingerprints[point.data]
        split_key = {k: v for k, v in to_dict(point.split).items() if k != "repeats"}
        data = hash_form(to_dict(point.data))  # settings added later: only when set
        data["label_remap"] = [list(pair) for pair in point.data.label_remap]
        chain: dict[str, str] = {}
        parent: StageNode | None = None
        for stage, cfg in point.stage_configs.items():
            kind = get_stage(stage)
            parts = kind.init_parts(parent.stage if parent else None)
            fraction = point.label_fraction if kind.uses_labels(cfg) else None
            material = {
                "stage": stage,
                "config": relevant_settings(stage, to_dict(cfg)),
                "model": to_dict(point.model),
                "data_fingerprint": fingerprint,
                "split": split_key,
                "split_index": point.split_index,
                "seed": point.seed,
                "label_fraction": fraction,
                "parent": parent.key if parent else None,
                "init_parts": list(parts),
                "code_version": STAGE_CODE_VERSION,
                "execution": execution,
            }
            if not reuse:
                material["trial"] = trial_id
            key = node_key(material)
            if key not in nodes:
                nodes[key] = StageNode(
                    key=key,
                    stage=stage,
                    config=to_dict(cfg),
                    model=to_dict(point.model),
                    data=data,
                    split=to_dict(point.split),
                    split_index=point.split_index,
                    seed=point.seed,
                    label_fraction=fraction,
                    parent=parent.key if parent else None,
                    init_parts=parts,
                    depth=parent.depth + 1 if parent else 0,
                )
            chain[stage] = key
            parent = nodes[key]
        trials.append(
            Trial(
                trial_id=trial_id,
                params=dict(params),
                method=point.method,
                label_fraction=point.label_fraction,
                seed=point.seed,
                split_index=point.split_index,
                nodes=chain,
            )
        )
    return Plan(spec=spec, trials=trials, nodes=nodes, levels=_levels(nodes))


def _levels(nodes: Mapping[str, StageNode]) -> list[list[str]]:
    """Node keys grouped by depth, each level in first-appearance order."""
    depth = max((node.depth for node in nodes.values()), default=-1)
    return [[key for key, node in nodes.items() if node.depth == d] for d in range(depth + 1)]
