"""UIOLlama: llama-cpp-python's `Llama.create_chat_completion` answered over UIO memory (docs/design.md §7).

An app written against llama-cpp-python switches by changing its constructor:

    llm = UIOLlama("bundle_dir")          # or UIOLlama() for the embedded SmolLM2 bundle
    out = llm.create_chat_completion([{"role": "user", "content": book + "\\n\\nWho wrote it?"}])
    out["choices"][0]["message"]["content"]

The return values are the dicts (and, with stream=True, the chunk iterator) llama-cpp-python returns.

How messages map onto a Conversation (uio_gguf/chat/conversation.py):
- system messages before the first user message are its preamble (rendered before it);
- the first user message is the document turn. When it is longer than one segment (the head's l tokens)
  it holds the book: its text up to the last blank line is the book, compressed into memory or read from its
  memory file (keyed by content), and the paragraph after that line is the question (recall, when the
  runtime has it, works on it). A shorter first message is all question;
- later user turns are asked in turn; assistant turns the client sends are read in as they are;
- a request that repeats a conversation kept from an earlier request (its messages and the answer given)
  and adds turns continues that conversation's decoder session: nothing is compressed or read again.
"""

from __future__ import annotations

import hashlib
import random
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass

from uio_gguf.chat import sources
from uio_gguf.chat.conversation import Conversation
from uio_gguf.errors import Stopped, UIOError
from uio_gguf.handles import Handle
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.llamacpp.template import render
from uio_gguf.memory.runtime import ANSWER_RESERVE

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class Counters:
    """What the requests came to (the server shows them on /health)."""

    requests: int = 0
    compressed: int = 0  # conversations whose book was compressed
    from_file: int = 0  # conversations whose book memory was read from its memory file
    continued: int = 0  # requests that continued a kept conversation
    cancelled: int = 0  # answers stopped early because should_stop() turned true (a client left)


class KeptConversation(Conversation):
    """A Conversation as a client sends it: its first user message (after the system preamble) is
    book + sep + question, and it is kept between requests to be continued."""

    def __init__(self, runtime, preamble: list[tuple[str, str]], book: str, sep: str, question: str, **options):
        super().__init__(runtime, book, preamble=preamble, sep=sep, **options)
        self.history: list[tuple[str, str]] = list(preamble)  # the messages read so far, as the client sends them
        self.question = question  # the first user message's question
        self.result: tuple[str, dict, dict | None] | None = (
            None  # (finish_reason, usage, sources report) of the last answer
        )

    def turn(self, message: tuple[str, str], question: str, params: SamplingParams, should_stop) -> Iterator[str]:
        """Asks `question` (the text of the user `message`) and streams the answer."""
        yield from self.ask(question, params, should_stop=should_stop)
        # the messages as the client sends them (read_answer puts in the answer the client gave)
        self.history += [message, self.messages[-1]]
        self.messages = list(self.history)

    def read_answer(self, message: tuple[str, str], question: str, answer: str, should_stop) -> None:
        """Reads in a user turn and the assistant's answer as the client sent them (no generation)."""
        for _ in self.turn(message, question, SamplingParams(max_tokens=0), should_stop):
            pass
        if answer:
            self.session.feed(self.model.tokenize(answer), should_stop=should_stop)
        self.seen_text += answer
        self.history[-1] = ("assistant", answer)
        self.messages = list(self.history)


def normalize(messages) -> list[tuple[str, str]]:
    """OpenAI chat messages -> (role, text) with roles system/user/assistant; consecutive messages of one
    role are joined by a blank line (templates expect turns to alternate). ValueError on what we can't read."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise ValueError("messages must be a non-empty list")
    out: list[tuple[str, str]] = []
    for i, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ROLES:
            raise ValueError(f"messages[{i}]: role must be one of {', '.join(ROLES)}, not {role!r}")
        content = message.get("content")
        if content is None:  # not read as empty text: the client meant something we cannot see
            raise ValueError(f"messages[{i}]: content is null (only text messages are supported)")
        if isinstance(content, list):  # content parts: text only (an image answered as if absent misleads)
            kinds = {p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content}
            if kinds - {"text"}:
                found = ", ".join(sorted(map(str, kinds - {"text"})))
                raise ValueError(f"messages[{i}]: content parts of type {found} are not supported (text only)")
            content = "".join(p.get("text", "") for p in content)
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}]: content must be a string or a list of text parts")
        role = ROLES[role]
        if out and out[-1][0] == role:
            out[-1] = (role, f"{out[-1][1]}\n\n{content}")
        else:
            out.append((role, content))
    first_user = next((i for i, (role, _) in enumerate(out) if role == "user"), None)
    if first_user is None:
        raise ValueError("messages hold no user message")
    if any(role == "system" for role, _ in out[first_user:]):
        raise ValueError("system messages must come before the first user message")
    if out[-1][0] != "user":
        raise ValueError("the last message must be the user's")
    return out


def _chat_id() -> str:
    return f"chatcmpl-{uuid.uuid4()}"


class UIOLlama(Handle):
    """llama_cpp.Llama's chat API over a UIO runtime. Thread-safe: each conversation runs in its own
    decoder context; at most `keep` finished conversations stay open to be continued (least recent closed
    first)."""

    def __init__(
        self,
        bundle=None,
        n_ctx: int | None = None,
        n_gpu_layers: int = 0,
        flash_attn: bool = False,
        n_threads: int = 0,
        keep: int = 4,
        use_memory_files: bool = True,
        recall_tokens: int | None = None,
        verbose: bool = False,
        runtime=None,
        raw_window: int | None = None,
        keep_tokens: int | None = None,
        reread: bool | None = None,
        memory_window: int | None = None,
        recall_in_context: bool | None = None,
    ):
        """bundle: a bundle directory (None: the embedded SmolLM2 bundle); n_ctx: the decoder window
        (None: the model's trained context); recall_tokens: Conversation's recall budget per question
        (None: its default; 0: off); runtime: an open UIORuntime to use instead (not closed here);
        raw_window, keep_tokens, reread, memory_window, recall_in_context: Conversation's raw_window, keep,
        reread, memory_window and recall_in_context (None: its defaults)."""
        if runtime is None:
            from uio_gguf.memory.runtime import UIORuntime

            runtime = UIORuntime(
                bundle, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, n_threads=n_threads, verbose=verbose
            )
            self._owns_runtime = True
        else:
            self._owns_runtime = False
        self.runtime = runtime
        self.n_ctx = n_ctx
        self.keep = keep
        # passed on to each Conversation
        self.options = {"use_memory_files": use_memory_files}
        for name, value in (
            ("recall_tokens", recall_tokens),
            ("raw_window", raw_window),
            ("keep", keep_tokens),
            ("reread", reread),
            ("memory_window", memory_window),
            ("recall_in_context", recall_in_context),
        ):
            if value is not None:
                self.options[name] = value
        self.model_path = str(runtime.bundle.model_path)
        self.counters = Counters()
        self._kept: OrderedDict[tuple, KeptConversation] = OrderedDict()
        self._lock = threading.Lock()
        self._book_locks: dict[str, threading.Lock] = {}

    def max_book_tokens(self) -> int:
        return self.runtime.max_tokens(self.n_ctx)

    def stats(self) -> dict:
        with self._lock:
            return {**asdict(self.counters), "kept": len(self._kept)}

    # ----- conversations ----------------------------------------------------------------------------
    def _check_length(self, msgs: list[tuple[str, str]]) -> None:
        """The whole conversation gets the first turn's length check before anything is read: a later turn
        too long to fit is refused at once, not after minutes of compressing it into a full window."""
        model = self.runtime.model
        n_tokens = len(model.tokenize(render(model.chat_template(), msgs, True), add_special=True))
        self.runtime.check_length(n_tokens, self.n_ctx)

    def _checkout(self, msgs: list[tuple[str, str]], should_stop) -> KeptConversation:
        """The kept conversation that `msgs` extends (taken out while in use), or a new one."""
        with self._lock:
            self.counters.requests += 1
            best = max(
                (h for h in self._kept if len(h) < len(msgs) and tuple(msgs[: len(h)]) == h), key=len, default=None
            )
            if best is not None:
                self.counters.continued += 1
                return self._kept.pop(best)
        first = next(i for i, (role, _) in enumerate(msgs) if role == "user")
        content = msgs[first][1]
        book, sep = "", ""
        if len(self.runtime.model.tokenize(content)) > self.runtime.segment:
            cut = content.rfind("\n\n")
            book, sep = (content[:cut], "\n\n") if cut > 0 else (content, "")
        # One request compresses a book at a time; others about it wait, then read its memory file.
        key = hashlib.sha256(repr((msgs[:first], book)).encode()).hexdigest()
        with self._lock:
            book_lock = self._book_locks.setdefault(key, threading.Lock())
        with book_lock:
            question = content[len(book) + len(sep) :]
            kept = KeptConversation(
                self.runtime,
                msgs[:first],
                book,
                sep,
                question,
                n_ctx=self.n_ctx,
                should_stop=should_stop,
                **self.options,
            )
        with self._lock:
            if kept.stats.from_file:
                self.counters.from_file += 1
            elif kept.stats.tokens:
                self.counters.compressed += 1
        return kept

    def _checkin(self, kept: KeptConversation) -> None:
        with self._lock:
            self._kept[tuple(kept.history)] = kept
            while len(self._kept) > self.keep:
                self._kept.popitem(last=False)[1].close()

    def _prepare(self, msgs: list[tuple[str, str]], should_stop) -> KeptConversation:
        """A conversation that has read every message but the last (the question to answer)."""
        kept = self._checkout(msgs, should_stop)
        try:
            i = len(kept.history)
            while i < len(msgs) - 1:
                kept.read_answer(msgs[i], self._question(kept, msgs[i]), msgs[i + 1][1], should_stop)
                i += 2
        except BaseException:
            kept.close()
            raise
        return kept

    @staticmethod
    def _question(kept: KeptConversation, message: tuple[str, str]) -> str:
        return message[1] if kept.started else kept.question

    # ----- the llama-cpp-python API -----------------------------------------------------------------
    def create_chat_completion(
        self,
        messages,
        stream: bool = False,
        temperature: float = 0.2,
        top_p: float = 0.95,
        top_k: int = 40,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        seed: int | None = None,
        model: str | None = None,
        should_stop: Callable[[], bool] | None = None,
        loop_guard: bool = True,
        report: bool = False,
        **_ignored,
    ):
        """llama_cpp.Llama.create_chat_completion's arguments (the sampling ones UIO has; the others are
        accepted and ignored) and return values. max_tokens None or <= 0: up to the runtime's answer reserve.
        should_stop (not in llama-cpp-python): polled per token; true ends the answer (finish_reason stop).
        Also polled per segment while the book and the turns are read: true there raises Stopped.
        loop_guard (not in llama-cpp-python): stop where the answer starts to repeat itself (finish_reason
        stop; uio_gguf.llamacpp.loop_guard). report (not in llama-cpp-python): the completion (or the last
        chunk) also holds `uio`: the passages recall brought back and the memory figures (uio_gguf.chat.sources).

        The book is read (or its memory file loaded) before this returns, also with stream=True, so a
        book that does not fit raises UIOError here rather than mid-stream."""
        try:
            msgs = normalize(messages)
        except ValueError as err:
            raise UIOError(str(err)) from None
        params = SamplingParams(
            temperature=max(0.0, float(temperature)),
            top_k=int(top_k),
            top_p=float(top_p),
            seed=random.randrange(2**31) if seed is None else int(seed),
            max_tokens=int(max_tokens) if max_tokens and max_tokens > 0 else ANSWER_RESERVE,
            stop=[stop] if isinstance(stop, str) else list(stop or []),
            loop_guard=bool(loop_guard),
        )
        should_stop = should_stop or (lambda: False)
        self._check_length(msgs)
        try:
            if should_stop():  # e.g. a request that waited for a slot while the server began to shut down
                raise Stopped
            kept = self._prepare(msgs, should_stop)
        except Stopped:
            self._count_cancelled()
            raise
        answer = self._answer(kept, msgs[-1], params, should_stop, report)
        meta = {"id": _chat_id(), "created": int(time.time()), "model": model or self.model_path}
        return self._chunks(kept, answer, meta) if stream else self._completion(kept, answer, meta)

    def _answer(self, kept: KeptConversation, message, params, should_stop, report: bool = False) -> Iterator[str]:
        """Streams the answer; when it ends, kept.result holds (finish_reason, usage, the sources report or
        None) and the conversation is kept. A consumer that stops early closes the conversation."""
        stopped = {"flag": False}

        def stop_now() -> bool:
            stopped["flag"] = stopped["flag"] or bool(should_stop())
            return stopped["flag"]

        question = self._question(kept, message)
        try:
            yield from kept.turn(message, question, params, stop_now)
        except BaseException as err:  # the consumer left (GeneratorExit) or decoding failed: not reusable
            kept.close()
            if isinstance(err, Stopped):  # while the question was read
                self._count_cancelled()
            raise
        session = kept.session
        prompt = session.tokens_seen - session.generated
        kept.result = (
            session.finish_reason,
            {"prompt_tokens": prompt, "completion_tokens": session.generated, "total_tokens": session.tokens_seen},
            sources.report(kept, question) if report else None,
        )
        if stopped["flag"]:
            self._count_cancelled()
        self._checkin(kept)

    def _count_cancelled(self) -> None:
        with self._lock:
            self.counters.cancelled += 1

    def _completion(self, kept: KeptConversation, answer: Iterator[str], meta: dict) -> dict:
        text = "".join(answer)
        finish, usage, extra = kept.result
        completion = {
            "id": meta["id"],
            "object": "chat.completion",
            "created": meta["created"],
            "model": meta["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        if extra is not None:
            completion["uio"] = extra
        return completion

    def _chunks(self, kept: KeptConversation, answer: Iterator[str], meta: dict) -> Iterator[dict]:
        def chunk(delta: dict, finish: str | None) -> dict:
            return {
                "id": meta["id"],
                "model": meta["model"],
                "created": meta["created"],
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
            }

        yield chunk({"role": "assistant"}, None)
        try:
            for piece in answer:
                yield chunk({"content": piece}, None)
        finally:
            answer.close()  # a consumer that leaves early closes the conversation (see _answer)
        last = chunk({}, kept.result[0])
        if kept.result[2] is not None:
            last["uio"] = kept.result[2]
        yield last

    def close(self) -> None:
        with self._lock:
            while self._kept:
                self._kept.popitem()[1].close()
        if self._owns_runtime:
            self.runtime.close()
