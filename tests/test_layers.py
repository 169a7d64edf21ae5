"""The import contract (pyproject.toml, [tool.importlinter]) holds, and it can fail.

Two contracts, run by import-linter: the layers (scripts > course_transformer.cli > course_transformer.commands >
evaluation > course_transformer.core > modeling, each importing only the layers below it) and the remote-code rule
(the three files a Hub folder carries import nothing of ours but each other, and no third-party package but torch
and transformers). import-linter can only forbid named packages, so the rule is also checked here in full on the
same import graph: stdlib, torch and transformers, nothing else. The CLI imports its commands by name
(importlib), which no import graph sees; those names are checked against the layers here too.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import grimp
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
CONTRACTS = {contract["id"]: contract for contract in CONFIG["contracts"]}
REMOTE_CODE = CONTRACTS["remote-code"]["source_modules"]
ALLOWED_THIRD_PARTY = {"torch", "transformers"}


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the config in `cwd`, importing the packages found in `cwd` (it puts cwd first)."""
    command = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    return subprocess.run(
        [sys.executable, "-c", command, "--no-cache", "--no-logo"],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
    )


def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*CONFIG["root_packages"], include_external_packages=True, cache_dir=None)


def third_party(modules) -> set[str]:
    ours = set(CONFIG["root_packages"])
    roots = {module.split(".")[0] for module in modules}
    return roots - ours - set(sys.stdlib_module_names)


def test_contracts_are_kept():
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"Contracts: {len(CONTRACTS)} kept, 0 broken." in result.stdout, result.stdout
    flat = " ".join(result.stdout.split())  # the report wraps long contract names
    for contract in CONTRACTS.values():
        assert f"{' '.join(contract['name'].split())} KEPT" in flat, result.stdout


def test_remote_code_imports_only_each_other_torch_and_transformers():
    imports = graph()
    for module in REMOTE_CODE:
        direct = imports.find_modules_directly_imported_by(module)
        ours = {name for name in direct if name.split(".")[0] in CONFIG["root_packages"]}
        assert ours <= set(REMOTE_CODE), f"{module} imports {sorted(ours - set(REMOTE_CODE))}"
        assert third_party(direct) <= ALLOWED_THIRD_PARTY, f"{module} imports {sorted(third_party(direct))}"


def test_remote_code_contract_names_every_third_party_package_the_project_imports():
    """The forbidden list is how import-linter says "only torch and transformers": it must not fall behind."""
    forbidden = set(CONTRACTS["remote-code"]["forbidden_modules"])
    imported = third_party(graph().modules) - ALLOWED_THIRD_PARTY
    assert imported <= forbidden, f"add to the remote-code contract: {sorted(imported - forbidden)}"


def test_commands_the_cli_imports_by_name_sit_below_it():
    from course_transformer.cli import COMMANDS

    below = ("course_transformer.commands.", "evaluation.", "course_transformer.core.")
    for name, command in COMMANDS.items():
        for module in command.modules:
            assert module.startswith(below), f"{name}: {module} is not below course_transformer.cli"


def copy_project(tmp_path: Path) -> Path:
    for package in CONFIG["root_packages"]:
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def plant(path: Path, line: str) -> None:
    """Append an import at module level (after the code, so the file still parses as before)."""
    path.write_text(path.read_text() + f"\n{line}  # planted by tests/test_layers.py\n")


@pytest.mark.parametrize(
    ("file", "line", "broken", "message"),
    [
        # Upward: the model family importing the command line.
        (
            "modeling/presets.py",
            "import course_transformer.cli",
            "layers",
            "modeling.presets -> course_transformer.cli",
        ),
        # Upward from the bottom of the tools: core importing a command.
        (
            "course_transformer/core/checkpoint.py",
            "from course_transformer.commands import generate",
            "layers",
            "course_transformer.core.checkpoint -> course_transformer.commands.generate",
        ),
        # A third-party package the Hub folder's code may not need.
        (
            "modeling/modeling_course_transformer.py",
            "import numpy",
            "remote-code",
            "modeling.modeling_course_transformer is not allowed to import numpy",
        ),
        # The remote code importing our registration (which a Hub folder does not carry).
        (
            "modeling/configuration_course_transformer.py",
            "import modeling.presets",
            "remote-code",
            "modeling.configuration_course_transformer is not allowed to import modeling.presets",
        ),
    ],
)
def test_a_planted_import_breaks_the_contract(tmp_path, file, line, broken, message):
    project = copy_project(tmp_path)
    plant(project / file, line)
    result = lint_imports(project)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "1 kept, 1 broken." in output, output
    flat = " ".join(output.split())
    assert f"{' '.join(CONTRACTS[broken]['name'].split())} BROKEN" in flat, output
    assert message in flat, output
