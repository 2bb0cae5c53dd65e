"""The books a server holds, for its web page and book API (docs/serving.md).

An uploaded book's text is kept in the cache, in memory/books/ beside the memory files (ID.txt, and
ID.json with what the listing shows), so a book can be picked again after a restart. Its compression runs
as a job in a thread of its own; any number of clients watch the job's progress, and a second upload of
the same book joins the job instead of starting another. The memory file it writes is the one a
conversation about the book reads (store.memory_file.load_or_compress), so asking starts at once.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from uio_gguf import atomic
from uio_gguf.cache import memory_dir
from uio_gguf.errors import UIOError
from uio_gguf.llamacpp.template import document_tokens
from uio_gguf.store import memory_file
from uio_gguf.text.book import DEFAULT_MAX_UPLOAD_MB, book_text

FIRST_LINE_CHARS = 120  # of a book's first line, what the listing shows


class UnknownBook(UIOError):
    pass


class NoRoom(UIOError):
    """The server could not keep an upload (a full or read-only disk)."""


class Cancelled(Exception):
    """Raised inside a compression (from its progress callback) that a client cancelled, or when the
    server stops: its message says which."""


@dataclass
class Job:
    """One book's compression: tokens done of total, and how it ended."""

    total: int
    done: int = 0
    state: str = "compressing"  # then ready, cancelled or failed
    message: str = ""
    started: float = field(default_factory=time.perf_counter)
    cancel: threading.Event = field(default_factory=threading.Event)

    def progress(self) -> dict:
        seconds = time.perf_counter() - self.started
        rate = self.done / seconds if self.done and seconds > 0 else None
        left = (self.total - self.done) / rate if rate else None
        return {"done": self.done, "total": self.total, "tokens_per_second": rate, "seconds_left": left}


class Library:
    """The books of one runtime (its bundle): upload, compress, list. Thread-safe."""

    def __init__(
        self,
        runtime,
        n_ctx: int | None = None,
        max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
        stopping: threading.Event | None = None,
    ):
        """stopping: set when the server is told to stop; running compressions end at their next batch."""
        self.runtime, self.n_ctx = runtime, n_ctx
        self.stopping = stopping or threading.Event()
        self.max_upload_mb = max_upload_mb
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        bundle = runtime.bundle
        self.bundle_id = _digest(bundle.model_fingerprint, bundle.head_fingerprint, str(bundle.segment))
        self.jobs: dict[str, Job] = {}
        self._lock = threading.Lock()

    @staticmethod
    def folder() -> Path:
        return memory_dir() / "books"  # read each time: the cache's place comes from the environment

    # ----- adding and opening -----------------------------------------------------------------------
    def check_size(self, n_bytes: int) -> None:
        """The upload limit; its message names it."""
        if n_bytes > self.max_upload_bytes:
            raise UIOError(
                f"the upload is {n_bytes / 2**20:.1f} MB, over this server's limit of {self.max_upload_mb:g} MB "
                "(uio-gguf serve --max-upload-mb)"
            )

    def add(self, data: bytes, name: str) -> dict:
        """Reads an upload as the CLI reads a book file (the same one-line errors), keeps its text and
        starts its compression unless its memory file is there. Returns the book (describe())."""
        self.check_size(len(data))
        text = book_text(data, name).rstrip()  # the chat puts the question after a blank line
        tokens = document_tokens(self.runtime.model, text)
        self.runtime.check_length(len(tokens), self.n_ctx)
        book_id = _digest(self.bundle_id, text)[:24]
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / f"{book_id}.json").is_file():
            key, _path = memory_file.locate(self.runtime, self._compressed(tokens))
            first_line = next((line.strip() for line in text.splitlines() if line.strip()), "")
            meta = {
                "id": book_id,
                "name": name,
                "first_line": first_line[:FIRST_LINE_CHARS],
                "tokens": len(tokens),
                "compressed_tokens": len(tokens) // self.runtime.segment * self.runtime.segment,
                "ratio": self.runtime.bundle.ratio,
                "bundle": self.bundle_id,
                "memory_key": key,
                "added": time.time(),
            }
            text_path = folder / f"{book_id}.txt"
            try:
                _write(text_path, text)
                _write(folder / f"{book_id}.json", json.dumps(meta))  # last: a book is listed once its text is there
            except OSError as err:  # atomic writes: nothing half-written is left
                text_path.unlink(missing_ok=True)  # nor a text that no listing names
                raise NoRoom(f"the server cannot keep the book: {err.strerror or err}") from None
        return self.open(book_id)

    def open(self, book_id: str) -> dict:
        """Starts the book's compression unless its memory file is there or a job already runs for it."""
        meta = self.meta(book_id)
        with self._lock:
            job = self.jobs.get(book_id)
            if (job is None or job.state != "compressing") and not self._has_memory(meta):
                job = self.jobs[book_id] = Job(total=meta["compressed_tokens"])
                threading.Thread(target=self._compress, args=(book_id, job), daemon=True).start()
        return self.describe(book_id)

    def _compress(self, book_id: str, job: Job) -> None:
        def progress(n_segments: int) -> None:  # after each batch the encoder compressed
            job.done += n_segments * self.runtime.segment
            check()

        def check() -> None:
            if job.cancel.is_set():
                raise Cancelled("the compression was cancelled")
            if self.stopping.is_set():
                raise Cancelled("the server stopped before the compression ended")

        try:
            check()
            job.started = time.perf_counter()
            tokens = self._compressed(document_tokens(self.runtime.model, self.text(book_id)))
            memory_file.load_or_compress(self.runtime, tokens, progress=progress)
            job.state = "ready"
        except Cancelled as stop:
            job.state, job.message = "cancelled", str(stop)
        except Exception as err:  # reported on the book's events, never lost in a thread
            job.state, job.message = "failed", str(err)

    def cancel(self, book_id: str) -> dict:
        self.meta(book_id)
        job = self.jobs.get(book_id)
        if job is not None and job.state == "compressing":
            job.cancel.set()
        return self.describe(book_id)

    # ----- reading ----------------------------------------------------------------------------------
    def meta(self, book_id: str) -> dict:
        path = self.folder() / f"{book_id}.json"
        try:
            meta = json.loads(path.read_text(encoding="utf-8")) if _is_id(book_id) else None
        except (OSError, ValueError):
            meta = None
        if meta is None or meta.get("bundle") != self.bundle_id:
            raise UnknownBook(f"no book with id {book_id!r} on this server (GET /v1/books lists them)")
        return meta

    def text(self, book_id: str) -> str:
        self.meta(book_id)
        return (self.folder() / f"{book_id}.txt").read_text(encoding="utf-8")

    def _compressed(self, tokens):
        """The book's full segments: what its memory file holds (the rest is read as text)."""
        return tokens[: len(tokens) // self.runtime.segment * self.runtime.segment]

    def busy(self, book_id: str) -> Job | None:
        """The job compressing the book now, if any."""
        job = self.jobs.get(book_id)
        return job if job is not None and job.state == "compressing" else None

    def _has_memory(self, meta: dict) -> bool:
        if meta["compressed_tokens"] == 0:  # shorter than a segment: read as text, nothing to compress
            return True
        return memory_file.stored_checksum(memory_file.path_for(meta["memory_key"]), meta["memory_key"]) is not None

    def describe(self, book_id: str) -> dict:
        """The book as the API shows it: its listing fields, its state and its compression's progress."""
        meta = self.meta(book_id)
        job = self.jobs.get(book_id)
        path = memory_file.path_for(meta["memory_key"])
        ready = self._has_memory(meta)
        if job is not None and job.state == "compressing":
            state = "compressing"
        elif ready:
            state = "ready"
        elif job is not None:
            state = job.state  # cancelled or failed
        else:
            state = "not compressed"  # its memory file was trimmed from the cache: opening compresses it again
        stat = path.stat() if ready and path.is_file() else None
        progress = job.progress() if job is not None else {"done": 0, "total": meta["compressed_tokens"]}
        if state == "ready":
            progress.update(done=meta["compressed_tokens"], total=meta["compressed_tokens"], seconds_left=0)
        return {
            "id": book_id,
            "object": "book",
            "name": meta["name"],
            "first_line": meta["first_line"],
            "tokens": meta["tokens"],
            "ratio": meta["ratio"],
            "size_bytes": stat.st_size if stat else 0,
            "last_used": stat.st_mtime if stat else meta["added"],
            "state": state,
            "message": job.message if job is not None and state in ("cancelled", "failed") else "",
            "progress": progress,
        }

    def list(self) -> list[dict]:
        """The books of this bundle, the most recently used first."""
        books = []
        for path in self.folder().glob("*.json"):
            try:
                books.append(self.describe(path.stem))
            except (UIOError, KeyError):  # another bundle's book, or a file being written
                continue
        return sorted(books, key=lambda b: -b["last_used"])


def _write(path: Path, text: str) -> None:
    with atomic.atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def _digest(*parts: str) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode("utf-8") + b"\0")
    return digest.hexdigest()


def _is_id(text: str) -> bool:
    """Only hex ids name files: a request cannot reach outside the books folder."""
    return 0 < len(text) <= 64 and all(c in "0123456789abcdef" for c in text)
