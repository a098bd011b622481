"""The process that runs pypdf for `vramflow.pdf`: opens documents and extracts page text.

Started as `python -m vramflow.pdf_worker FD`, it answers requests on a `multiprocessing`
connection over the socket FD until the parent closes it. It imports only the standard library
and pypdf, so it starts fast and stays small whatever the parent has loaded (torch, Prefect).

Requests are `(op, path, password, page_number)` tuples; replies are tuples of plain values:
- `("open", path, password, None)` -> `("opened", page_count, encrypted)`
- `("page", path, password, n)` -> `("page", text, seconds, error_type, error_message)`
- `("stats", None, None, None)` -> `("stats", {"pid": ..., "opens": ..., "cached": ...})`
- a document that cannot be opened -> `("error", kind, error_type, message)`, where kind is
  `not_pdf`, `encrypted`, `wrong_password` or `error`.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
import warnings
from collections import OrderedDict
from multiprocessing.connection import Connection
from typing import Any

from pypdf import PasswordType, PdfReader
from pypdf.errors import PyPdfError

# A 1,000-page document is parsed once per worker, not once per page; a few readers cover the
# documents a pipeline works on at once. Readers hold the whole file in memory, hence a byte cap.
CACHE_READERS = 4
CACHE_BYTES = 512 * 1024**2
MAX_MESSAGE_CHARS = 300
PARENT_CHECK_SECONDS = 1.0


class OpenRefused(Exception):
    """The document cannot be opened; `kind` tells the parent which error to raise."""

    def __init__(self, kind: str, error_type: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.error_type = error_type
        self.message = message


def one_line(exc: BaseException) -> str:
    """The exception's message on one line, shortened; its class name when it has none."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if len(text) > MAX_MESSAGE_CHARS:
        text = text[: MAX_MESSAGE_CHARS - 3] + "..."
    return text


def clean_text(text: str) -> str:
    """Text that a PostgreSQL text column accepts: no NUL characters, no lone surrogates."""
    text = text.replace("\x00", "")
    return text.encode("utf-8", "replace").decode("utf-8")


class ReaderCache:
    """Open, decrypted `PdfReader`s, least recently used first."""

    def __init__(self) -> None:
        self._readers: OrderedDict[tuple[Any, ...], tuple[PdfReader, int]] = OrderedDict()
        self.opens = 0

    def get(self, path: str, password: str | None) -> PdfReader:
        """The reader for this file as it is now on disk; a changed file is opened again."""
        info = os.stat(path)
        key = (path, info.st_mtime_ns, info.st_size, password)
        if key in self._readers:
            self._readers.move_to_end(key)
            return self._readers[key][0]
        reader = open_reader(path, password)
        self.opens += 1
        self._readers[key] = (reader, info.st_size)
        self._evict()
        return reader

    def _evict(self) -> None:
        # Always keep the newest reader, even when it alone is over the byte cap.
        while len(self._readers) > 1 and (
            len(self._readers) > CACHE_READERS
            or sum(size for _, size in self._readers.values()) > CACHE_BYTES
        ):
            self._readers.popitem(last=False)

    def __len__(self) -> int:
        return len(self._readers)


def open_reader(path: str, password: str | None) -> PdfReader:
    """Open and, when needed, decrypt a PDF; an empty user password is tried when none is given."""
    try:
        reader = PdfReader(path)
    except PyPdfError as exc:
        # pypdf found no PDF structure it can use: for the user the file is not a PDF.
        raise OpenRefused("not_pdf", type(exc).__name__, one_line(exc)) from exc
    if reader.is_encrypted and reader.decrypt(password or "") == PasswordType.NOT_DECRYPTED:
        kind = "encrypted" if password is None else "wrong_password"
        raise OpenRefused(kind, "FileNotDecryptedError", "the password does not open it")
    return reader


def extract(reader: PdfReader, page_number: int) -> tuple[str, str | None, str | None]:
    """(text, error_type, error_message) of one 1-based page; errors are returned, not raised."""
    try:
        count = len(reader.pages)
        if not 1 <= page_number <= count:
            return "", "IndexError", f"page {page_number} does not exist ({count} pages)"
        return clean_text(reader.pages[page_number - 1].extract_text()), None, None
    except Exception as exc:
        # Real files raise far more than PyPdfError here (TypeError, AssertionError, ...).
        return "", type(exc).__name__, one_line(exc)


def handle(request: tuple[Any, ...], readers: ReaderCache) -> tuple[Any, ...]:
    """Answer one request; every failure becomes a reply so the worker keeps serving."""
    op, path, password, page_number = request
    if op == "stats":
        return ("stats", {"pid": os.getpid(), "opens": readers.opens, "cached": len(readers)})
    try:
        reader = readers.get(path, password)
        if op == "open":
            return ("opened", len(reader.pages), reader.is_encrypted)
    except OpenRefused as exc:
        return ("error", exc.kind, exc.error_type, exc.message)
    except Exception as exc:
        return ("error", "error", type(exc).__name__, one_line(exc))
    started = time.perf_counter()
    text, error_type, message = extract(reader, page_number)
    return ("page", text, time.perf_counter() - started, error_type, message)


def serve(conn: Connection) -> None:
    """Answer requests until the parent closes the connection or sends None."""
    readers = ReaderCache()
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return
        if request is None:
            return
        try:
            reply = handle(request, readers)
        except Exception as exc:  # e.g. MemoryError while building the reply
            reply = ("error", "error", type(exc).__name__, one_line(exc))
        conn.send(reply)


def exit_with_parent() -> None:
    """End this process when the parent dies, even in the middle of a page that never ends."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str]) -> None:
    """Entry point: quiet pypdf, report ready, then serve the parent."""
    conn = Connection(int(argv[1]))
    # Real files make pypdf log thousands of warnings; the page outcome says what matters.
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    warnings.simplefilter("ignore")
    # Ctrl-C reaches the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    exit_with_parent()
    conn.send(("ready", os.getpid()))
    serve(conn)


if __name__ == "__main__":
    main(sys.argv)
