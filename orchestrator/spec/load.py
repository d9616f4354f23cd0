"""Reading a spec file: safe YAML that refuses a key written twice, ``${VAR}`` expanded from the
environment, malformed YAML as one ``SpecError`` line naming the line; then ``build._build``.

``spec_from_mapping`` enters at the same place with data already parsed (``sweep.json``)."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from orchestrator.spec.build import _build
from orchestrator.spec.errors import MAX_TRIALS, SpecError
from orchestrator.spec.points import Spec


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


_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


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
