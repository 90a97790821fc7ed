"""Writes that never leave a half-written file at the destination.

Each writer fills a temporary file in the destination's folder, flushes it to
disk and renames it into place; the rename is atomic on POSIX file systems, so
a reader or a killed process sees either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def temporary_path(destination: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `destination`; rename it there on success.

    On an exception the temporary file is removed and the destination is untouched.
    """
    destination = Path(destination)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle, name = tempfile.mkstemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent)
    os.close(handle)
    temporary = Path(name)
    try:
        yield temporary
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        # mkstemp creates the file readable by its owner only; give it the usual mode.
        os.chmod(temporary, 0o666 & ~_current_umask())
        os.replace(temporary, destination)
    finally:
        temporary.unlink(missing_ok=True)


def write_with(destination: str | os.PathLike, writer: Callable[[Path], Any]) -> None:
    """Call `writer(temporary_path)` and rename its output to `destination`."""
    with temporary_path(destination) as temporary:
        writer(temporary)


def write_bytes(destination: str | os.PathLike, data: bytes) -> None:
    write_with(destination, lambda path: path.write_bytes(data))


def write_text(destination: str | os.PathLike, text: str) -> None:
    write_with(destination, lambda path: path.write_text(text, encoding="utf-8"))


def write_json(destination: str | os.PathLike, value: Any) -> None:
    write_text(destination, json.dumps(value, indent=2) + "\n")


def append_line(destination: str | os.PathLike, line: str) -> None:
    """Append one line by rewriting the file atomically, so no torn line is ever left."""
    destination = Path(destination)
    existing = destination.read_text(encoding="utf-8") if destination.exists() else ""
    write_text(destination, existing + line.rstrip("\n") + "\n")
