"""Node keys and spec hashes of the shipped specs stay what they were (golden values).

A node key names a stage's folder in every existing sweep's store: a change to it silently
reruns (or orphans) finished work, and a changed ``spec_hash`` makes ``launch`` refuse a
sweep's own storage. ``golden/keys.json`` records, for every spec in ``search_spaces/`` (plus
``golden/all_methods.yaml``, which touches every method), the ``spec_hash`` and each trial's
stage -> node key. Specs on real data need ``../shared/data`` to fingerprint the files; they
skip with a visible reason when it is absent.

Regenerate (only for a deliberate, announced key change)::

    SEMICON_DATA=../shared/data python -m tests.orchestrator.test_golden_keys
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest

from orchestrator.plan import build_plan
from orchestrator.spec import load_spec

REPO = Path(__file__).resolve().parents[2]
GOLDEN = Path(__file__).resolve().parent / "golden"
FIXTURE = GOLDEN / "keys.json"
SHARED_DATA = REPO.parent / "shared" / "data"
SPECS = sorted(
    [p.relative_to(REPO).as_posix() for p in (REPO / "search_spaces").glob("*.yaml")]
    + [(GOLDEN / "all_methods.yaml").relative_to(REPO).as_posix()]
)


def needs_real_data(spec: str) -> bool:
    return "${SEMICON_DATA}" in (REPO / spec).read_text(encoding="utf-8")


def plan_keys(spec: str, storage: str) -> dict[str, Any]:
    """``{"spec_hash": ..., "trials": {trial id: {stage: node key}}}`` of ``spec``'s plan."""
    plan = build_plan(load_spec(REPO / spec, overrides={"storage": storage}))
    return {
        "spec_hash": plan.spec.spec_hash,
        "trials": {trial.trial_id: dict(trial.nodes) for trial in plan.trials},
    }


def _param(spec: str) -> Any:
    marks = [pytest.mark.realdata] if needs_real_data(spec) else []
    return pytest.param(spec, marks=marks, id=Path(spec).stem)


def test_every_shipped_spec_has_golden_keys() -> None:
    assert sorted(json.loads(FIXTURE.read_text())) == SPECS


@pytest.mark.parametrize("spec", [_param(s) for s in SPECS])
def test_node_keys_match_golden(spec: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if needs_real_data(spec):
        if not (SHARED_DATA / "Task04_Hippocampus" / "dataset.json").is_file():
            pytest.skip(
                f"{SHARED_DATA}/Task04_Hippocampus not found: {spec} fingerprints real data"
            )
        monkeypatch.setenv("SEMICON_DATA", str(SHARED_DATA))
    expected = json.loads(FIXTURE.read_text())[spec]
    assert plan_keys(spec, str(tmp_path / "storage")) == expected


if __name__ == "__main__":
    os.environ.setdefault("SEMICON_DATA", str(SHARED_DATA))
    with tempfile.TemporaryDirectory() as folder:
        golden = {spec: plan_keys(spec, str(Path(folder) / "storage")) for spec in SPECS}
    FIXTURE.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({len(golden)} specs)", file=sys.stderr)
