"""LICENSE is the MIT licence and CITATION.cff is valid citation metadata (YAML with the
keys CFF 1.2.0 requires) that points to the CQL and Cal-QL papers."""

import re
from pathlib import Path

import yaml  # PyYAML: installed with wandb and huggingface-hub (requirements.txt)

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = ("cff-version", "message", "title", "authors")  # CFF 1.2.0 top-level keys
REFERENCE_KEYS = ("type", "title", "authors")  # required in every CFF reference


def test_license_is_mit_with_the_projects_copyright():
    text = (ROOT / "LICENSE").read_text()
    assert text.startswith("MIT License\n")
    assert "Copyright (c) 2026 The cql-calql-reference authors" in text
    assert "Permission is hereby granted, free of charge" in text
    assert 'THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND' in text


def test_citation_cff_is_valid_and_cites_both_papers():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert isinstance(cff, dict) and all(cff.get(key) for key in REQUIRED), cff.keys()
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software"
    assert cff["license"] == "MIT"
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M)
    assert str(cff["version"]) == version.group(1)
    assert all(isinstance(a, dict) and ("name" in a or "family-names" in a)
               for a in cff["authors"])
    refs = {ref["identifiers"][0]["value"]: ref for ref in cff["references"]}
    assert set(refs) == {"10.48550/arXiv.2006.04779", "10.48550/arXiv.2303.05479"}
    for ref in refs.values():
        assert all(ref.get(key) for key in REFERENCE_KEYS)
        assert ref["type"] == "conference-paper" and "NeurIPS" in ref["collection-title"]
        assert re.fullmatch(r"https://arxiv.org/abs/\d{4}\.\d{5}", ref["url"])
    cql, calql = refs["10.48550/arXiv.2006.04779"], refs["10.48550/arXiv.2303.05479"]
    family = lambda ref: [a["family-names"] for a in ref["authors"]]
    assert cql["year"] == 2020 and family(cql) == ["Kumar", "Zhou", "Tucker", "Levine"]
    assert calql["year"] == 2023 and family(calql) == [
        "Nakamoto", "Zhai", "Singh", "Sobol Mark", "Ma", "Finn", "Kumar", "Levine"]
    assert cql["title"].startswith("Conservative Q-Learning")
    assert calql["title"].startswith("Cal-QL")
