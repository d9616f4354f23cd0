"""The frozen ``Spec`` and its grid points: ``Spec.points()`` enumerates them,
``Spec.configure(params)`` builds one point's configs, and ``_check_values`` / ``_check_points``
check every axis value and every point once, at load, naming where the value is written."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from orchestrator.spec.errors import SpecError
from orchestrator.spec.grid import LinkedGroup
from orchestrator.spec.resolved import _resolved
from orchestrator.spec.sections import (
    NAMED_AXES,
    RayConfig,
    Resources,
    TrackingConfig,
    config_sections,
)
from trainers.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
    from_dict,
    to_dict,
)
from trainers.point import NAMED_CHECKS, TrialPoint, spec_key


@dataclass(frozen=True)
class Spec:
    """A validated sweep specification (the YAML layout: ``orchestrator.spec``).

    ``method``, ``label_fraction``, ``seed`` and ``split_index`` hold the base values (one value
    each unless written as a list; a named value set by a linked group holds that group's
    values); ``axes`` is the ordered list of grid axes ``(name, values)`` and ``linked`` the
    linked groups ``(keys, cases)``, each one more axis after ``axes`` whose values are its
    cases; the trials are their cartesian product. ``spec_hash`` identifies *what* is computed:
    sha256 of the canonical resolved spec without storage / ray / resources / tracking, so the
    same sweep relaunched with other resources or on another cluster has the same hash.
    """

    name: str
    path: str
    dataset: DataConfig
    split: SplitConfig
    model: ModelConfig
    stages: StageConfigs
    method: tuple[str, ...]
    label_fraction: tuple[float, ...]
    seed: tuple[int, ...]
    split_index: tuple[int, ...]
    axes: tuple[tuple[str, tuple[Any, ...]], ...]
    linked: tuple[LinkedGroup, ...]
    resources: Resources
    storage: str
    ray: RayConfig
    tracking: TrackingConfig
    spec_hash: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)
    overrides: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def num_trials(self) -> int:
        """Number of grid points: the product of the axes' lengths and the linked groups' case
        counts (1 without axes); counted, no point built."""
        return math.prod(count for _, count in self.axis_counts)

    @property
    def axis_counts(self) -> tuple[tuple[str, int], ...]:
        """Each axis of the product and its number of values, in grid order: the ``axes`` by
        name, then each linked group named by its keys joined with ``+``."""
        counts = [(name, len(values)) for name, values in self.axes]
        counts += [("+".join(keys), len(cases)) for keys, cases in self.linked]
        return tuple(counts)

    @property
    def axis_keys(self) -> tuple[str, ...]:
        """Every key a grid point sets, in grid order: the axes' names, then the linked keys."""
        return (*(name for name, _ in self.axes), *(k for keys, _ in self.linked for k in keys))

    def points(self) -> Iterator[dict[str, Any]]:
        """Every grid point as ``{key: value}`` (each axis by name, then each linked group's
        keys with one case's values), in grid order (last axis fastest)."""
        names = [name for name, _ in self.axes]
        dimensions = [values for _, values in self.axes] + [cases for _, cases in self.linked]
        for combo in itertools.product(*dimensions):
            point = dict(zip(names, combo[: len(names)], strict=True))
            for (keys, _), case in zip(self.linked, combo[len(names) :], strict=True):
                point.update(zip(keys, case, strict=True))
            yield point

    def configure(self, params: Mapping[str, Any]) -> TrialPoint:
        """The configs of the grid point ``params`` (axis name -> value), validated.

        Raises ``ConfigError`` (key relative to the spec, e.g. ``stages.local.block_size``) when
        a value, or a combination of values, is impossible.
        """
        return _configure(self, params)

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain data (for ``sweep.json``); ``spec_from_mapping`` inverts it."""
        return _resolved(self, for_hash=False)


def _check_value(axis: str, value: Any) -> None:
    """Validate a named axis value alone (``trainers.point.NAMED_CHECKS``); ConfigError."""
    NAMED_CHECKS[NAMED_AXES[axis]](value)


def _check_values(spec: Spec, file: str) -> None:
    """Validate the base values of the named axes, naming the top-level key (those a linked
    group sets, naming their case)."""
    linked = {key for keys, _ in spec.linked for key in keys}
    for axis, values in (
        ("method", spec.method),
        ("label_fraction", spec.label_fraction),
        ("seed", spec.seed),
        ("split", spec.split_index),
    ):
        if axis in linked:
            continue
        for value in values:
            try:
                _check_value(axis, value)
            except ConfigError as err:
                raise SpecError(f"{file}: {err}") from None
    for i, (keys, cases) in enumerate(spec.linked):
        for j, case in enumerate(cases):
            for key, value in zip(keys, case, strict=True):
                if key in NAMED_AXES:
                    _check_alone(spec, key, value, f"linked[{i}][{j}].{key}", file)


def _check_alone(spec: Spec, key: str, value: Any, label: str, file: str) -> None:
    """Validate the value of one grid key alone (its config section, or ``NAMED_CHECKS``);
    the error names ``label``, where the value is written."""
    try:
        _apply(spec, {key: value})
    except ConfigError as err:
        inner = str(err).removeprefix(f"{NAMED_AXES.get(key, key)}: ")
        raise SpecError(f"{file}: {label}: value {value!r}: {inner}") from None


def _check_points(spec: Spec, file: str) -> None:
    """Validate every grid axis value and linked case value alone, then every grid point's
    combination."""
    from_grid = set(spec.raw.get("grid") or {})
    for name, values in spec.axes:
        label = f"grid.{name}" if name in from_grid else NAMED_AXES.get(name, name)
        for value in values:
            _check_alone(spec, name, value, label, file)
    group_of: dict[str, int] = {}  # linked key -> its group
    for i, (keys, cases) in enumerate(spec.linked):
        group_of.update(dict.fromkeys(keys, i))
        for j, case in enumerate(cases):
            for key, value in zip(keys, case, strict=True):
                _check_alone(spec, key, value, f"linked[{i}][{j}].{key}", file)
    for params in spec.points():
        try:
            _configure(spec, params)
        except ConfigError as err:
            where = ", ".join(f"{k}={v!r}" for k, v in params.items())
            context = f" (grid point {where})" if params else ""
            key = str(err).partition(": ")[0]
            # where the offending value is written: the grid, a linked group, or the top level
            if key in from_grid:
                prefix = "grid."
            elif key in group_of:
                prefix = f"linked[{group_of[key]}]."
            else:
                prefix = ""
            raise SpecError(f"{file}: {prefix}{err}{context}") from None


def _configure(spec: Spec, params: Mapping[str, Any]) -> TrialPoint:
    """The trial point of grid point ``params``: grid values applied to the spec's configs, then
    ``TrialPoint``'s checks (ConfigError, key relative to the spec, on failure)."""
    current, named = _apply(spec, params)
    stages = StageConfigs({name: current[f"stages.{name}"] for name in spec.stages})
    return TrialPoint(
        data=current["dataset"],
        split=current["split"],
        model=current["model"],
        stages=stages,
        **named,
    )


def _apply(spec: Spec, params: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The spec's configs by section and its named values, with ``params`` (axis -> value)
    applied; each value is validated alone (its config section, ``NAMED_CHECKS``), not yet in
    combination with the others."""
    sections: dict[str, dict[str, Any]] = {}
    named = {
        "method": spec.method[0],
        "label_fraction": spec.label_fraction[0],
        "seed": spec.seed[0],
        "split_index": spec.split_index[0],
    }
    for path, value in params.items():
        if path in NAMED_AXES:
            _check_value(path, value)
            named[NAMED_AXES[path]] = value
        else:
            section, _, leaf = path.rpartition(".")
            sections.setdefault(section, {})[leaf] = value

    current: dict[str, Any] = {"dataset": spec.dataset, "split": spec.split, "model": spec.model}
    current.update({f"stages.{name}": cfg for name, cfg in spec.stages.items()})
    classes = config_sections()
    for section, values in sections.items():
        try:
            base = to_dict(current[section])
            for one, other in (("steps", "epochs"), ("epochs", "steps")):
                if one in values and other not in values and other in base:
                    base[other] = None  # an axis over one budget kind replaces the other
            current[section] = from_dict(classes[section], {**base, **values}, section)
        except ConfigError as err:
            raise ConfigError(spec_key(str(err))) from None
        except TypeError as err:
            raise ConfigError(f"{section}: {err}") from None
    return current, named
