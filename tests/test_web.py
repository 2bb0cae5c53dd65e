"""The book API behind the web page (uio_gguf/serve/web.py, uio_gguf/serve/library.py), over a tiny bundle: uploads
compress in a job whose progress streams, the memory file it writes is the one a conversation computes,
a chat naming a book by id answers as the same book sent inline and reports what a Conversation run in
this process recalls. The page itself is driven in a real browser in tests/test_web_page.py."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

pytest.importorskip("fastapi")
httpx = pytest.importorskip("httpx")

from tests.helpers import cache_at, serving  # noqa: E402

SEGMENT = 64
N_CTX = 1536
KEY = "sk-test"
LIMIT_MB = 0.05  # a small upload limit, to pass it cheaply
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def served(make_tiny_bundle, tmp_path_factory):
    """(base url, UIOLlama, Library) over a tiny bundle, with a memory cache of this module's own."""
    from uio_gguf.serve.app import create_app
    from uio_gguf.serve.engine import UIOLlama

    bundle = make_tiny_bundle("llama", segment=SEGMENT, ratio=4, outtype="f32")[0]
    with cache_at(tmp_path_factory.mktemp("web-cache")), UIOLlama(bundle, n_ctx=N_CTX) as llm:
        app = create_app(llm, "tiny", api_key=KEY, max_upload_mb=LIMIT_MB)
        with serving(app) as base:
            yield base, llm, app.state.library


def upload(base: str, text: str | bytes, name: str = "book.txt") -> httpx.Response:
    data = text.encode() if isinstance(text, str) else text
    return httpx.post(f"{base}/v1/books", params={"name": name}, content=data, headers=AUTH, timeout=120)


def progress_events(base: str, book_id: str) -> list[dict]:
    """Every `progress` event of the book's stream, to its end."""
    found, event = [], None
    with httpx.stream("GET", f"{base}/v1/books/{book_id}/events", headers=AUTH, timeout=300) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("event:"):
                event = line.split(":", 1)[1].strip()
            elif line.startswith("data:") and event == "progress":
                found.append(json.loads(line.split(":", 1)[1]))
    return found


class Gate:
    """Holds the encoder's compressions until opened: a job stays running while the test looks at it
    (the compression itself is the real one)."""

    def __init__(self, encoder):
        self.encoder, self.open_ = encoder, threading.Event()
        self.inner = encoder.compress

    def __enter__(self):
        def compress(*args, **kwargs):
            assert self.open_.wait(60)
            return self.inner(*args, **kwargs)

        self.encoder.compress = compress
        return self

    def __exit__(self, *exc):
        self.open_.set()
        self.encoder.compress = self.inner


def test_an_upload_compresses_with_progress_into_the_memory_file_a_conversation_reads(served, prose):
    from uio_gguf.llamacpp.template import document_tokens
    from uio_gguf.store import memory_file
    from uio_gguf.store.memory_file import locate

    base, llm, _ = served
    text = prose[:6000]
    book = upload(base, text + "\n\n\n").json()
    assert book["state"] in ("compressing", "ready") and book["object"] == "book"
    events = progress_events(base, book["id"])
    assert events[-1]["state"] == "ready"
    done = [e["progress"]["done"] for e in events]
    assert done == sorted(done) and done[-1] == events[-1]["progress"]["total"]
    # the file the job wrote holds what the runtime computes for the book's full segments
    tokens = document_tokens(llm.runtime.model, text.rstrip())
    key, path = locate(llm.runtime, tokens[: len(tokens) // SEGMENT * SEGMENT])
    stored = memory_file.load(path, key)
    expected = llm.runtime.compress(tokens)
    assert len(stored.k) == len(tokens) // SEGMENT
    np.testing.assert_array_equal(stored.k, expected.k.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(stored.v, expected.v.astype(np.float16).astype(np.float32))
    listed = {b["id"]: b for b in httpx.get(f"{base}/v1/books", headers=AUTH).json()["data"]}
    entry = listed[book["id"]]
    assert entry["first_line"] == text.splitlines()[0].strip()
    assert entry["tokens"] == len(tokens) and entry["ratio"] == 4
    assert entry["size_bytes"] == path.stat().st_size and entry["state"] == "ready"
    assert entry["last_used"] == pytest.approx(path.stat().st_mtime)


def test_a_second_upload_joins_the_running_job_and_a_cancel_stops_it(served, prose):
    from uio_gguf.store import memory_file

    base, llm, library = served
    text = prose[6000:10000]
    with Gate(llm.runtime.encoder):
        first = upload(base, text).json()
        job = library.jobs[first["id"]]
        second = upload(base, text).json()
        assert second["id"] == first["id"] and second["state"] == "compressing"
        assert library.jobs[first["id"]] is job  # joined, not started again
        busy = httpx.post(
            f"{base}/v1/chat/completions", headers=AUTH, json={"messages": [{"role": "user", "content": "Hi?"}], "book": first["id"]}
        )  # fmt: skip
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "book_not_ready"
        assert httpx.post(f"{base}/v1/books/{first['id']}/cancel", headers=AUTH).status_code == 200
    events = progress_events(base, first["id"])
    assert events[-1]["state"] == "cancelled"
    assert not memory_file.path_for(job_key(library, first["id"])).exists()
    reopened = httpx.post(f"{base}/v1/books/{first['id']}/open", headers=AUTH).json()
    assert reopened["state"] in ("compressing", "ready")
    assert progress_events(base, first["id"])[-1]["state"] == "ready"


def test_a_compression_stops_when_the_server_stops(served, prose):
    """SIGTERM sets the app's `stopping` (serve.app.run): the book's job ends at its next batch, says why,
    and writes no memory file."""
    from uio_gguf.store import memory_file

    base, llm, library = served
    try:
        with Gate(llm.runtime.encoder):
            book = upload(base, prose[10000:13000]).json()
            library.stopping.set()
        events = progress_events(base, book["id"])
        assert events[-1]["state"] == "cancelled" and "server stopped" in events[-1]["message"]
        assert not memory_file.path_for(job_key(library, book["id"])).exists()
    finally:
        library.stopping.clear()


def test_an_upload_the_disk_cannot_hold_is_507_and_nothing_is_kept(served, prose, monkeypatch):
    """A full disk (the write fails with ENOSPC) is an OpenAI-shaped 507 with one line, no half-kept book,
    and the server goes on."""
    import errno
    import os

    from uio_gguf.serve import library as library_module

    base, _, library = served

    def full(path, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def listed() -> int:
        return len(httpx.get(f"{base}/v1/books", headers=AUTH).json()["data"])

    before = listed()
    written = library_module._write
    monkeypatch.setattr(library_module, "_write", full)
    reply = upload(base, prose[13000:16000])
    error = reply.json()["error"]
    assert reply.status_code == 507 and error["code"] == "insufficient_storage"
    assert error["message"] == "the server cannot keep the book: No space left on device"
    assert listed() == before
    texts = sorted(library.folder().glob("*.txt"))

    def full_after_the_text(path, text):  # the disk fills between the book's text and its listing
        if path.suffix == ".json":
            full(path, text)
        written(path, text)

    monkeypatch.setattr(library_module, "_write", full_after_the_text)
    assert upload(base, prose[13000:16000]).status_code == 507 and listed() == before
    assert sorted(library.folder().glob("*.txt")) == texts  # no text left behind that no listing names
    monkeypatch.undo()
    assert upload(base, prose[13000:16000]).status_code == 200 and listed() == before + 1


def job_key(library, book_id: str) -> str:
    return library.meta(book_id)["memory_key"]


def test_a_chat_naming_a_book_answers_as_the_book_sent_inline_and_shows_its_sources(served, prose):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.memory.session import SamplingParams

    base, llm, _ = served
    text = prose[10000:16000]
    book = upload(base, text).json()
    assert progress_events(base, book["id"])[-1]["state"] == "ready"
    question = "What does the nargs keyword argument mean?"
    request = {"model": "tiny", "temperature": 0, "max_tokens": 12}
    by_id = httpx.post(
        f"{base}/v1/chat/completions", headers=AUTH, timeout=120,
        json={**request, "book": book["id"], "messages": [{"role": "user", "content": question}]},
    ).json()  # fmt: skip
    inline = httpx.post(
        f"{base}/v1/chat/completions", headers=AUTH, timeout=120,
        json={**request, "messages": [{"role": "user", "content": f"{text.rstrip()}\n\n{question}"}]},
    ).json()  # fmt: skip
    answer = by_id["choices"][0]["message"]["content"]
    assert answer == inline["choices"][0]["message"]["content"] and "uio" not in inline
    with Conversation(llm.runtime, text.rstrip(), n_ctx=N_CTX, use_memory_files=False) as conv:
        assert "".join(conv.ask(question, SamplingParams(max_tokens=12))) == answer
        expected = [conv.recall.text(span) for span in conv.recalled]
        cells, full = conv.session.n_past, conv.session.tokens_seen
    report = by_id["uio"]
    assert [s["text"] for s in report["sources"]] == expected and expected
    assert all(0 <= s["place"] < s["until"] <= 1 for s in report["sources"])
    assert "nargs" in report["words"] and set(report["words"]) <= {"nargs", "keyword", "argument", "mean"}
    assert report["memory"]["cells"] == cells and report["memory"]["full_attention_cells"] == full
    assert report["memory"]["cells"] < report["memory"]["full_attention_cells"]
    # streamed: the same answer in pieces, the report on the last chunk
    pieces, last = [], None
    with httpx.stream(
        "POST", f"{base}/v1/chat/completions", headers=AUTH, timeout=120,
        json={**request, "stream": True, "book": book["id"], "messages": [{"role": "user", "content": question}]},
    ) as response:  # fmt: skip
        for line in response.iter_lines():
            if line.startswith("data:") and "[DONE]" not in line:
                last = json.loads(line.split(":", 1)[1])
                pieces.append(last["choices"][0]["delta"].get("content") or "")
    assert "".join(pieces) == answer and last["uio"]["sources"] == report["sources"]


@pytest.mark.parametrize(
    "data, name, status, message",
    [
        (bytes(range(256)) * 8, "noise.bin", 400, "noise.bin looks like a binary file, not text"),
        (b" \n\n ", "empty.txt", 400, "empty.txt is empty"),
        (b"x" * 60000, "big.txt", 413, "the upload is 0.1 MB, over this server's limit of 0.05 MB"),
    ],
)
def test_a_bad_upload_gets_one_line_naming_what_is_wrong_and_the_server_goes_on(served, data, name, status, message):
    base, _, _ = served
    response = upload(base, data, name)
    assert response.status_code == status
    error = response.json()["error"]
    assert error["message"].startswith(message) and "\n" not in error["message"]
    assert httpx.get(f"{base}/health").status_code == 200


def test_a_book_longer_than_the_model_holds_gets_the_cli_message(served, prose):
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.errors import UIOError
    from uio_gguf.text.book import book_text

    base, llm, _ = served
    text = prose[:40000]
    response = upload(base, text)
    with pytest.raises(UIOError) as cli:  # what `uio-gguf chat` says for this text
        Conversation(llm.runtime, book_text(text.encode(), "book.txt").rstrip(), n_ctx=N_CTX)
    assert response.status_code == 400 and response.json()["error"]["message"] == str(cli.value)


def test_unknown_books_are_404_and_the_book_api_needs_the_key(served):
    base, _, _ = served
    for method, path in [
        ("GET", "/v1/books/0123abcd"),
        ("GET", "/v1/books/0123abcd/events"),
        ("GET", "/v1/books/..%2Fx"),
    ]:
        response = httpx.request(method, f"{base}{path}", headers=AUTH)
        assert response.status_code == 404, path
    chat = httpx.post(
        f"{base}/v1/chat/completions",
        headers=AUTH,
        json={"messages": [{"role": "user", "content": "Hi?"}], "book": "ab"},
    )
    assert chat.status_code == 404 and chat.json()["error"]["code"] == "book_not_found"
    assert httpx.get(f"{base}/v1/books").status_code == 401
    assert httpx.post(f"{base}/v1/books", content=b"text").status_code == 401


def test_the_page_and_its_files_are_served_from_the_package_without_the_key(served):
    base, _, _ = served
    page = httpx.get(f"{base}/")
    assert page.status_code == 200 and "/page/page.js" in page.text
    assert "script-src 'self'" in page.headers["content-security-policy"]
    for name in ("page.js", "page.css"):
        served_file = httpx.get(f"{base}/page/{name}")
        assert served_file.status_code == 200
        assert "://" not in served_file.text  # nothing fetched from elsewhere (no CDN)
    assert "://" not in page.text
