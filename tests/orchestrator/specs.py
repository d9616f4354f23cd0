"""Spec files for the orchestrator's tests: a test's YAML text written to a file (and loaded), and
``CLI_SPEC``, the small synthetic sweep the CLI tests launch (8 trials: two methods, two label
fractions, two seeds)."""

from __future__ import annotations

import textwrap
from pathlib import Path

from orchestrator.spec import Spec, load_spec

CLI_SPEC = """
name: cli-test
dataset: {kind: synthetic, image_size: 32, synthetic_cases: 8}
model: {base_channels: 4, depth: 2}
method: [global, global+local_block]
label_fraction: [0.2, 0.5]
seed: [0, 1]
stages:
  local: {block_size: 8}
"""


def write_spec(folder: Path, text: str = CLI_SPEC, name: str = "spec.yaml") -> Path:
    """``text``, dedented, at ``folder/name``."""
    path = folder / name
    path.write_text(textwrap.dedent(text))
    return path


def spec_of(folder: Path, text: str, name: str = "spec.yaml", storage: str = "storage") -> Spec:
    """``text`` written to ``folder/name`` (``write_spec``) and loaded with its storage at
    ``folder/storage``."""
    return load_spec(write_spec(folder, text, name), overrides={"storage": str(folder / storage)})
