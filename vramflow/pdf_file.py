"""Check a path names a PDF file vramflow may read, from its metadata and first bytes only.

Everything here runs before a byte past the header is read: a 20 GiB file over the size limit
is refused in microseconds, not after hashing it. Each kind of bad path (missing, a directory,
a FIFO, a symlink loop) gets its own one-line message, since the CLI prints it as it is.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from vramflow.errors import DocumentError, LimitExceededError, NotAPdfError

PDF_HEADER = b"%PDF-"
# Readers accept junk before the header; the PDF specification's readers look this far.
HEADER_SEARCH_BYTES = 1024


@dataclass(frozen=True)
class CheckedFile:
    """A regular file within the size limit that starts like a PDF."""

    path: Path  # resolved absolute path
    size_bytes: int


def check_file(path: str | os.PathLike[str], max_file_bytes: int) -> CheckedFile:
    """Resolve `path` and check it is a regular, non-empty PDF file within `max_file_bytes`.

    Raises `DocumentError` (or its `NotAPdfError`, `LimitExceededError`) with one clear line.
    """
    shown = Path(path).expanduser()
    info = _stat(shown)
    _check_type(shown, info.st_mode)
    if info.st_size == 0:
        raise NotAPdfError(f"{shown} is empty (0 bytes)")
    if info.st_size > max_file_bytes:
        raise LimitExceededError(
            f"{shown} is {info.st_size:,} bytes, more than the limit of {max_file_bytes:,}"
            " (VRAMFLOW_MAX_FILE_BYTES)"
        )
    resolved = shown.resolve()  # stat succeeded, so there is no loop to resolve into
    _check_header(resolved)
    return CheckedFile(resolved, info.st_size)


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)  # follows symlinks: a loop or a dangling link fails here
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise DocumentError(
                f"{path}: symbolic link loop (the link leads back to itself)"
            ) from None
        if exc.errno == errno.ENOENT:
            dangling = " (a symbolic link to a missing file)" if path.is_symlink() else ""
            raise DocumentError(f"{path}: no such file{dangling}") from None
        if exc.errno == errno.EACCES:
            raise DocumentError(f"{path}: permission denied") from None
        raise DocumentError(f"{path}: cannot read ({exc.strerror or exc})") from None


def _check_type(path: Path, mode: int) -> None:
    if stat.S_ISREG(mode):
        return
    if stat.S_ISDIR(mode):
        raise DocumentError(f"{path} is a directory, not a PDF file")
    if stat.S_ISFIFO(mode):
        raise DocumentError(f"{path} is a named pipe (FIFO), not a PDF file")
    raise DocumentError(f"{path} is not a regular file (a device or socket), not a PDF file")


def _check_header(path: Path) -> None:
    try:
        with open(path, "rb") as handle:
            head = handle.read(HEADER_SEARCH_BYTES)
    except OSError as exc:
        raise DocumentError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if PDF_HEADER not in head:
        raise NotAPdfError(f"{path} is not a PDF (no %PDF- header in its first 1024 bytes)")
