"""``semicon-sweep schema``: the spec's JSON Schema, generated from the configs and the loader.

Every shipped spec validates against it (with ``jsonschema`` when it is installed, else a
minimal check of keys, types and enums written here), a spec with an unknown key does not, and
it names every registered stage kind, top-level key and choice. Both checks run wherever they
can: the minimal one always, so it is itself tested."""

from __future__ import annotations

import copy
import dataclasses
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from orchestrator.cli import app
from orchestrator.schema import spec_schema
from orchestrator.spec import TOP_LEVEL_KEYS, UniqueKeyLoader, config_sections, spec_from_mapping
from trainers.config import field_choices
from trainers.methods import METHODS
from trainers.registry import STAGE_KINDS

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted((REPO / "search_spaces").glob("*.yaml"))

try:
    import jsonschema
except ImportError:  # the fallback below checks keys, types and enums only
    jsonschema = None


_TYPES = {
    "object": dict,
    "array": list,
    "string": str,
    "boolean": bool,
    "null": type(None),
    "integer": int,
    "number": (int, float),
}


def _minimal_errors(schema: dict[str, Any], value: Any, where: str = "") -> list[str]:
    """The subset of JSON Schema this schema uses: type, enum, anyOf, properties,
    additionalProperties, items, prefixItems, min/maxItems, required, minProperties."""
    if "anyOf" in schema:
        if all(_minimal_errors(option, value, where) for option in schema["anyOf"]):
            return [f"{where or '<top>'}: {value!r} matches no option"]
        return []
    errors = []
    if "type" in schema:
        names = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        ok = any(
            isinstance(value, _TYPES[name])
            and not (name in ("integer", "number") and isinstance(value, bool))
            for name in names
        )
        if not ok:
            return [f"{where or '<top>'}: not {names}: {value!r}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{where}: {value!r} not in {schema['enum']}")
    if isinstance(value, dict):
        props = schema.get("properties", {})
        errors += [
            f"{where}: {key} required" for key in schema.get("required", ()) if key not in value
        ]
        if len(value) < schema.get("minProperties", 0):
            errors.append(f"{where}: {len(value)} keys")
        for key, item in value.items():
            if key in props:
                errors += _minimal_errors(props[key], item, f"{where}.{key}".lstrip("."))
            elif schema.get("additionalProperties") is False:
                errors.append(f"{where}.{key}".lstrip(".") + ": unknown key")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", 1 << 30):
            errors.append(f"{where}: {len(value)} items")
        for index, item in enumerate(value):
            prefix = schema.get("prefixItems", [])
            sub = prefix[index] if index < len(prefix) else schema.get("items", {})
            errors += _minimal_errors(sub, item, f"{where}[{index}]")
    return errors


VALIDATORS = ["minimal", "jsonschema"]


def validation_errors(spec: dict[str, Any], validator: str) -> list[str]:
    schema = spec_schema()
    if validator == "minimal":
        return _minimal_errors(schema, spec)
    if jsonschema is None:
        pytest.skip("jsonschema not installed: the minimal structural check stands in")
    checker = jsonschema.Draft202012Validator(schema)
    return [f"{'.'.join(map(str, e.path))}: {e.message}" for e in checker.iter_errors(spec)]


def load(path: Path) -> dict[str, Any]:
    return yaml.load(path.read_text(), Loader=UniqueKeyLoader)


def test_schema_is_a_valid_draft_2020_12_schema() -> None:
    schema = spec_schema()
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    if jsonschema is not None:
        jsonschema.Draft202012Validator.check_schema(schema)


@pytest.mark.parametrize("validator", VALIDATORS)
@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_spec_validates(path: Path, validator: str) -> None:
    assert validation_errors(load(path), validator) == []


def test_shipped_specs_found() -> None:
    assert len(SHIPPED) >= 5


BROKEN = {
    "top-level key": (lambda s: s.update(epochs=3), "epochs"),
    "section key": (lambda s: s.setdefault("model", {}).update(widht=8), "widht"),
    "stage kind": (lambda s: s.setdefault("stages", {}).update(pretrain={}), "pretrain"),
    "stage key": (
        lambda s: s.setdefault("stages", {}).setdefault("local", {}).update(temprature=0.1),
        "temprature",
    ),
    "augment key": (
        lambda s: s.setdefault("stages", {}).setdefault("finetune", {}).update(augment={"rot": 1}),
        "rot",
    ),
    "grid path": (lambda s: s.update(grid={"stages.local.temprature": [0.1]}), "temprature"),
    "choice": (lambda s: s.setdefault("model", {}).update(norm="layer"), "layer"),
    "method": (lambda s: s.update(method=["global", "simclr"]), "simclr"),
    "type": (lambda s: s.setdefault("split", {}).update(repeats="four"), "four"),
    "linked key": (
        lambda s: s.update(linked=[[{"stages.local.temprature": 0.1}]]),
        "temprature",
    ),
    "linked value": (lambda s: s.update(linked=[[{"model.norm": "layer"}]]), "layer"),
    "tune sampler": (
        lambda s: s.update(grid={"stages.local.temperature": {"uniform": [0.1, 1]}}),
        "uniform",
    ),
    "wandb key": (lambda s: s.update(tracking={"wandb": {"projct": "semicon"}}), "projct"),
    "wandb mode": (lambda s: s.update(tracking={"wandb": {"mode": "offlne"}}), "offlne"),
}


@pytest.mark.parametrize("validator", VALIDATORS)
def test_tracking_with_wandb_validates(validator: str) -> None:
    spec = copy.deepcopy(load(REPO / "search_spaces" / "quickstart.yaml"))
    spec["tracking"] = {"tensorboard": True, "wandb": {"project": "semicon", "mode": "offline"}}
    assert validation_errors(spec, validator) == []
    spec["tracking"]["wandb"] = None
    assert validation_errors(spec, validator) == []


@pytest.mark.parametrize("validator", VALIDATORS)
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_a_spec_with_an_unknown_key_or_value_does_not_validate(case: str, validator: str) -> None:
    spec = copy.deepcopy(load(REPO / "search_spaces" / "quickstart.yaml"))
    assert validation_errors(spec, validator) == []
    change, named = BROKEN[case]
    change(spec)
    errors = validation_errors(spec, validator)
    assert any(named in error for error in errors), errors


@pytest.mark.parametrize("validator", VALIDATORS)
def test_linked_groups_and_grid_search_validate(validator: str) -> None:
    """A spec written with ``linked`` groups and Ray Tune's ``grid_search`` (which the loader
    accepts) validates; an empty group or case, or a list in a case, does not."""
    spec = copy.deepcopy(load(REPO / "search_spaces" / "quickstart.yaml"))
    spec["method"] = {"grid_search": ["global", "global+local_block"]}
    del spec["label_fraction"], spec["seed"]  # varied below: a key lives in one place
    spec["grid"] = {"stages.local.temperature": {"grid_search": [0.1, 0.5]}, "seed": [0, 1]}
    spec["linked"] = [
        [
            {"label_fraction": 0.2, "stages.finetune.steps": 40},
            {"label_fraction": 0.5, "stages.finetune.steps": 80},
        ],
        [{"stages.local.block_size": 4}, {"stages.local.block_size": 8}],
    ]
    assert validation_errors(spec, validator) == []
    assert spec_from_mapping(spec).num_trials == 2 * 2 * 2 * 2 * 2  # and the loader takes it
    for broken in ([[]], [[{}]], [[{"stages.local.block_size": [4, 8]}]], []):
        errors = validation_errors({**spec, "linked": broken}, validator)
        assert errors, broken
    assert validation_errors({**spec, "seed": {"grid_search": []}}, validator)


def test_schema_lists_every_stage_kind_top_level_key_and_choice() -> None:
    schema = spec_schema()
    assert list(schema["properties"]) == list(TOP_LEVEL_KEYS)
    assert schema["additionalProperties"] is False and schema["required"] == ["name"]
    stages = schema["properties"]["stages"]["properties"]
    assert list(stages) == list(STAGE_KINDS)
    method = schema["properties"]["method"]["anyOf"][0]
    assert method["enum"] == list(METHODS)
    for section, cls in config_sections().items():
        props = (
            stages[section.removeprefix("stages.")]
            if section.startswith("stages.")
            else schema["properties"][section]
        )["properties"]
        assert list(props) == [f.name for f in dataclasses.fields(cls)]
        for fld in dataclasses.fields(cls):
            assert f"{section}.{fld.name}" in schema["properties"]["grid"]["properties"]
            if (choices := field_choices(fld)) is not None:
                assert props[fld.name]["enum"] == list(choices)
    local = stages["local"]["properties"]
    assert local["strategy"]["enum"] == ["full", "stride", "block"]
    assert stages["finetune"]["properties"]["regulariser"]["default"] == "none"
    assert schema["properties"]["model"]["properties"]["norm"]["enum"] == [
        "instance",
        "batch",
        "group",
        "none",
    ]


def test_schema_command_prints_it(runner: CliRunner) -> None:
    result = runner.invoke(app, ["schema"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == spec_schema()
