"""A conversation about a book: the book sits in the first user turn of the model's chat template.

The first turn is rendered with a marker where the book goes; everything before the marker plus the
book is the document part: its full segments are compressed (or read from a memory file), the
remainder and the question are decoded as raw tokens. Later turns append what the template adds.
With recall on (the default), each question first brings back the book's passages that BM25 ranks
best for it, as raw tokens right before the question (uio_gguf.chat.recall, docs/design.md §6).
The raw window keeps the last R tokens raw (default DEFAULT_RAW_SEGMENTS segments), not only the current
segment: the book's tail, the question and the recent turns are read as text (docs/design.md §6).
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from uio_gguf.chat.recall import DEFAULT_RECALL_TOKENS, Recall
from uio_gguf.errors import Stopped, UIOError
from uio_gguf.handles import Handle
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.llamacpp.template import document_tokens, first_turn, opening, render
from uio_gguf.memory.encoder import SegmentMemory
from uio_gguf.memory.runtime import ANSWER_RESERVE
from uio_gguf.memory.session import DECODER_SEQ, held_memory_cells
from uio_gguf.store import memory_file, start_state

# Chat's default layout (docs/memory-vs-window.md): a raw window of 8 segments (R = 1,024 for the shipped
# heads), read again behind the memory after each compression (reread), the latest 1,024 memory cells, and
# the recall decoded in the conversation. On held-out text it reads better than a plain llama.cpp window
# of the same cells and than R alone, r8 and r32, in and out of domain, 8K to 32K (eval ppl; e.g. r8 in
# domain 10.476 / 10.769 / 9.964 against 10.812 / 10.951 / 10.175 for the same cells), and answers as well
# as that window + recall (eval qa). The training view (R = one segment, --raw-window 128) reads far
# worse than the same cells (17.6 against 11.0 at 8K). With the recall decoded alone, a long raw window
# cost the demo its answer (the passages never read the raw window); in context it answers at every R.
# A window that cannot have MIN_RAW_SEGMENTS beside the memory and the recall falls back to one segment
# (shorter windows without reread measured worse than one).
DEFAULT_RAW_SEGMENTS = 8
MIN_RAW_SEGMENTS = 8
DEFAULT_REREAD = True
DEFAULT_RECALL_IN_CONTEXT = True
# The document's first tokens kept raw in front of the memory (Session.keep; docs/memory-vs-window.md).
DEFAULT_KEEP = 0
# How recall ranks the book's passages for a question (docs/design.md §6): BM25 on the question's words, or
# the question's own attention over each segment's memory slots (uio_gguf.memory.attention_rank).
RANKINGS = ("bm25", "attention")
QUERY_ROWS = 64  # the question's last tokens whose attention ranks the segments
# The most memory cells the decoder holds by default: the latest segments' (Session.limit_memory). The far
# memory reads no better than none, so the window costs no perplexity (at R = 1,024 with reread, 9.964 against
# 9.978 at 32K) and no answers (eval qa: 20/30 and 20/30 at 16K and 32K; docs/memory-vs-window.md), and it
# keeps decode and the first question fast on long books (56K: 55 against 25 tokens/s; docs/benchmarks.md).
DEFAULT_MEMORY_WINDOW = 1024
WHOLE_MEMORY = 0  # a memory_window that holds every segment's memory


def resolve_memory_window(asked: int | None, slots: int, by_attention: bool = False) -> int | None:
    """The memory window a conversation uses: asked (cells), WHOLE_MEMORY (0) for every segment's memory, or None for the
    default (DEFAULT_MEMORY_WINDOW cut to whole segments; every segment's when the recall is ranked by
    attention, which scores the whole memory). -> cells, or None for every segment's."""
    if asked is None:
        return None if by_attention else max(slots, DEFAULT_MEMORY_WINDOW // slots * slots)
    if asked < 0:
        raise UIOError(f"the memory window takes 0 (every segment's memory) or more cells, not {asked}")
    if asked and by_attention:
        raise UIOError("recall ranked by attention reads the whole memory: it takes no memory window")
    return None if asked == WHOLE_MEMORY else asked


@dataclass
class CompressionStats:
    tokens: int = 0
    seconds: float = 0.0
    from_file: bool = False
    from_start_state: bool = False  # the whole start cache came from its file (uio_gguf.store.start_state)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def memory_segments(n_tokens: int, segment: int, raw_window: int) -> int:
    """How many of a book's segments a conversation keeps as memory: all but the tail a raw window of
    raw_window tokens holds, as feed would leave it (fewer than raw_window tokens raw)."""
    tail_from = n_tokens - raw_window
    return min(n_tokens // segment, tail_from // segment + 1) if tail_from >= 0 else 0


class Conversation(Handle):
    def __init__(
        self,
        runtime,
        book: str,
        n_ctx: int | None = None,
        use_memory_files: bool = True,
        progress: Callable[[int, int], None] | None = None,
        recall_tokens: int = DEFAULT_RECALL_TOKENS,
        raw_window: int | None = None,
        recall_ranking: str = "bm25",
        preamble: list[tuple[str, str]] = (),
        sep: str = "\n\n",
        compress: Callable | None = None,
        should_stop: Callable[[], bool] | None = None,
        must_save: bool = False,
        keep: int = DEFAULT_KEEP,
        reread: bool = DEFAULT_REREAD,
        memory_window: int | None = None,
        recall_in_context: bool = DEFAULT_RECALL_IN_CONTEXT,
    ):
        """recall_tokens: the most tokens of the book brought back raw for each question (0: the memory
        alone, as in training). raw_window: R, the most recent tokens kept raw (None: DEFAULT_RAW_SEGMENTS
        segments; the segment length: the training view). Where the book's memory leaves no room for R
        beside the recall budget and an answer, R shrinks (to one segment at the least).
        recall_ranking: one of RANKINGS. preamble: (role, text) messages rendered before the first user
        turn (the server's system messages): part of the document, with the book. sep: what stands between
        the book and the first question in that turn. compress: how the book's segments become memory
        when no memory file has it (default runtime.compress; eval qa passes a cache of segments).
        should_stop: polled after each segment compressed; true raises Stopped (the book half read: nothing is
        saved). must_save: a memory file that cannot be written (a full or read-only disk) is an error;
        otherwise a warning, and the conversation goes on. keep: the document's first tokens kept raw in
        front of the memory (attention sinks, as llama.cpp's --keep; docs/memory-vs-window.md). reread: after
        each compression the raw window is decoded again behind the memory (Session.reread), as the book's
        end is when it is opened; only a raw window over one segment has anything to read again.
        memory_window: the most memory cells the decoder holds, those of the book's latest segments
        (Session.limit_memory; None: DEFAULT_MEMORY_WINDOW, 0: every segment's; resolve_memory_window). The
        recall still reads the whole book. recall_in_context: the recalled passages are decoded in the
        conversation after the raw window, reading it and the memory (Session.recall_in_context), not alone."""
        if recall_ranking not in RANKINGS:
            raise UIOError(f"unknown recall ranking {recall_ranking!r} (choose from {', '.join(RANKINGS)})")
        if recall_tokens < 0:
            raise UIOError(f"the recall budget must be 0 or more tokens, not {recall_tokens}")
        if raw_window is not None and raw_window < runtime.segment:
            raise UIOError(
                f"the raw window must hold at least one segment ({runtime.segment} tokens), not {raw_window}"
            )
        self.runtime = runtime
        self.n_ctx, self.must_save = n_ctx, must_save
        self.model = runtime.model
        self.template = self.model.chat_template()
        self.book = book
        self.preamble, self.sep = list(preamble), sep
        self.messages: list[tuple[str, str]] = list(self.preamble)
        self.seen_text = ""  # everything the model has read, as text (to append later turns)
        self.book_tokens = document_tokens(self.model, book, self.preamble)
        runtime.check_length(len(self.book_tokens), n_ctx)
        self.recall_ranking = recall_ranking
        by_attention = recall_tokens > 0 and recall_ranking == "attention"
        if not 0 <= keep <= runtime.segment:
            raise UIOError(f"the kept tokens must be 0 to the segment length ({runtime.segment}), not {keep}")
        memory_window = resolve_memory_window(memory_window, runtime.slots, by_attention)
        self.session = runtime.new_session(n_ctx, query_rows=QUERY_ROWS if by_attention else 0)
        self.session.keep, self.session.reread = keep, reread
        self.session.recall_in_context = recall_in_context
        try:
            self.session.limit_memory(memory_window)
        except UIOError:
            self.session.close()
            raise
        self.session.raw_window = self._fit_raw_window(raw_window, recall_tokens)
        self.stats = CompressionStats()
        self.recall_tokens = recall_tokens
        try:
            self._load_book(use_memory_files, progress, compress, should_stop or (lambda: False))
        except BaseException:  # stopped, or a damaged head: the decoder context is not left behind
            self.session.close()
            raise
        self.recall = None
        self.recalled: list = []  # the passages (recall.Span) brought back for the last question
        if recall_tokens:
            n_mem = self.session.compressed_segments  # the raw window is in view anyway
            skip = len(self.model.tokenize(opening(self.template, self.preamble), add_special=True))
            self.recall = Recall(self.model, self.book_tokens[: n_mem * runtime.segment], runtime.segment, skip)

    def _fit_raw_window(self, asked: int | None, recall_tokens: int) -> int:
        """The raw window asked for (or the default), cut to whole segments that fit beside the book's
        memory, the recall budget and ANSWER_RESERVE cells (the question and the answer); one segment
        where that cut leaves fewer than MIN_RAW_SEGMENTS (measured worse than one)."""
        seg, s = self.runtime.segment, self.session
        if asked is not None and asked == seg:
            return seg
        memory = len(self.book_tokens) // seg * self.runtime.slots
        memory = s.keep + held_memory_cells(memory, s.memory_window)
        room = (s.ctx.n_ctx - memory - recall_tokens - ANSWER_RESERVE) // seg * seg
        target = DEFAULT_RAW_SEGMENTS * seg if asked is None else asked
        fit = min(target, room)
        return seg if fit < min(target, MIN_RAW_SEGMENTS * seg) else fit

    def _load_book(self, use_memory_files: bool, progress, compress, should_stop: Callable[[], bool]) -> None:
        seg = self.runtime.segment
        n_full = len(self.book_tokens) // seg
        compressed = self.book_tokens[: n_full * seg]
        key, path = memory_file.locate(self.runtime, compressed)  # memory is stored as made: bit-identical reuse
        started = time.perf_counter()
        self.memory_path = path
        # the segments the raw window holds are read as text (their memory stays in the file for later)
        n_mem = memory_segments(len(self.book_tokens), seg, self.session.raw_window)
        remainder = self.book_tokens[n_mem * seg :]
        sink = self.book_tokens[: self.session.keep] if n_mem else []  # feed keeps them at the first compression
        start = self._start_state(path, key, remainder) if use_memory_files else None
        if start and (saved := start_state.load(*start)) is not None:
            if self.session.restore(saved, n_mem, remainder, sink) and self._keys_after_restore(path, key, n_mem):
                self.stats.from_file = self.stats.from_start_state = True
                self.stats.tokens, self.stats.seconds = len(compressed), time.perf_counter() - started
                return
        done = 0

        def step(n):
            nonlocal done
            done += n
            if progress:
                progress(done * seg, n_full * seg)
            if should_stop():
                raise Stopped

        memory, self.stats.from_file = memory_file.load_or_compress(
            self.runtime, compressed, use_memory_files, compress, progress=step, write=self._write
        )
        self.stats.tokens, self.stats.seconds = len(compressed), time.perf_counter() - started
        if n_mem:
            self.session.keep_sink(sink)
        self.session.add_memory(SegmentMemory(memory.k[:n_mem], memory.v[:n_mem]))
        self.session.feed(remainder)
        if use_memory_files and n_full and (start := self._start_state(path, key, remainder)):
            state = self.session.ctx.seq_state(DECODER_SEQ)  # the next opening restores it
            self._write(lambda: start_state.save(*start, state), "start state", start[0])

    def _write(self, save: Callable[[], object], what: str, path) -> None:
        """Runs `save` (a cache file's atomic write). A disk that is full or read-only costs only the reuse:
        a warning, unless must_save."""
        try:
            save()
        except OSError as err:
            message = f"cannot write the {what} {path}: {err.strerror or err}"
            if self.must_save:
                raise UIOError(message) from None
            warnings.warn(f"{message} (the book will be compressed again next time)", stacklevel=2)

    def _keys_after_restore(self, path, key: str, n_mem: int) -> bool:
        """A restored session ranking recall by attention needs its memory's K, which the start state does
        not hold: read from the memory file. False (and the conversation emptied, to be loaded the long
        way) if that file cannot be read."""
        if not self.session.ranks_by_attention:
            return True
        memory = memory_file.load(path, key)
        if memory is None:
            self.session.reset()
            return False
        self.session.remember_keys(SegmentMemory(memory.k[:n_mem], memory.v[:n_mem]))
        return True

    def _start_state(self, memory_path, key: str, remainder) -> tuple | None:
        """(path, key) of the start state that belongs to this memory file's content (named by its
        checksum, so a damaged or rewritten memory file is noticed without reading its arrays); None
        without a readable memory file."""
        checksum = memory_file.stored_checksum(memory_path, key)
        if checksum is None:
            return None
        s = self.session
        start_key = start_state.state_key(
            f"{key}:{checksum}", remainder, s.raw_window, s.keep, s.ctx.settings, s.memory_window
        )
        return start_state.path_for(memory_path, start_key), start_key

    # ----- turns ------------------------------------------------------------------------------------
    @property
    def started(self) -> bool:
        """Whether the first question has been asked (the turn that holds the book)."""
        return len(self.messages) > len(self.preamble)

    def ask(
        self, question: str, params: SamplingParams, should_stop: Callable[[], bool] = lambda: False
    ) -> Iterator[str]:
        """Streams the answer to `question` and keeps it in the conversation. A question that would take
        the conversation past what the window holds is refused before anything is read (UIOError; the
        conversation is left as it was). should_stop is also polled while the question is read."""
        if not self.started:  # the first turn: the book, then the question
            before, delta = first_turn(self.template, question, self.preamble, self.sep)
            seen, message = before + self.book, ("user", f"{self.book}{self.sep}{question}")
        else:
            seen, message = self.seen_text, ("user", question)
            full = render(self.template, [*self.messages, message], True)
            if not full.startswith(seen):  # a template that rewrites history: append the new turn only
                full = seen + render(self.template, [message], True)
            delta = full[len(seen) :]
        tokens = self.model.tokenize(delta, add_special=False)
        self.runtime.check_length(
            self.session.tokens_seen + len(tokens), self.n_ctx, "start a new conversation, or ask a shorter question"
        )
        self.messages.append(message)
        self.seen_text = seen
        if self.recall is not None:
            budget = min(self.recall_tokens, self._recall_room(len(tokens), params.max_tokens))
            if self.recall_ranking == "attention":
                self.session.set_recall([])  # the question attends over the memory and raw window alone
                scores = self.session.memory_attention(tokens, self.runtime.query_projection())
                self.recalled = self.recall.segment_spans(scores, budget)
            else:
                self.recalled = self.recall.select(question, budget)
            # the document's first token leads the passages where they are decoded (an attention sink)
            self.session.set_recall(self.recall.tokens_for(self.recalled), lead=self.book_tokens[:1])
        self.session.feed(tokens, should_stop=should_stop)
        self.seen_text += delta
        answer = ""
        for piece in self.session.generate(params, should_stop):
            answer += piece
            yield piece
        self.seen_text += answer
        self.messages.append(("assistant", answer))

    def _recall_room(self, n_question: int, max_tokens: int) -> int:
        """The most recall tokens that leave room for the question and a whole answer: the raw window
        never passes R, and each segment compressed out of it adds k memory cells."""
        s = self.session
        raw = len(s.raw) + n_question + max_tokens
        grown = (raw - s.raw_window) // s.segment * s.slots + s.slots if raw >= s.raw_window else 0
        return max(0, s.ctx.n_ctx - s.memory_end - s.raw_window - grown)

    def close(self) -> None:
        self.session.close()

    # ----- figures for the user ---------------------------------------------------------------------
    def kv_bytes(self) -> tuple[int, int]:
        """(bytes the cache holds now, bytes full attention over the same text would hold)."""
        per_cell = self.runtime.kv_cell_bytes
        return self.session.n_past * per_cell, self.session.tokens_seen * per_cell
