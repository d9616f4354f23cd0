"""From parsed YAML to a ``Spec``: each section's config built and checked, the grid's axes
(``grid``), the frozen ``Spec`` with every grid point checked (``points``), then its
``spec_hash`` (``resolved``)."""

from __future__ import annotations

import dataclasses
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from orchestrator.spec.errors import GridTooLarge, SpecError
from orchestrator.spec.grid import _axis_values, _grid_axes, _refuse_search_spaces
from orchestrator.spec.points import Spec, _check_points, _check_values
from orchestrator.spec.resolved import _canonical, _resolved
from orchestrator.spec.sections import (
    NAME_PATTERN,
    NAMED_AXES,
    TOP_LEVEL_KEYS,
    RayConfig,
    Resources,
    TrackingConfig,
)
from trainers.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
    from_dict,
    parse_number,
    unknown_key,
)
from trainers.point import spec_key
from trainers.registry import STAGE_KINDS


def _build(
    raw: Mapping[str, Any],
    file: str,
    overrides: Mapping[str, Any],
    check_paths: bool,
    max_trials: int | None = None,
) -> Spec:
    unknown = [k for k in raw if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise SpecError(f"{file}: {unknown[0]}: {unknown_key(unknown[0], TOP_LEVEL_KEYS)}")

    # Ray Tune's {grid_search: [...]} is the list it holds (grid values likewise below)
    raw = {
        **raw,
        **{key: _axis_values(raw[key], key, file) for key in NAMED_AXES.values() if key in raw},
    }
    if "label_fraction" in raw:  # 5e-2 (text to PyYAML) is a number; grid values likewise below
        fractions = raw["label_fraction"]
        raw = {**raw, "label_fraction": _map_list(parse_number, fractions)}

    name = raw.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name or ""):
        raise SpecError(
            f"{file}: name: must be a non-empty string of letters, digits, '.', '_', '+', '-', got {name!r}"
        )

    # storage first: the synthetic dataset's default root lives under it
    storage_raw = overrides.get("storage") or raw.get("storage")
    storage_raw = f"results/{name}" if storage_raw is None else storage_raw
    if not isinstance(storage_raw, str) or not storage_raw:
        raise SpecError(f"{file}: storage: must be a non-empty path, got {storage_raw!r}")
    if "://" in storage_raw and not storage_raw.startswith("file://"):
        raise SpecError(
            f"{file}: storage: only local (or shared-filesystem) paths are supported, got {storage_raw!r}"
        )
    storage = str(Path(storage_raw.removeprefix("file://")).expanduser().absolute())

    dataset_raw = _section(raw, "dataset", file)
    dataset = _config(DataConfig, dataset_raw, "dataset", file)
    if dataset.kind == "synthetic" and not dataset.root:
        root = (
            Path(storage)
            / "cache"
            / f"synthetic-c{dataset.synthetic_cases}-s{dataset.synthetic_seed}"
        )
        dataset = dataclasses.replace(dataset, root=str(root))
    elif not dataset.root:
        raise SpecError(f"{file}: dataset.root: required for kind {dataset.kind!r}")
    else:
        dataset = dataclasses.replace(dataset, root=str(Path(dataset.root).expanduser().absolute()))
    if check_paths and dataset.kind == "msd" and not Path(dataset.root).is_dir():
        raise SpecError(f"{file}: dataset.root: no such folder: {dataset.root}")

    split = _config(SplitConfig, _section(raw, "split", file), "split", file)
    model = _config(ModelConfig, _section(raw, "model", file), "model", file)

    stages_raw = _section(raw, "stages", file)
    unknown = [k for k in stages_raw if k not in STAGE_KINDS]
    if unknown:
        raise SpecError(
            f"{file}: stages.{unknown[0]}: {unknown_key(unknown[0], STAGE_KINDS, 'stage')}"
        )
    stage_cfgs = {}
    for stage, kind in STAGE_KINDS.items():
        section = f"stages.{stage}"
        value = stages_raw.get(stage)
        if value is not None and not isinstance(value, dict):
            raise SpecError(f"{file}: {section}: must be a mapping, got {value!r}")
        stage_cfgs[stage] = _config(kind.config, value or {}, section, file)
    stages = StageConfigs(stage_cfgs)

    named, axes, linked = _grid_axes(raw, split.repeats, file)

    try:
        resources = from_dict(Resources, _section(raw, "resources", file), "resources")
        ray_raw = _section(raw, "ray", file)
        if "address" in overrides:
            ray_raw["address"] = overrides["address"]
        ray = from_dict(RayConfig, ray_raw, "ray")
        tracking = from_dict(TrackingConfig, _section(raw, "tracking", file), "tracking")
    except ConfigError as err:
        raise SpecError(f"{file}: {err}") from None

    spec = Spec(
        name=name,
        path=file,
        dataset=dataset,
        split=split,
        model=model,
        stages=stages,
        method=tuple(named["method"]),
        label_fraction=tuple(named["label_fraction"]),
        seed=tuple(named["seed"]),
        split_index=tuple(named["split_index"]),
        axes=axes,
        linked=linked,
        resources=resources,
        storage=storage,
        ray=ray,
        tracking=tracking,
        spec_hash="",
        raw=dict(raw),
        overrides=dict(overrides),
    )
    _check_values(spec, file)
    if max_trials is not None and spec.num_trials > max_trials:
        raise GridTooLarge(
            f"{file}: grid: {spec.num_trials:,} trials, more than the limit of {max_trials:,}; "
            "pass --allow-large-grid to plan it anyway",
            spec.num_trials,
            spec.axis_counts,
        )
    _check_points(spec, file)
    digest = hashlib.sha256(_canonical(_resolved(spec, for_hash=True)).encode()).hexdigest()
    return dataclasses.replace(spec, spec_hash=digest)


def _section(raw: Mapping[str, Any], key: str, file: str) -> dict[str, Any]:
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(f"{file}: {key}: must be a mapping, got {value!r}")
    return dict(value)


def _config(cls: type, data: Mapping[str, Any], spec_section: str, file: str) -> Any:
    _refuse_search_spaces(data, spec_section, file)
    try:
        return from_dict(cls, data, spec_section)
    except ConfigError as err:
        raise SpecError(f"{file}: {spec_key(str(err))}") from None
    except TypeError as err:  # e.g. a list where a mapping of pairs was expected
        raise SpecError(f"{file}: {spec_section}: {err}") from None


def _map_list(function: Any, value: Any) -> Any:
    """``function`` applied to ``value``, or to each item when it is a list."""
    return [function(v) for v in value] if isinstance(value, list) else function(value)
