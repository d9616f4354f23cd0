"""The grid: list axes (top-level lists, then ``grid``; Ray Tune's ``{grid_search: [...]}`` read
as its list, its random samplers refused) and ``linked`` groups, each one more axis whose values
are its cases. Values are checked later, point by point (``points``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from orchestrator.spec.errors import SpecError
from orchestrator.spec.resolved import _canonical
from orchestrator.spec.sections import NAMED_AXES, NAMED_DEFAULTS, config_sections
from trainers.config import parse_number, unknown_key

# Ray Tune's search-space functions as a YAML mapping would spell them ({uniform: [0, 1]}): all but
# grid_search sample at random, which a grid cannot express.
TUNE_SAMPLERS = (
    "choice",
    "uniform",
    "quniform",
    "loguniform",
    "qloguniform",
    "randn",
    "qrandn",
    "randint",
    "qrandint",
    "lograndint",
    "qlograndint",
    "sample_from",
)

# One linked group: its keys (as the first case writes them) and its cases, each one value per key.
LinkedGroup = tuple[tuple[str, ...], tuple[tuple[Any, ...], ...]]


def _grid_axes(
    raw: Mapping[str, Any], repeats: int, file: str
) -> tuple[dict[str, list[Any]], tuple[tuple[str, tuple[Any, ...]], ...], tuple[LinkedGroup, ...]]:
    """The spec's named values (``method``, ``label_fraction``, ``seed``, ``split_index``: their
    base values, or an axis's or a linked group's values), its list axes in grid order and its
    linked groups. ``repeats``: ``split.repeats`` (the default ``split_index`` is every split)."""
    named = {
        key: _named_values(raw, key, file, default=default)
        for key, default in (
            ("method", NAMED_DEFAULTS["method"]),
            ("label_fraction", NAMED_DEFAULTS["label_fraction"]),
            ("seed", NAMED_DEFAULTS["seed"]),
            ("split_index", list(range(repeats))),
        )
    }

    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise SpecError(f"{file}: grid: must be a mapping of dotted paths to lists, got {grid!r}")
    linked = _linked_groups(raw, grid, file)
    linked_keys = {key for keys, _ in linked for key in keys}
    axes: list[tuple[str, tuple[Any, ...]]] = []
    for key in raw:  # top-level lists become axes, in file order
        axis = next((a for a, k in NAMED_AXES.items() if k == key), None)
        if axis is not None and isinstance(raw[key], list):
            axes.append((axis, tuple(raw[key])))
    if (
        "split_index" not in raw
        and "split" not in grid
        and "split" not in linked_keys
        and len(named["split_index"]) > 1
    ):
        axes.append(("split", tuple(named["split_index"])))  # default: every split is an axis
    for path, values in grid.items():
        path = str(path)
        _check_grid_path(path, file)
        values = _axis_values(values, f"grid.{path}", file)
        if not isinstance(values, list) or not values:
            raise SpecError(f"{file}: grid.{path}: must be a non-empty list, got {values!r}")
        if path in NAMED_AXES and NAMED_AXES[path] in raw:
            raise SpecError(
                f"{file}: grid.{path}: also given at the top level as {NAMED_AXES[path]}; give it in one place"
            )
        axes.append((path, tuple(parse_number(v) for v in values)))  # 1e-4 is a number
    for axis_name, values in axes:
        if axis_name in NAMED_AXES:
            named[NAMED_AXES[axis_name]] = list(values)
        if len({_canonical(v) for v in values}) != len(values):
            label = (
                f"grid.{axis_name}" if axis_name in grid else NAMED_AXES.get(axis_name, axis_name)
            )
            raise SpecError(f"{file}: {label}: repeated values in {list(values)!r}")
    # a named value that a linked group sets takes that group's values
    for keys, cases in linked:
        for index, key in enumerate(keys):
            if key in NAMED_AXES:
                distinct: dict[str, Any] = {}
                for case in cases:
                    distinct.setdefault(_canonical(case[index]), case[index])
                named[NAMED_AXES[key]] = list(distinct.values())
    return named, tuple(axes), linked


def _named_values(raw: Mapping[str, Any], key: str, file: str, default: Any) -> list[Any]:
    value = raw.get(key, default)
    values = _as_list(value)
    if not values:
        raise SpecError(f"{file}: {key}: must not be an empty list")
    return values


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _check_grid_path(path: str, file: str, label: str | None = None) -> None:
    """Raise unless ``path`` is a named axis or ``<section>.<field>`` of a known config; the
    error names ``label`` (default ``grid.<path>``)."""
    label = label or f"grid.{path}"
    if path in NAMED_AXES:
        return
    section, _, leaf = path.rpartition(".")
    sections = config_sections()
    if section in sections:
        known = {f.name for f in dataclasses.fields(sections[section])}
        if leaf in known:
            return
        raise SpecError(f"{file}: {label}: {section}: {unknown_key(leaf, sorted(known))}")
    raise SpecError(
        f"{file}: {label}: unknown path (use method, label_fraction, seed, split, or "
        f"<section>.<key> with section one of {', '.join(sections)})"
    )


def _tune_form(value: Any) -> str | None:
    """The Ray Tune search-space function a mapping spells (``grid_search`` for
    ``{grid_search: [...]}``, ``uniform`` for ``{uniform: [0, 1]}``, ...), else None."""
    if isinstance(value, dict):
        if "grid_search" in value:
            return "grid_search"
        if len(value) == 1 and (name := str(next(iter(value)))) in TUNE_SAMPLERS:
            return name
    return None


def _axis_values(value: Any, key: str, file: str) -> Any:
    """``value`` as written where a list makes an axis, with Ray Tune's ``{grid_search: [...]}``
    read as the list it holds; Tune's random samplers refused (a sweep here is a grid)."""
    form = _tune_form(value)
    if form is None:
        return value
    if form != "grid_search":
        raise SpecError(
            f"{file}: {key}: {form} samples at random (a Ray Tune search space); semicon-sweep "
            "runs grids: write a list of values or {grid_search: [...]}"
        )
    if len(value) > 1:
        others = ", ".join(str(k) for k in value if k != "grid_search")
        raise SpecError(f"{file}: {key}: grid_search: must be the mapping's only key, got {others}")
    values = value["grid_search"]
    if not isinstance(values, list) or not values:
        raise SpecError(f"{file}: {key}: grid_search: must be a non-empty list, got {values!r}")
    return values


def _refuse_search_spaces(data: Mapping[str, Any], section: str, file: str) -> None:
    """A setting of a section written as a Ray Tune search space: one line saying where axes go
    (instead of the type error its config would give)."""
    for name, value in data.items():
        key = f"{section}.{name}"
        if (form := _tune_form(value)) is not None:
            raise SpecError(
                f"{file}: {key}: {form} here: a section holds one value per setting; vary it "
                "under grid (a list or {grid_search: [...]}) or linked"
            )
        if isinstance(value, dict):
            _refuse_search_spaces(value, key, file)


def _linked_groups(
    raw: Mapping[str, Any], grid: Mapping[Any, Any], file: str
) -> tuple[LinkedGroup, ...]:
    """The ``linked`` section: a non-empty list of groups, each a non-empty list of cases, each
    a mapping of keys ``grid`` accepts to one value. Every case of a group names the same keys;
    a key is in one group only, and neither a ``grid`` axis nor a top-level value. Values are
    validated later, with the grid's (``_check_points``)."""
    value = raw.get("linked")
    if value is None:
        return ()
    cases_are = "cases (mappings of dotted keys to one value each)"
    if not isinstance(value, list) or not value:
        raise SpecError(
            f"{file}: linked: must be a non-empty list of groups, each a list of {cases_are}, "
            f"got {value!r}"
        )
    owner: dict[str, int] = {}  # key -> the group that varies it
    groups: list[LinkedGroup] = []
    for i, group in enumerate(value):
        where = f"linked[{i}]"
        if not isinstance(group, list) or not group:
            raise SpecError(
                f"{file}: {where}: must be a non-empty list of {cases_are}, got {group!r}"
            )
        keys: tuple[str, ...] = ()
        cases: list[tuple[Any, ...]] = []
        for j, case in enumerate(group):
            at = f"{where}[{j}]"
            if not isinstance(case, dict) or not case:
                raise SpecError(
                    f"{file}: {at}: must be a non-empty mapping of dotted keys to values, "
                    f"got {case!r}"
                )
            case = {str(k): v for k, v in case.items()}
            for key in case:
                if key not in keys:
                    _check_linked_key(key, f"{where}.{key}", raw, grid, owner, file)
            if j == 0:
                keys = tuple(case)
            elif set(case) != set(keys):
                missing = [k for k in keys if k not in case]
                extra = [k for k in case if k not in keys]
                detail = "; ".join(
                    part
                    for part in (
                        f"missing {', '.join(missing)}" if missing else "",
                        f"{', '.join(extra)} not in the first" if extra else "",
                    )
                    if part
                )
                raise SpecError(
                    f"{file}: {at}: every case of a group names the keys of its first "
                    f"({', '.join(keys)}); {detail}"
                )
            cases.append(tuple(_case_value(case[k], f"{at}.{k}", file) for k in keys))
        if len({_canonical(c) for c in cases}) != len(cases):
            written = [dict(zip(keys, c, strict=True)) for c in cases]
            raise SpecError(f"{file}: {where}: repeated cases in {written!r}")
        owner.update(dict.fromkeys(keys, i))
        groups.append((keys, tuple(cases)))
    return tuple(groups)


def _check_linked_key(
    key: str,
    label: str,
    raw: Mapping[str, Any],
    grid: Mapping[Any, Any],
    owner: Mapping[str, int],
    file: str,
) -> None:
    """Raise unless ``key`` is a grid key that no other group, grid axis or top-level value
    sets; the error names ``label`` (``linked[i].<key>``)."""
    _check_grid_path(key, file, label)
    if key in owner:
        raise SpecError(f"{file}: {label}: also in linked[{owner[key]}]; a key varies in one group")
    if key in {str(path) for path in grid}:
        raise SpecError(f"{file}: {label}: also a grid axis (grid.{key}); give it in one place")
    if key in NAMED_AXES and NAMED_AXES[key] in raw:
        raise SpecError(
            f"{file}: {label}: also given at the top level as {NAMED_AXES[key]}; give it in one place"
        )


def _case_value(value: Any, key: str, file: str) -> Any:
    """One value of a linked case (``1e-4`` as a number); a search space refused."""
    if (form := _tune_form(value)) is not None:
        raise SpecError(
            f"{file}: {key}: {form} here: a case gives one value per key; write each value "
            "as a case of its own"
        )
    return parse_number(value)
