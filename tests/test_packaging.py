"""The wheel a user installs: three top-level packages (no generic `scripts`, no `tests`), the model presets and
the metric modules inside as package data, and the `course-transformer` console script.

The wheel is built from a copy of the project in tmp_path (pip wheel, no dependencies, no build isolation: offline
and a few seconds), so nothing is written into the checkout.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"modeling", "evaluation", "course_transformer"}
COPIED = [*sorted(PACKAGES), "scripts", "tests"]  # scripts and tests are copied so that leaving them out is tested


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    source = tmp_path_factory.mktemp("source")
    for folder in COPIED:
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for file in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / file, source / file)
    out = tmp_path_factory.mktemp("wheel")
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "--no-index"]
        + ["--quiet", "-w", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = out.glob("course_transformer-*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def package_files(wheel: zipfile.ZipFile) -> set[str]:
    return {name for name in wheel.namelist() if ".dist-info/" not in name}


def test_top_level_names_are_the_three_packages(wheel):
    top_level = {name.split("/")[0] for name in package_files(wheel)}
    assert top_level == PACKAGES  # no `scripts`, no `tests`, no loose modules


def test_every_file_of_the_packages_is_inside(wheel):
    """Modules, presets (modeling/presets/*.json) and the metric modules evaluate.load reads by path."""
    on_disk = {
        path.relative_to(ROOT).as_posix()
        for package in PACKAGES
        for path in (ROOT / package).rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }
    inside = package_files(wheel)
    assert on_disk - inside == set(), "left out of the wheel"
    presets = {name for name in inside if name.startswith("modeling/presets/") and name.endswith(".json")}
    assert "modeling/presets/tiny-decoder.json" in presets and len(presets) >= 6, presets
    metrics = {name for name in inside if name.startswith("evaluation/metrics/") and name.endswith(".py")}
    assert "evaluation/metrics/attention_entropy/attention_entropy.py" in metrics and len(metrics) >= 5, metrics


def test_console_script_is_declared(wheel):
    (entry_points,) = [name for name in wheel.namelist() if name.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["console_scripts"]) == {"course-transformer": "course_transformer.cli:main"}
