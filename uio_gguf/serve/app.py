"""`uio-gguf serve`: the OpenAI chat-completions protocol over UIOLlama (docs/design.md §7, docs/serving.md).

POST /v1/chat/completions (streamed as server-sent events ending in `data: [DONE]`, or not), GET /v1/models,
GET /health; the web page at / and its book API (uio_gguf/serve/web.py). `parallel` requests run at once,
each in a worker thread with a decoder context of its own; up to `queue` more wait, past that the answer is
503. A request whose client leaves stops at its next segment compressed or token decoded (checked every
quarter of a second until the answer streams); so do all of them when the server is told to stop (SIGTERM,
Ctrl-C), which then exits at once. Errors have the OpenAI shape {"error": {"message", "type", "param", "code"}}.

This module needs the `serve` extra (fastapi, uvicorn, sse-starlette); nothing else imports it at module level.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
from typing import Literal

import anyio
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException

from uio_gguf.errors import ContextLengthError, Stopped, UIOError
from uio_gguf.text.book import DEFAULT_MAX_UPLOAD_MB


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict] | None = None


class ChatRequest(BaseModel):
    """The fields UIO uses; the other OpenAI fields are accepted and ignored (as llama-cpp-python does
    for many), except those whose request we could not honour (checked by `unsupported`)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    n: int | None = None  # choices per request: one is what we make (refused otherwise)
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    temperature: float = Field(0.8, ge=0.0, le=2.0)  # llama-cpp-python's server defaults
    top_p: float = Field(0.95, ge=0.0, le=1.0)
    top_k: int = Field(40, ge=0)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    seed: int | None = None
    loop_guard: bool = True  # UIO's own (extra_body): stop where the answer starts to repeat itself
    book: str | None = None  # UIO's own (extra_body): the id of a book of /v1/books, read before the first question


def unsupported(body: ChatRequest) -> tuple[str, str] | None:
    """(message, param) for a request this server would answer other than asked, else None (the CLI's -n 0
    is an empty answer; here, as in OpenAI's API, a length of 0 is refused, not read as no limit)."""
    if body.n not in (None, 1):
        return f"n must be 1: this server makes one choice per request, not {body.n}", "n"
    for name in ("max_tokens", "max_completion_tokens"):
        if getattr(body, name) == 0:
            return f"{name} must be 1 or more, not 0", name
    return None


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param


def error_response(status: int, message: str, type_: str, code: str | None = None, param: str | None = None):
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


class RequestLimit:
    """`parallel` answers at once, `queue` more waiting; past that, 503. llama.cpp's server calls the
    places of the answers running at once slots, and /health keeps that word (UIO's memory slots are
    another thing)."""

    def __init__(self, parallel: int, queue: int):
        self.parallel, self.queue = parallel, queue
        self.busy = self.waiting = 0
        self._free: asyncio.Semaphore | None = None

    async def acquire(self) -> None:
        if self._free is None:  # made on the server's event loop
            self._free = asyncio.Semaphore(self.parallel)
        if self.busy >= self.parallel and self.waiting >= self.queue:
            raise APIError(503, "the server is busy: every slot is taken and the queue is full", "server_error", "busy")
        self.waiting += 1
        try:
            await self._free.acquire()
        finally:
            self.waiting -= 1
        self.busy += 1

    def release(self) -> None:
        self.busy -= 1
        self._free.release()

    def state(self) -> dict:
        return {"parallel": self.parallel, "busy": self.busy, "waiting": self.waiting, "queue": self.queue}


def create_app(
    llm,
    model_id: str,
    parallel: int = 1,
    queue: int = 16,
    api_key: str | None = None,
    max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB,
) -> FastAPI:
    """The app over a UIOLlama (uio_gguf/serve/engine.py); `model_id` is the one id /v1/models lists;
    max_upload_mb: the largest book the page's API takes."""
    from uio_gguf.serve.library import Library
    from uio_gguf.serve.web import add_page

    app = FastAPI(title="uio-gguf", version="1")
    limit = RequestLimit(parallel, queue)
    app.state.stopping = stopping = threading.Event()  # set by run() when the server is told to stop
    library = app.state.library = Library(llm.runtime, llm.n_ctx, max_upload_mb, stopping)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        if request.headers.get("authorization", "") != f"Bearer {api_key}":
            raise APIError(401, "invalid API key", "invalid_request_error", "invalid_api_key")

    @app.exception_handler(APIError)
    async def on_api_error(_request, err: APIError):
        return error_response(err.status, err.message, err.type, err.code, err.param)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_request, err: RequestValidationError):
        errors = err.errors()
        if any(e.get("type") == "json_invalid" for e in errors):
            return error_response(400, "the request body is not valid JSON", "invalid_request_error", "invalid_json")
        first = errors[0] if errors else {}
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        message = first.get("msg", "invalid")  # a body of the wrong shape (a JSON array) has no field to name
        return error_response(
            422,
            f"{param}: {message}" if param else f"the request body: {message}",
            "invalid_request_error",
            None,
            param,
        )

    @app.exception_handler(HTTPException)
    async def on_http(_request, err: HTTPException):
        return error_response(err.status_code, str(err.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def on_crash(_request, err: Exception):
        return error_response(500, f"internal error: {err}", "server_error")

    @app.get("/health")
    async def health():
        return {"status": "ok", "slots": limit.state(), "counters": llm.stats()}

    @app.get("/v1/models", dependencies=[Depends(check_key)])
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "owned_by": "me", "permissions": []}]}

    @app.post("/v1/chat/completions", dependencies=[Depends(check_key)])
    async def chat_completions(body: ChatRequest, request: Request):
        if body.model not in (None, "", model_id):
            raise APIError(
                404, f"the model {body.model!r} does not exist (this server has {model_id!r})", "invalid_request_error",
                "model_not_found", "model",
            )  # fmt: skip
        if refused := unsupported(body):
            raise APIError(400, refused[0], "invalid_request_error", "unsupported", refused[1])
        messages = [m.model_dump() for m in body.messages]
        if body.book is not None:
            messages = await anyio.to_thread.run_sync(lambda: _with_book(library, body.book, messages))
        stop = threading.Event()  # the client left
        kwargs = {
            "messages": messages,
            "stream": body.stream,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "top_k": body.top_k,
            "max_tokens": body.max_completion_tokens or body.max_tokens,
            "stop": body.stop,
            "seed": body.seed,
            "loop_guard": body.loop_guard,
            "model": model_id,
            "should_stop": lambda: stop.is_set() or stopping.is_set(),
            "report": body.book is not None,  # the page shows the sources under the answer
        }
        await limit.acquire()
        # Watched while the book is read (streamed or not) and while a plain answer is made; a stream's
        # own sender notices a client that leaves once it streams.
        watcher = asyncio.create_task(_watch(request, stop))
        try:
            result = await anyio.to_thread.run_sync(lambda: llm.create_chat_completion(**kwargs))
        except UIOError as err:
            limit.release()
            code = "context_length_exceeded" if isinstance(err, ContextLengthError) else None
            raise APIError(400, str(err), "invalid_request_error", code, "messages") from None
        except Stopped:
            limit.release()
            if stopping.is_set():
                raise APIError(503, "the server is shutting down", "server_error", "shutting_down") from None
            raise APIError(499, "the client left before the answer", "invalid_request_error", "cancelled") from None
        except BaseException:
            limit.release()
            raise
        finally:
            watcher.cancel()
        if not body.stream:
            limit.release()
            return result
        return EventSourceResponse(_events(_pump(result, limit), stop), sep="\n")

    add_page(
        app, library, check_key, lambda status, message, code: APIError(status, message, "invalid_request_error", code)
    )
    return app


def _with_book(library, book_id: str, messages: list[dict]) -> list[dict]:
    """The messages with the book's text before the first user message's (the question): the document
    turn the server reads (docs/serving.md). The question's blank lines become line breaks, so the book
    ends at the last one."""
    from uio_gguf.serve.library import UnknownBook

    try:
        text = library.text(book_id)
    except UnknownBook as err:
        raise APIError(404, str(err), "invalid_request_error", "book_not_found", "book") from None
    if (job := library.busy(book_id)) is not None:
        raise APIError(
            409, f"the book is still being compressed ({job.done:,} of {job.total:,} tokens)", "invalid_request_error",
            "book_not_ready", "book",
        )  # fmt: skip
    messages = [dict(m) for m in messages]
    first = next((m for m in messages if m.get("role") == "user"), None)
    if first is None or not isinstance(first.get("content"), str):
        raise APIError(400, "a request naming a book needs a user message of text", "invalid_request_error", None)
    question = re.sub(r"\n\s*\n", "\n", first["content"].strip())
    first["content"] = f"{text}\n\n{question}"
    return messages


async def _watch(request: Request, stop: threading.Event) -> None:
    """A client that leaves while its (non-streamed) answer is made stops it at the next token."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.25)
    stop.set()


def _pump(chunks, limit: RequestLimit) -> asyncio.Queue:
    """Runs the chunk iterator in a worker thread that puts each chunk on the queue as it comes, then
    None; the slot frees when the worker is done (started here, so even a response never sent frees it)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()

    def work():
        try:
            for chunk in chunks:
                loop.call_soon_threadsafe(queue.put_nowait, chunk)
        except Exception as err:  # reported to the client as an error event
            loop.call_soon_threadsafe(queue.put_nowait, {"error": {"message": str(err), "type": "server_error"}})
        finally:
            chunks.close()
            loop.call_soon_threadsafe(queue.put_nowait, None)

    loop.run_in_executor(None, work).add_done_callback(lambda _: limit.release())
    return queue


async def _events(queue: asyncio.Queue, stop: threading.Event):
    """Sends the chunks as server-sent events, then [DONE]. When the client leaves, sse-starlette cancels
    this generator: the stop flag ends the answer at its next token."""
    try:
        while (item := await queue.get()) is not None:
            yield {"data": json.dumps(item)}
        yield {"data": "[DONE]"}
    finally:
        stop.set()


def run(app: FastAPI, host: str, port: int, log_level: str = "info") -> None:
    import uvicorn

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            # uvicorn waits for the requests in progress: they stop at their next segment or token, so a
            # book being compressed does not hold the exit for minutes
            app.state.stopping.set()
            super().handle_exit(sig, frame)
            # uvicorn raises the signal again once it has shut down, which kills the process before the
            # caller closes the model: a stop asked for is a normal exit here
            getattr(self, "_captured_signals", []).clear()

    Server(uvicorn.Config(app, host=host, port=port, log_level=log_level)).run()
