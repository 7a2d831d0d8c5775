"""The house's dependency direction, checked by import-linter over the real import graph.

The contracts live in ``pyproject.toml`` (``[tool.importlinter]``). The card's top-level rooms
(``devices/``, ``plans/``, ...) are installed as sub-packages of ``corrflow`` through setuptools'
``package-dir``; grimp (import-linter's graph builder) walks one directory per top-level package,
so the tests lay the sources out as they are installed (a copy under ``tmp_path``, mapped as
``package-dir`` maps them) and run ``lint-imports`` there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _installed_layout(target: Path) -> Path:
    """Copy every package's modules to where an installation puts them; returns ``target``."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    mapping: dict[str, Path] = {pkg: REPO / src for pkg, src in setuptools["package-dir"].items()}
    for package in setuptools["packages"]:
        source = mapping.get(package, REPO.joinpath(*package.split(".")))
        destination = target.joinpath(*package.split("."))
        destination.mkdir(parents=True, exist_ok=True)
        for module in source.glob("*.py"):
            shutil.copy(module, destination / module.name)
    shutil.copy(REPO / "pyproject.toml", target / "pyproject.toml")
    return target


def _lint_imports(layout: Path) -> subprocess.CompletedProcess[str]:
    lint = Path(sys.executable).with_name("lint-imports")
    env = {**os.environ, "PYTHONPATH": str(layout)}
    return subprocess.run(
        [str(lint), "--no-cache", "pyproject.toml"], cwd=layout, env=env, capture_output=True, text=True, timeout=600
    )


def test_every_package_of_the_source_tree_is_installed():
    """A room missing from ``packages`` would be left out of the wheel and of the contract."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = {REPO / src: pkg for pkg, src in config["package-dir"].items()}
    expected = set()
    for init in REPO.glob("**/__init__.py"):
        directory = init.parent
        if any(part.startswith(".") or part in {"tests", "benchmarks", "build"} for part in directory.relative_to(REPO).parts):
            continue
        if directory in mapped:
            expected.add(mapped[directory])
        elif directory.relative_to(REPO).parts[0] == "corrflow":
            expected.add(".".join(directory.relative_to(REPO).parts))
    assert expected <= set(config["packages"]), sorted(expected - set(config["packages"]))


def test_rooms_depend_downwards_only_and_kernels_stay_pure(tmp_path):
    result = _lint_imports(_installed_layout(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken." in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("module", "source", "contract"),
    [
        ("corrflow/config/_upstairs.py", "import corrflow.flows\n", "rooms depend downwards only"),
        ("corrflow/processing/_io.py", "import h5py\n", "kernels are pure"),
    ],
)
def test_the_contracts_catch_an_import_against_the_direction(tmp_path, module, source, contract):
    """The check is not vacuous: one import the wrong way breaks it, and the report names it."""
    layout = _installed_layout(tmp_path)
    (layout / module).write_text(source)
    result = _lint_imports(layout)
    assert result.returncode != 0
    assert f"{contract}" in result.stdout and "BROKEN" in result.stdout, result.stdout
    assert Path(module).stem in result.stdout, result.stdout
