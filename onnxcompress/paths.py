"""Output paths checked before any work starts, so a bad one fails in a second instead of after a
long run, and nothing is written when any of them is bad."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from .errors import OutputPathError


def check_outputs(outputs: Mapping[str, str | os.PathLike | None], inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Each output (option name -> path; None when not asked for) must be a file in an existing,
    writable folder, must not be one of `inputs`, and must differ from the other outputs."""
    inputs = [Path(p) for p in inputs]
    seen: dict[Path, str] = {}
    for option, path in outputs.items():
        if path is None:
            continue
        path = Path(path)
        check_output_file(option, path, inputs)
        key = path.resolve()
        if key in seen:
            raise OutputPathError(f"{option} {path}: the same file as {seen[key]}; give each output its own path")
        seen[key] = option


def check_output_file(option: str, path: Path, inputs: Iterable[Path] = ()) -> None:
    """`path` can be written as a new or replaced file (see check_outputs)."""
    if path.is_dir():
        raise OutputPathError(f"{option} {path}: is a directory; give a file name")
    for source in inputs:
        if _same_file(path, source):
            raise OutputPathError(f"{option} {path}: would overwrite the input {source}; choose another path")
    check_output_folder(option, path.parent if str(path.parent) else Path("."), what="folder")


def check_output_folder(option: str, folder: Path, *, what: str = "output folder", create: bool = False) -> None:
    """`folder` exists (or, with `create`, can be made inside an existing folder) and accepts new files."""
    if create and not folder.exists():
        parent = next((p for p in folder.parents if p.exists()), Path("."))
        if not parent.is_dir():
            raise OutputPathError(f"{option} {folder}: {parent} is not a folder")
        _probe(option, parent, "folder")
        return
    if not folder.exists():
        raise OutputPathError(f"{option}: {what} {folder} does not exist")
    if not folder.is_dir():
        raise OutputPathError(f"{option}: {folder} is not a folder")
    _probe(option, folder, what)


def _probe(option: str, folder: Path, what: str) -> None:
    """Create and remove a file: the only test that holds for root, read-only mounts and ACLs alike."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".onnxcompress-check-")
    except OSError as exc:
        raise OutputPathError(f"{option}: cannot write to {what} {folder} ({exc.strerror or exc})") from None
    os.close(fd)
    os.remove(name)


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False
