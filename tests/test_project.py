"""The project's own declarations agree with each other."""

import pathlib
import re

import pytest


tomllib = pytest.importorskip("tomllib")  # Python 3.11 and later


ROOT = pathlib.Path(__file__).parent.parent


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pre_commit_pins_the_dev_extras_ruff():
    dev = _pyproject()["project"]["optional-dependencies"]["dev"]
    (pin,) = [r.split("==")[1] for r in dev if r.startswith("ruff==")]
    config = (ROOT / ".pre-commit-config.yaml").read_text()
    assert f"rev: v{pin}" in config


def test_minimum_versions_are_the_declared_lower_bounds():
    """CI installs `.ci/minimum-versions.txt` and runs the fast tests against it, so
    the lower bounds pyproject declares are tested ones."""
    project = _pyproject()["project"]
    declared = {}
    for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
        match = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9.]+)", requirement)
        assert match is not None, requirement
        name, bound = match.groups()
        declared[name.lower().replace("_", "-")] = bound
    pinned = {}
    for line in (ROOT / ".ci" / "minimum-versions.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pinned[name.lower().replace("_", "-")] = version

    def release(version: str) -> tuple[int, ...]:
        return tuple(int(part) for part in [*version.split("."), "0", "0"][:3])

    assert declared.keys() <= pinned.keys()
    for name, bound in declared.items():
        assert release(pinned[name]) == release(bound), (name, bound, pinned[name])
