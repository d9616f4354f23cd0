"""LICENSE and CITATION.cff agree with pyproject.toml (version, licence) and cite the paper."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_citation_and_license_match_the_package() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()  # no tomllib: Python 3.10 is supported
    version = re.search(r'^version = "([^"]+)"$', pyproject, re.MULTILINE)
    licence = re.search(r'^license = \{ text = "([^"]+)" \}$', pyproject, re.MULTILINE)
    assert version is not None and licence is not None
    citation = yaml.safe_load((REPO / "CITATION.cff").read_text(encoding="utf-8"))
    assert citation["cff-version"] == "1.2.0"
    assert citation["version"] == version.group(1)
    assert citation["license"] == licence.group(1) == "Apache-2.0"
    (paper,) = citation["references"]
    assert paper["doi"] == "10.1007/978-3-030-87196-3_45"
    assert [a["family-names"] for a in paper["authors"]] == ["Hu", "Zeng", "Xu", "Shi"]
    license_text = (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text
