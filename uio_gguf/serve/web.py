"""The web page and its book API, on the server's app (docs/serving.md).

GET / is the page (static files in uio_gguf/serve/page/, written by hand: no build step, nothing from a CDN).
The page uses only public endpoints:
- POST /v1/books: the body is the book's bytes (`?name=` its file name); the book (id, state, progress).
  Compression starts unless the book's memory file is there; a second upload of it joins the job.
- GET /v1/books: the books this server holds; GET /v1/books/{id}: one of them.
- GET /v1/books/{id}/events: server-sent events `progress` (the book) until it is ready, cancelled or failed.
- POST /v1/books/{id}/open: compresses a listed book again where its memory file left the cache.
- POST /v1/books/{id}/cancel: stops its compression.
- POST /v1/chat/completions with `"book": id` (app.py): the book is the first user message's text.
"""

from __future__ import annotations

import asyncio
import json
from importlib.resources import files

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from sse_starlette.sse import EventSourceResponse

from uio_gguf.errors import UIOError
from uio_gguf.serve.library import Library, NoRoom, UnknownBook

PAGE = files("uio_gguf.serve") / "page"
# The page runs only its own script and styles: a book's text can never become code (it is set as text, too).
HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
EVENT_EVERY_S = 0.25  # how often a watched compression's progress is sent


def add_page(app: FastAPI, library: Library, check_key, api_error) -> None:
    """Adds the page and the book endpoints; `check_key` is the app's key check, `api_error(status,
    message, code)` its OpenAI-shaped error."""

    def book_or_404(call, *args):
        try:
            return call(*args)
        except UnknownBook as err:
            raise api_error(404, str(err), "book_not_found") from None

    @app.get("/", include_in_schema=False)
    async def page():
        html = (PAGE / "index.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={**HEADERS, "Cache-Control": "no-cache"})

    app.mount("/page", StaticFiles(directory=str(PAGE)), name="page")

    @app.post("/v1/books", dependencies=[Depends(check_key)])
    async def upload(request: Request, name: str = "book.txt"):
        try:
            # The body is read to its end (a browser shows no answer to an upload cut short), but what passes
            # the limit is not kept.
            body, received = bytearray(), 0
            async for part in request.stream():
                received += len(part)
                if len(body) + len(part) <= library.max_upload_bytes:
                    body += part
            library.check_size(received)
            return await anyio.to_thread.run_sync(lambda: library.add(bytes(body), name[:200]))
        except NoRoom as err:
            raise api_error(507, str(err), "insufficient_storage") from None
        except UIOError as err:
            code = "upload_too_large" if "upload is" in str(err) else "invalid_book"
            raise api_error(413 if code == "upload_too_large" else 400, str(err), code) from None

    @app.get("/v1/books", dependencies=[Depends(check_key)])
    async def listing():
        return {"object": "list", "data": await anyio.to_thread.run_sync(library.list)}

    @app.get("/v1/books/{book_id}", dependencies=[Depends(check_key)])
    async def one(book_id: str):
        return book_or_404(library.describe, book_id)

    @app.post("/v1/books/{book_id}/open", dependencies=[Depends(check_key)])
    async def reopen(book_id: str):
        return book_or_404(library.open, book_id)

    @app.post("/v1/books/{book_id}/cancel", dependencies=[Depends(check_key)])
    async def cancel(book_id: str):
        return book_or_404(library.cancel, book_id)

    @app.get("/v1/books/{book_id}/events", dependencies=[Depends(check_key)])
    async def events(book_id: str):
        book_or_404(library.meta, book_id)

        async def progress():
            sent = None
            while True:
                book = library.describe(book_id)
                now = json.dumps(book)
                if now != sent:
                    yield {"event": "progress", "data": now}
                    sent = now
                if book["state"] != "compressing":
                    return
                await asyncio.sleep(EVENT_EVERY_S)

        return EventSourceResponse(progress(), sep="\n")
