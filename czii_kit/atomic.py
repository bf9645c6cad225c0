"""File helpers: atomic output (write to a temporary sibling, then rename; never overwrite silently), JSON side-cars."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from czii_kit.errors import DataError, FileExistsNoForce


def atomic_write(path: str | Path, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp_path)`` then move ``tmp_path`` onto ``path`` in one rename.

    Raises
    ------
    FileExistsNoForce
        If ``path`` exists and ``overwrite`` is false.
    """
    path = check_out_path(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def check_out_path(out: str | Path, force: bool = False, folder: bool = False) -> Path:
    """Check an output path before any work: ``out`` as a :class:`~pathlib.Path`.

    A file output (``folder=False``) may not be an existing folder, with or without ``force``, nor
    an existing file unless ``force``; a folder output may not be an existing file. Neither may sit
    below an existing file.

    Raises
    ------
    DataError
        ``out`` is a folder where a file is wanted (or the reverse), or a parent is a file.
    FileExistsNoForce
        ``out`` is an existing file and ``force`` is false.
    """
    out = Path(out)
    if folder:
        if out.exists() and not out.is_dir():
            raise DataError(out, "is a file; --out must name a folder (new, or one this command made before)")
    elif out.is_dir():
        raise DataError(out, "is a folder; --out must name a file, e.g. "
                             f"{out / 'submission.csv'} (a folder is never replaced, even with --force)")
    elif out.exists() and not force:
        raise FileExistsNoForce(f"{out}: already exists (use --force / overwrite=True to replace it)")
    parent = next((p for p in out.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise DataError(out, f"cannot be written: {parent} is a file, not a folder")
    return out


def atomic_write_text(path: str | Path, text: str, overwrite: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), overwrite)


@contextmanager
def atomic_dir(path: str | Path):
    """Build a folder in a temporary sibling and move it onto ``path`` only when the block succeeds.

    Yields the temporary folder (created). An existing ``path`` is replaced at the end; callers
    decide beforehand whether that is allowed. On error the temporary folder is removed and
    ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        tmp.rename(path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_json(path: str | Path) -> dict:
    """A JSON side-car file as a dict: ``{}`` when it does not exist, :class:`DataError` when malformed."""
    p = Path(path)
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(p, f"not valid JSON ({exc})") from exc
