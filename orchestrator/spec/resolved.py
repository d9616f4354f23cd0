"""The resolved spec: every default filled in, as plain data, for ``sweep.json`` (``Spec.to_dict``)
and, without the settings that do not change what is computed, for ``spec_hash``."""

from __future__ import annotations

import dataclasses
import json
from typing import TYPE_CHECKING, Any

from orchestrator.spec.sections import NAMED_AXES
from trainers.config import hash_form, to_dict
from trainers.methods import METHODS
from trainers.registry import STAGE_KINDS

if TYPE_CHECKING:
    from orchestrator.spec.points import Spec


def _resolved(spec: Spec, for_hash: bool) -> dict[str, Any]:
    """The spec with every default filled in, as plain data.

    ``for_hash``: drop storage / ray / resources / tracking, the dataset's root (a location;
    the node keys carry the data's content fingerprint) and stage and dataset settings at
    their ``trainers.config.LATE_DEFAULTS``.
    """
    dataset = to_dict(spec.dataset)
    dataset["label_remap"] = [list(pair) for pair in spec.dataset.label_remap]
    if for_hash:
        dataset.pop("root")
        dataset = hash_form(dataset)
    out: dict[str, Any] = {
        "name": spec.name,
        "dataset": dataset,
        "split": to_dict(spec.split),
        "model": to_dict(spec.model),
        "stages": {
            name: hash_form(to_dict(spec.stages[name])) if for_hash else to_dict(spec.stages[name])
            for name in _resolved_stages(spec)
        },
    }
    # named values keep their written form: a list where it is an axis, else the scalar;
    # top-level axes are written in axis order so that a rebuilt spec has the same axis order
    from_grid = set(spec.raw.get("grid") or {})
    axis_names = [name for name, _ in spec.axes]
    linked_keys = {key for keys, _ in spec.linked for key in keys}
    for name in axis_names:
        if name in NAMED_AXES and name not in from_grid:
            out[NAMED_AXES[name]] = list(getattr(spec, NAMED_AXES[name]))
    for axis, key in NAMED_AXES.items():
        if axis not in axis_names and axis not in linked_keys:
            out[key] = getattr(spec, key)[0]
    out["grid"] = {
        name: list(values)
        for name, values in spec.axes
        if name in from_grid or name not in NAMED_AXES
    }
    if spec.linked:  # only when present: the hashes of specs without it stay as they were
        out["linked"] = [
            [dict(zip(keys, case, strict=True)) for case in cases] for keys, cases in spec.linked
        ]
    if for_hash:
        out["axes"] = axis_names  # the order fixes the trial ids
        return out
    out["resources"] = dataclasses.asdict(spec.resources)
    out["storage"] = spec.storage
    out["ray"] = dataclasses.asdict(spec.ray)
    out["tracking"] = dataclasses.asdict(spec.tracking)
    return out


def _resolved_stages(spec: Spec) -> list[str]:
    """The stage kinds whose settings the resolved spec (and so ``spec_hash``) records: those
    the spec's methods run, and the original kinds always (``StageKind.hashed_when_unused``)."""
    run = {stage for method in spec.method for stage in METHODS[method].stages}
    return [
        name
        for name, kind in STAGE_KINDS.items()
        if kind.hashed_when_unused or name in run or name in (spec.raw.get("stages") or {})
    ]


def _canonical(value: Any) -> str:
    """Canonical JSON (sorted keys, no spaces): equal data gives equal text across processes."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)
