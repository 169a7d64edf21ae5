"""`course-transformer`: delegation to each module's main(argv), missing modules, one-line errors, --debug."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import types
from pathlib import Path

import pytest

from course_transformer import cli

ROOT = Path(__file__).resolve().parent.parent


def run(argv, capsys):
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def fake_module(monkeypatch, name: str, main=None) -> types.ModuleType:
    module = types.ModuleType(name)
    if main is not None:
        module.main = main
    monkeypatch.setitem(sys.modules, name, module)
    return module


def test_help_lists_every_command_and_its_module(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0
    for name, command in cli.COMMANDS.items():
        assert name in out and command.modules[0] in out
    assert set(cli.COMMANDS) == {
        "prepare-data",
        "train-tokenizer",
        "train",
        "generate",
        "evaluate",
        "parity",
        "visualize",
        "benchmark",
        "convert",
        "analyze",
        "explore",
        "publish",
    }


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_each_command_passes_its_arguments_to_the_module_main(monkeypatch, capsys, command):
    seen = []
    fake_module(monkeypatch, cli.COMMANDS[command].modules[0], main=lambda argv: seen.append(argv) or 0)
    code, _, err = run([command, "--flag", "value", "positional", "--", "-x"], capsys)
    assert code == 0 and err == ""
    assert seen == [["--flag", "value", "positional", "--", "-x"]]


def test_debug_is_taken_from_anywhere_and_not_passed_on(monkeypatch, capsys):
    seen = []
    fake_module(monkeypatch, "course_transformer.commands.train", main=lambda argv: seen.append(argv))
    assert run(["train", "--debug", "--steps", "3"], capsys)[0] == 0  # main returning None is success
    assert seen == [["--steps", "3"]]


def test_every_command_module_is_in_a_layer_below_the_cli():
    """Modules imported by name escape the import contract: the table itself must point only downward."""
    for name, command in cli.COMMANDS.items():
        for module in command.modules:
            assert module.startswith(tuple(f"{layer}." for layer in cli.LAYERS_BELOW)), (name, module)
    tree = ast.parse(Path(cli.__file__).read_text())
    touches_path = [n.lineno for n in ast.walk(tree) if isinstance(n, ast.Attribute) and ast.unparse(n) == "sys.path"]
    assert not touches_path, f"cli.py uses sys.path on lines {touches_path}"
    imported = [n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    imported += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [m for m in imported if m and m.split(".")[0] == "scripts"]  # scripts/ sits above the package


def test_missing_module_is_one_clear_line(monkeypatch, capsys):
    name = "course_transformer.commands.no_such_trainer"
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command("train", (name,)))
    for argv in (["train", "--steps", "3"], ["train", "--help"]):
        code, out, err = run(argv, capsys)
        assert code == 2 and out == ""
        assert err == f"course-transformer train: train is not available: module {name} not found\n"


def test_second_candidate_module_is_used_when_the_first_is_missing(monkeypatch, capsys):
    seen = []
    fake_module(monkeypatch, "evaluation.fake_bench", main=lambda argv: seen.append(argv) or 0)
    monkeypatch.setitem(
        cli.COMMANDS, "benchmark", cli.Command("b", ("evaluation.no_such_bench", "evaluation.fake_bench"))
    )
    assert run(["benchmark", "--quick"], capsys)[0] == 0 and seen == [["--quick"]]


def test_import_error_inside_a_module_is_not_reported_as_missing(tmp_path, monkeypatch, capsys):
    (tmp_path / "needs_dependency.py").write_text("import a_dependency_that_is_not_installed\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setitem(cli.COMMANDS, "train", cli.Command("train", ("needs_dependency",)))
    code, _, err = run(["train"], capsys)
    assert code == 1 and "not available" not in err
    assert "No module named 'a_dependency_that_is_not_installed'" in err and len(err.splitlines()) == 1


def test_module_without_main(monkeypatch, capsys):
    fake_module(monkeypatch, "course_transformer.commands.generate")
    code, _, err = run(["generate"], capsys)
    assert code == 2 and "module course_transformer.commands.generate has no main(argv)" in err


def test_errors_are_one_line_unless_debug(monkeypatch, capsys):
    def main(argv):
        raise ValueError("--temperature must be positive,\n  got -1")

    fake_module(monkeypatch, "course_transformer.commands.generate", main=main)
    code, _, err = run(["generate", "--temperature", "-1"], capsys)
    assert code == 1
    assert err == (
        "course-transformer generate: error: --temperature must be positive, got -1 (--debug shows the traceback)\n"
    )
    with pytest.raises(ValueError, match="must be positive"):
        cli.main(["--debug", "generate", "--temperature", "-1"])


def test_exit_status_of_the_module_is_kept(monkeypatch, capsys):
    def main(argv):
        if argv:
            raise SystemExit(4)
        return 3

    fake_module(monkeypatch, "course_transformer.commands.prepare_data", main=main)
    assert run(["prepare-data"], capsys)[0] == 3
    assert run(["prepare-data", "--bad"], capsys)[0] == 4
    fake_module(
        monkeypatch, "course_transformer.commands.train", main=lambda argv: {"run_dir": "runs/x"}
    )  # a result means success
    assert run(["train"], capsys)[0] == 0


@pytest.mark.parametrize("command", list(cli.COMMANDS))
def test_help_of_each_available_command(capsys, command):
    """Modules that exist answer --help with their usage (exit 0); missing ones say so (exit 2)."""
    try:
        cli.load_module(cli.COMMANDS[command].modules)
    except cli.ModuleUnavailable:
        pytest.skip(f"{command}: module not written yet")
    code, out, _ = run([command, "--help"], capsys)
    assert code == 0 and "usage:" in out


def test_publish_help_shows_defaults(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "200")  # argparse wraps help to the terminal width
    code, out, _ = run(["publish", "--help"], capsys)
    assert code == 0 and "--repo-id REPO_ID" in out and "(default: apache-2.0)" in out


def test_console_entry_point_in_a_subprocess():
    """`python -m course_transformer.cli` in a real process: an error is one line, without a traceback."""
    error = subprocess.run(
        [sys.executable, "-m", "course_transformer.cli", "publish", "/nonexistent/model", "--repo-id", "a/b"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert error.returncode == 1 and "Traceback" not in error.stderr
    assert error.stderr.strip().splitlines() == ["error: /nonexistent/model: not a folder"]


def test_no_script_shadows_an_installed_package():
    """`python scripts/X.py` puts scripts/ first on sys.path: a scripts/evaluate.py would then be imported as the
    `evaluate` library by every script that uses the metric modules (it once broke analyze_attention.py)."""
    from importlib.metadata import packages_distributions

    installed = set(packages_distributions())
    scripts = Path(__file__).resolve().parents[1] / "scripts"
    shadowing = sorted(p.name for p in scripts.glob("*.py") if p.stem in installed and p.stem != "scripts")
    assert not shadowing, f"scripts/ files named like installed packages: {shadowing}"


SCRIPT_FILES = sorted(  # the runnable ones: training_lib.py is a library
    p.name
    for p in (Path(__file__).resolve().parents[1] / "scripts").glob("*.py")
    if 'if __name__ == "__main__"' in p.read_text()
)


@pytest.mark.parametrize("name", SCRIPT_FILES)
def test_every_script_runs_by_path(name, tmp_path):
    """The README and docs run scripts as `python scripts/X.py`, where imports resolve differently than under
    `python -m`: each must at least parse its arguments that way, from any working directory."""
    script = Path(__file__).resolve().parents[1] / "scripts" / name
    done = subprocess.run([sys.executable, str(script), "--help"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage" in done.stdout.lower(), done.stdout[:500]
