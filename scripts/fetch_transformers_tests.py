"""Fetch transformers' own common model tests (from the sdist on PyPI) into `data/transformers-tests/`.

`tests/test_transformers_common.py` runs `ModelTesterMixin`, `TrainingTesterMixin` and `ConfigTester` against the
course Transformer. Those classes live in transformers' `tests/` folder, which the wheel does not install; the
sdist of the installed version ships the top-level `tests/*.py` files. This script:

1. downloads that sdist with `pip download --no-deps --no-binary :all: transformers==<installed version>`
   (or reads a local copy given with `--sdist`);
2. reads `tests/test_modeling_common.py`, `tests/test_configuration_common.py` and `tests/test_training_mixin.py`
   and, following their imports from `tests.` (relative `from .x import` or absolute `tests.x`) recursively, every
   top-level `tests/*.py` file they need; imports of `tests.` modules that the sdist does not ship are recorded in
   the marker (5.23.0: `tests.exporters.test_export`, `tests.generation.test_utils`,
   `tests.utils.test_configuration_utils`), and the test module decides what to do about each;
3. writes them with an empty `tests/__init__.py` into a temporary folder beside the target, then renames it to
   `data/transformers-tests` (atomic: a reader never sees half a tree), with `FETCHED.json` recording the version,
   the files and the missing modules;
4. checks that the third-party test requirements of those files are importable (`parameterized`, pinned in
   the dev extra of pyproject.toml).

It is idempotent: nothing is downloaded when the marker already names the installed version and every file is
there. `data/` is git-ignored: transformers' test files never enter this repository.

    python -m scripts.fetch_transformers_tests                # what `make install` runs
    python -m scripts.fetch_transformers_tests --sdist /tmp/transformers-5.23.0.tar.gz --force
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import sys
import tarfile
import tempfile
from importlib.metadata import version as installed_version
from pathlib import Path

from course_transformer.core.io import atomic_write_dir, download_sdist

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_TARGET = ROOT / "data" / "transformers-tests"
MARKER = "FETCHED.json"
ROOT_FILES = ("test_modeling_common.py", "test_configuration_common.py", "test_training_mixin.py")
# Third-party modules imported by those files beyond the project's dependencies; the dev extra pins them
# (transformers' `testing` extra asks for parameterized>=0.9).
TEST_REQUIREMENTS = {"parameterized": "parameterized==0.9.0"}


class FetchError(RuntimeError):
    """A step failed; the message names the step."""


def _tests_imports(source: str, module: str) -> set[str]:
    """Dotted names of the `tests.` modules that `module` (e.g. `tests.test_modeling_common`) imports."""
    package = module.rsplit(".", 1)[0]  # "tests"
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            if name == "tests":  # `from . import x`: x is a module of the package
                found.update(f"tests.{alias.name}" for alias in node.names if alias.name != "*")
            elif name.startswith("tests."):
                found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name == "tests" or a.name.startswith("tests."))
    return found


def _member_for(module: str) -> str:
    """Archive path (below the sdist's top folder) of a `tests.` module: `tests.x` -> `tests/x.py`."""
    return module.replace(".", "/") + ".py"


def select_files(read) -> tuple[dict[str, bytes], list[str]]:
    """Follow the imports from ROOT_FILES. `read(relative_path)` returns the file's bytes or None if absent.
    Returns ({relative path: bytes}, [missing module names])."""
    files: dict[str, bytes] = {}
    missing: set[str] = set()
    pending = [f"tests.{name[:-3]}" for name in ROOT_FILES]
    seen: set[str] = set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = _member_for(module)
        data = read(path)
        if data is None:
            missing.add(module)
            continue
        if module.count(".") != 1:
            raise FetchError(f"step 'select': {module} is not a top-level tests/*.py file; extend the script")
        files[path] = data
        pending.extend(_tests_imports(data.decode("utf-8"), module))
    for name in ROOT_FILES:
        if f"tests/{name}" not in files:
            raise FetchError(f"step 'select': tests/{name} is not in the sdist")
    return files, sorted(missing)


def download_transformers_sdist(version: str, directory: Path) -> Path:
    print(f"downloading the transformers {version} sdist from PyPI ...", flush=True)
    try:
        return download_sdist(f"transformers=={version}", directory)
    except RuntimeError as error:
        raise FetchError(f"step 'download': {error}") from None


def read_archive(archive: Path, version: str) -> tuple[dict[str, bytes], list[str]]:
    try:
        with tarfile.open(archive) as tar:
            members = {}
            for member in tar.getmembers():
                top, _, rest = member.name.partition("/")
                if member.isfile() and top == f"transformers-{version}" and rest.startswith("tests/"):
                    members[rest] = member

            def read(path: str) -> bytes | None:
                member = members.get(path)
                return tar.extractfile(member).read() if member is not None else None

            return select_files(read)
    except (tarfile.TarError, OSError) as error:
        raise FetchError(f"step 'extract': cannot read {archive}: {error}") from error


def is_current(target: Path, version: str) -> bool:
    marker = target / MARKER
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded.get("version") == version and all((target / f).is_file() for f in recorded.get("files", []))


def write_tree(target: Path, version: str, files: dict[str, bytes], missing: list[str], source: str) -> None:
    """Write into a temporary folder beside `target`, then swap it in with renames (`atomic_write_dir`)."""

    def write(staging: Path) -> None:
        (staging / "tests").mkdir()
        (staging / "tests" / "__init__.py").write_bytes(b"")
        for path, data in files.items():
            (staging / path).write_bytes(data)
        marker = {
            "version": version,
            "source": source,
            "files": sorted(["tests/__init__.py", *files]),
            "missing_modules": missing,
        }
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")

    atomic_write_dir(target, write, overwrite=True)


def check_test_requirements() -> None:
    """The files import packages that the dev extra pins (pyproject.toml); name the missing one clearly."""
    for module, pin in TEST_REQUIREMENTS.items():
        if importlib.util.find_spec(module) is None:
            raise FetchError(f"step 'requirements': {module} is not installed; pip install -e '.[dev]' ({pin})")


def fetch(target: Path = DEFAULT_TARGET, sdist: Path | None = None, force: bool = False) -> Path:
    version = installed_version("transformers")
    if not force and is_current(target, version):
        print(f"{target} already holds the tests of transformers {version}")
    else:
        if sdist is not None:
            files, missing = read_archive(Path(sdist), version)
            source = f"local copy {Path(sdist).name}"
        else:
            with tempfile.TemporaryDirectory(prefix="transformers-sdist-") as tmp:
                archive = download_transformers_sdist(version, Path(tmp))
                files, missing = read_archive(archive, version)
                source = f"PyPI sdist {archive.name}"
        write_tree(target, version, files, missing, source)
        print(f"wrote {len(files)} files of transformers {version} into {target}/tests")
        if missing:
            print(f"imported from tests. but not in the sdist: {', '.join(missing)}")
    check_test_requirements()
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.fetch_transformers_tests",
        description="Fetch transformers' common model tests (the installed version's sdist) into "
        "data/transformers-tests/tests/ for tests/test_transformers_common.py.",
    )
    parser.add_argument("--target", type=Path, default=DEFAULT_TARGET, help="destination (default: %(default)s)")
    parser.add_argument("--sdist", type=Path, help="use this local transformers-<version>.tar.gz instead of pip")
    parser.add_argument("--force", action="store_true", help="fetch again even if the marker is current")
    args = parser.parse_args(argv)
    try:
        fetch(args.target, args.sdist, args.force)
    except FetchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
