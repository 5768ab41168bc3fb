"""The files that install and cite the project agree with each other."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _lock() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            assert version, f"requirements.lock: {line!r} is not pinned with =="
            pins[_name(name)] = version.strip()
    return pins


def test_every_declared_dependency_is_pinned_in_the_lock():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        if extra != "kernels":  # triton: installed by the Makefile (GPU builds of torch bring their own)
            declared += requirements
    pins = _lock()
    missing = sorted({_name(r) for r in declared} - set(pins))
    assert not missing, f"pin {missing} in requirements.lock (pip freeze of the working environment)"
    assert pins["torch"] == "2.13.0" and {"jupyterlab", "captum", "ipywidgets", "jupyterlab-widgets"} <= set(pins)


def test_the_conda_environment_installs_exactly_the_lock():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    assert "-r requirements.lock" in pip and "-e ." in pip
    assert not [p for p in pip if re.match(r"^[A-Za-z]", p)], "pin packages in requirements.lock, not here"


def test_citation_file_names_the_paper():
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert cff["cff-version"] == "1.2.0" and cff["title"] and cff["authors"] and cff["message"]
    paper = cff["preferred-citation"]
    assert paper["doi"] == "10.1109/ICCV.2019.00504" and paper["year"] == 2019
    assert [a["family-names"] for a in paper["authors"]] == ["Sun", "Ravi", "Singh"]
