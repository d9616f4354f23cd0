"""The sweep specification: one YAML file, validated once here, frozen afterwards.

``load_spec(path)`` reads the YAML safely, expands ``${VAR}`` in strings from the environment,
builds the typed ``trainers.config`` objects and checks every grid point, so that a spec that
loads can be planned and run without further validation. Every error is a ``SpecError`` whose
message reads ``"<file>: <dotted.key>: <message>"``.

Layout of a spec (every section optional except ``name``)::

    name: hippocampus-ablation
    dataset:   {kind: msd, root: ${SEMICON_DATA}/Task04_Hippocampus, image_size: 64}
    split:     {train: 0.6, val: 0.2, test: 0.2, repeats: 4}
    model:     {base_channels: 64, depth: 4}
    method:    global+local_block          # a name or a list (a list is a grid axis)
    label_fraction: [0.05, 0.1, 0.2]       # a number or a list
    seed: 0                                # an integer or a list
    split_index: [0, 1, 2, 3]              # default: every split, 0 .. split.repeats - 1
    stages: {global: {...}, local: {...}, finetune: {...}}
    grid:                                  # dotted paths (or the names method, label_fraction,
      stages.local.temperature: [0.05, 0.1]  #  seed, split) -> non-empty lists
    linked:                                # settings that vary together: a list of groups,
      - - {label_fraction: 0.05, stages.finetune.steps: 1200}  # each a list of cases naming
        - {label_fraction: 0.2, stages.finetune.steps: 2400}   # the same keys
    resources: {workers_per_trial: 1, cpus_per_worker: 1, gpus_per_worker: 0,
                max_concurrent_trials: null, checkpoint_every: 1, max_failures: 1,
                nodes_per_run: 1}
    storage: results/<name>                # default; relative paths are taken from the CWD
    ray: {address: null}
    tracking: {mlflow_uri: null, tensorboard: false}

Grid axes: the top-level ``method`` / ``label_fraction`` / ``seed`` / ``split_index`` written as
lists come first (axes named ``method``, ``label_fraction``, ``seed``, ``split``), in the order
they appear in the file, then the ``grid`` entries in the order written, then the ``linked``
groups in the order written: each group is one axis whose values are its cases (a case sets all
its keys at once; the keys are the ones ``grid`` accepts, and a key lives in one place: one group,
or a grid axis, or the top level). The trials are their cartesian product. Wherever a list of
values makes an axis, Ray Tune's spelling ``{grid_search: [...]}`` means the same list; Tune's
random samplers (``{uniform: [0, 1]}``, ...) are refused: a sweep here is a grid.

Synthetic data: with ``dataset.kind: synthetic`` and no ``root``, the data is generated on
demand (deterministically from ``synthetic_cases`` and ``synthetic_seed``) into
``<storage>/cache/synthetic-c<cases>-s<seed>``, so a sweep keeps everything it produces under
its storage folder. The dataset root never enters ``spec_hash``: it is a location, and the
content it holds enters every node key through ``trainers.data.data_fingerprint``, so a sweep
resumes on another machine (or after the data moved) with the same hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from trainers.config import (
    ConfigError,
    DataConfig,
    ModelConfig,
    SplitConfig,
    StageConfigs,
    check_non_negative,
    check_non_negative_int,
    check_positive,
    check_positive_int,
    from_dict,
    hash_form,
    parse_number,
    to_dict,
    unknown_key,
)
from trainers.methods import METHODS
from trainers.point import NAMED_CHECKS, TrialPoint, spec_key
from trainers.registry import STAGE_KINDS


class SpecError(ValueError):
    """A spec that cannot be run; the message reads ``"<file>: <dotted.key>: <message>"``."""


# A grid of more trials than this is refused before any point is built (each point is checked
# and planned one by one, about 15 ms each); the CLI's --allow-large-grid lifts the limit.
MAX_TRIALS = 10_000


class GridTooLarge(SpecError):
    """The grid has more than ``max_trials`` points; ``trials`` is the count, ``axes`` the
    (name, number of values) pairs. Raised before any grid point is built."""

    def __init__(self, message: str, trials: int, axes: tuple[tuple[str, int], ...]) -> None:
        super().__init__(message)
        self.trials = trials
        self.axes = axes


class DuplicateKey(yaml.YAMLError):
    """A mapping in the YAML writes one key twice (``UniqueKeyLoader``)."""

    def __init__(self, key: str, first: int, again: int) -> None:
        super().__init__(f"{key}: written twice (lines {first} and {again})")
        self.key = key


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key written twice in one mapping (PyYAML keeps the
    last one silently). Checked on the composed node tree, so the error names the dotted key;
    keys brought in by a ``<<`` merge may be overridden as YAML allows."""

    def compose_document(self) -> yaml.Node | None:
        node = super().compose_document()
        if node is not None:
            _refuse_duplicate_keys(node, "", set())
        return node


def _refuse_duplicate_keys(node: yaml.Node, path: str, seen: set[int]) -> None:
    if id(node) in seen:  # an alias to a node already walked
        return
    seen.add(id(node))
    if isinstance(node, yaml.MappingNode):
        lines: dict[str, int] = {}
        for key_node, value_node in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(
                key_node, yaml.ScalarNode
            ):
                continue
            key = f"{path}.{key_node.value}" if path else str(key_node.value)
            line = key_node.start_mark.line + 1
            if key_node.value in lines:
                raise DuplicateKey(key, lines[key_node.value], line)
            lines[key_node.value] = line
            _refuse_duplicate_keys(value_node, key, seen)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            _refuse_duplicate_keys(item, f"{path}[{index}]", seen)


TOP_LEVEL_KEYS = (
    "name",
    "dataset",
    "split",
    "model",
    "method",
    "label_fraction",
    "seed",
    "split_index",
    "stages",
    "grid",
    "linked",
    "resources",
    "storage",
    "ray",
    "tracking",
)

# spec sections of the data and model configs; every stage kind adds ``stages.<name>``
_DATA_SECTIONS: dict[str, type] = {
    "dataset": DataConfig,
    "split": SplitConfig,
    "model": ModelConfig,
}


def config_sections() -> dict[str, type]:
    """Spec section -> config class: dataset, split, model and ``stages.<kind>``."""
    stages = {f"stages.{name}": kind.config for name, kind in STAGE_KINDS.items()}
    return {**_DATA_SECTIONS, **stages}


# A sweep's name (it names its default storage folder, results/<name>).
NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._+-]*"

# The named values' defaults when the spec leaves them out (split_index: every split, 0 ..
# split.repeats - 1).
NAMED_DEFAULTS: dict[str, Any] = {"method": "global+local_block", "label_fraction": 0.1, "seed": 0}

# Named axes: the axis name used in trials/tables -> the top-level spec key holding its values.
NAMED_AXES = {
    "method": "method",
    "label_fraction": "label_fraction",
    "seed": "seed",
    "split": "split_index",
}

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

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Resources:
    """What one trial asks of the cluster and how failures are retried.

    ``max_concurrent_trials`` = None lets the executor derive it from the cluster's resources
    and ``workers_per_trial * (cpus|gpus)_per_worker``. ``max_failures`` applies to both Tune
    (a crashed trial driver) and Train (a dead worker group, resumed from its checkpoint).
    ``nodes_per_run`` > 1: up to that many ready nodes of one stage kind (e.g. the siblings of
    a parent) run one after another in one Tune trial's Train run, paying its start-up once
    (``orchestrator.execute``); 1 (the default): one Train run per node. Never in node keys.
    """

    workers_per_trial: int = 1
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    max_concurrent_trials: int | None = None
    checkpoint_every: int = 1
    max_failures: int = 1
    nodes_per_run: int = 1

    def __post_init__(self) -> None:
        check_positive_int("resources", "workers_per_trial", self.workers_per_trial)
        check_positive("resources", "cpus_per_worker", self.cpus_per_worker)
        check_non_negative("resources", "gpus_per_worker", self.gpus_per_worker)
        if self.max_concurrent_trials is not None:
            check_positive_int("resources", "max_concurrent_trials", self.max_concurrent_trials)
        check_positive_int("resources", "checkpoint_every", self.checkpoint_every)
        check_non_negative_int("resources", "max_failures", self.max_failures)
        check_positive_int("resources", "nodes_per_run", self.nodes_per_run)
        gpus = self.gpus_per_worker
        if gpus > 1 and gpus != int(gpus):
            raise ConfigError(
                f"resources.gpus_per_worker: above 1 it must be a whole number, got {gpus!r}"
            )
        if 0 < gpus < 1 and self.workers_per_trial > 1:
            raise ConfigError(
                "resources.gpus_per_worker: a fractional GPU needs workers_per_trial: 1 "
                "(several DDP ranks at < 1 GPU can land on one GPU and NCCL then fails); "
                f"got {gpus!r} with workers_per_trial {self.workers_per_trial}"
            )


@dataclass(frozen=True)
class RayConfig:
    """``address``: None starts Ray locally; ``"auto"`` or ``"ray://host:port"`` joins a cluster."""

    address: str | None = None

    def __post_init__(self) -> None:
        if self.address is not None and (not isinstance(self.address, str) or not self.address):
            raise ConfigError(
                f"ray.address: must be a non-empty string or null, got {self.address!r}"
            )


@dataclass(frozen=True)
class TrackingConfig:
    """Optional experiment trackers fed by the executor (MLflow URI, TensorBoard event files)."""

    mlflow_uri: str | None = None
    tensorboard: bool = False

    def __post_init__(self) -> None:
        if self.mlflow_uri is not None and (
            not isinstance(self.mlflow_uri, str) or not self.mlflow_uri
        ):
            raise ConfigError(
                f"tracking.mlflow_uri: must be a non-empty string or null, got {self.mlflow_uri!r}"
            )
        if not isinstance(self.tensorboard, bool):
            raise ConfigError(
                f"tracking.tensorboard: must be true or false, got {self.tensorboard!r}"
            )


@dataclass(frozen=True)
class Spec:
    """A validated sweep specification (see the module docstring for the YAML layout).

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


def load_spec(
    path: str | os.PathLike[str],
    overrides: Mapping[str, Any] | None = None,
    max_trials: int | None = MAX_TRIALS,
) -> Spec:
    """Read, expand and validate the spec at ``path``.

    ``overrides``: optional ``{"storage": str, "address": str}`` (the CLI's ``--storage`` and
    ``--address``), applied before validation. A grid of more than ``max_trials`` points
    raises ``GridTooLarge`` before any point is built (None: no limit).
    """
    file = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise SpecError(f"{file}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise SpecError(f"{file}: unreadable ({err})") from None
    try:
        raw = yaml.load(text, Loader=UniqueKeyLoader)  # a SafeLoader subclass
    except DuplicateKey as err:
        raise SpecError(f"{file}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise SpecError(f"{file}: malformed YAML{line}: {problem}") from None
    if not isinstance(raw, dict):
        raise SpecError(f"{file}: the spec must be a mapping of sections, got {type(raw).__name__}")
    raw = _expand(raw, file, "")
    return _build(raw, file, dict(overrides or {}), check_paths=True, max_trials=max_trials)


def spec_from_mapping(
    mapping: Mapping[str, Any], source: str = "<spec>", check_paths: bool = False
) -> Spec:
    """Build a spec from already-parsed data (e.g. ``sweep.json``'s resolved spec).

    ``check_paths=False`` skips the check that an msd ``dataset.root`` exists, so a finished
    sweep can be inspected on a machine without the data.
    """
    if not isinstance(mapping, Mapping):
        raise SpecError(f"{source}: the spec must be a mapping of sections")
    return _build(dict(mapping), source, {}, check_paths=check_paths)


# --------------------------------------------------------------------------------------------
# building


def _expand(value: Any, file: str, key: str) -> Any:
    """Replace ``${VAR}`` in every string with the environment's value (unset -> SpecError)."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            var = match.group(1)
            if var not in os.environ:
                raise SpecError(f"{file}: {key or '<top>'}: environment variable {var} is not set")
            return os.environ[var]

        return _VAR.sub(substitute, value)
    if isinstance(value, dict):
        return {k: _expand(v, file, f"{key}.{k}" if key else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, file, f"{key}[{i}]") for i, v in enumerate(value)]
    return value


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


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def _map_list(function: Any, value: Any) -> Any:
    """``function`` applied to ``value``, or to each item when it is a list."""
    return [function(v) for v in value] if isinstance(value, list) else function(value)


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

    method = _named_values(raw, "method", file, default=NAMED_DEFAULTS["method"])
    label_fraction = _named_values(
        raw, "label_fraction", file, default=NAMED_DEFAULTS["label_fraction"]
    )
    seed = _named_values(raw, "seed", file, default=NAMED_DEFAULTS["seed"])
    split_index = _named_values(raw, "split_index", file, default=list(range(split.repeats)))

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
        and len(split_index) > 1
    ):
        axes.append(("split", tuple(split_index)))  # default: every split is an axis
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
        if axis_name == "method":
            method = list(values)
        elif axis_name == "label_fraction":
            label_fraction = list(values)
        elif axis_name == "seed":
            seed = list(values)
        elif axis_name == "split":
            split_index = list(values)
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
                chosen = list(distinct.values())
                if key == "method":
                    method = chosen
                elif key == "label_fraction":
                    label_fraction = chosen
                elif key == "seed":
                    seed = chosen
                else:
                    split_index = chosen

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
        method=tuple(method),
        label_fraction=tuple(label_fraction),
        seed=tuple(seed),
        split_index=tuple(split_index),
        axes=tuple(axes),
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


def _named_values(raw: Mapping[str, Any], key: str, file: str, default: Any) -> list[Any]:
    value = raw.get(key, default)
    values = _as_list(value)
    if not values:
        raise SpecError(f"{file}: {key}: must not be an empty list")
    return values


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


def _resolved(spec: Spec, for_hash: bool) -> dict[str, Any]:
    """The spec with every default filled in, as plain data.

    ``for_hash``: drop storage / ray / resources / tracking, the dataset's root (a location;
    the node keys carry the data's content fingerprint) and stage settings at their
    ``trainers.config.LATE_DEFAULTS``.
    """
    dataset = to_dict(spec.dataset)
    dataset["label_remap"] = [list(pair) for pair in spec.dataset.label_remap]
    if for_hash:
        dataset.pop("root")
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
