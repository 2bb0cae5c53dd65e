"""The decoder side: one conversation over [memory ; raw window] in a llama.cpp context.

Sequence 0 holds the conversation: with keep, the text's first tokens raw (attention sinks), then
memory cells (segment s at (s-1)·k .. s·k-1 after them), then the raw window, with the recalled
passages of the current question (docs/design.md §6; none unless set_recall is called) at the point of
the raw window where they were recalled: right before the question. Sequence 1 is scratch: memory is loaded there and copied into sequence 0,
which adds cells without touching the raw window. Whenever the raw window reaches `raw_window` tokens
(R, default the segment length l), its oldest l tokens are compressed into k new slots right after the
existing memory, their raw cells are dropped and the later ones shift down (docs/design.md §1, §6).
Feeding splits at those boundaries. With R = l (the default) token i sees the memory of every full
segment before it plus the raw tokens since the last boundary, as in training; with R > l it sees
between R - l and R - 1 raw tokens before it (chat's view).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import replace

import llama_cpp
import numpy as np

from uio_gguf.errors import Stopped, UIOError
from uio_gguf.handles import Handle
from uio_gguf.llamacpp.api import Batch, Context, ContextSettings
from uio_gguf.llamacpp.sampling import AnswerOutcome, Sampler, SamplingParams, stream_answer
from uio_gguf.memory.encoder import SegmentMemory

DECODER_SEQ, SCRATCH_SEQ = 0, 1
# The recall's own context runs its batches in llama.cpp micro-batches of this many tokens: for a 910-token
# recall on the F16 weights, 2 threads, 256 took 1.90 s (median of 6) where 512 took 2.10 s
# (docs/benchmarks.md, issue 41): the smaller KQ products stay in cache.
RECALL_UBATCH = 256


def check_memory_window(cells: int | None, slots: int, sink_segments: int = 0) -> None:
    """Raises UIOError unless a memory window of `cells` (None: none) holds whole segments' slots, more
    segments than its `sink_segments` (Session.limit_memory; evals check it before their first column)."""
    if cells is not None and (cells % slots or cells // slots <= sink_segments or sink_segments < 0):
        raise UIOError(
            f"the memory window must be a whole number of segments' slots (a multiple of {slots} cells) and hold "
            f"more than its {sink_segments} sink segment(s), not {cells} cells"
        )


def held_memory_cells(cells: int, window: int | None) -> int:
    """Of `cells` memory cells compressed, those the decoder holds under a memory window of `window` cells
    (None or 0: every one)."""
    return min(cells, window) if window else cells


class Session(Handle):
    """One conversation. `runtime` supplies the model, the encoder, the RoPE and the native plugin."""

    def __init__(
        self,
        runtime,
        n_ctx: int,
        flash_attn: bool = False,
        type_k: int = llama_cpp.GGML_TYPE_F16,
        type_v: int = llama_cpp.GGML_TYPE_F16,
        n_threads: int = 0,
        raw_window: int | None = None,
        query_rows: int = 0,
        keep: int = 0,
    ):
        """raw_window: R, the most raw tokens kept before the oldest segment of them is compressed
        (None: the segment length, the training view). keep: when a text fed from its start has its
        first segment compressed, its first `keep` tokens stay raw at positions 0.. in front of the
        memory, as llama.cpp's --keep does: the attention sinks the raw window's states were decoded
        with stay in view as it slides (docs/memory-vs-window.md). 0: the training view. query_rows: with more than 0, the context captures
        the attention input of up to that many tokens of a question (memory_attention: recall ranked by
        the model's attention), and the session keeps the memory's K to score them against."""
        from uio_gguf.native.bindings import Capture, probe

        self.runtime = runtime
        self.segment, self.slots = runtime.bundle.segment, runtime.bundle.slots
        # feed never decodes past a segment boundary at once, but a recall is decoded 512 tokens at a time
        # (llama.cpp's default batch; ~10% faster than 128 for a 1,024-token recall over a 16K book's memory)
        n_batch = 512
        model = runtime.model
        dk = model.n_head_kv * model.head_dim
        self._capture = Capture(runtime.plugin, model.n_layer, model.n_embd, dk, dk, query_rows) if query_rows else None
        self.ctx = Context(
            runtime.model,
            ContextSettings(
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                n_seq_max=2,
                flash_attn=flash_attn,
                type_k=type_k,
                type_v=type_v,
                n_threads=n_threads,
                cb_eval=self._capture.callback if self._capture else None,
                cb_eval_user_data=self._capture.user_data if self._capture else None,
            ),
        )
        self.layout = probe(runtime.plugin, self.ctx.ptr, SCRATCH_SEQ)  # checks llama.cpp's state format
        self.ctx.clear()
        # llama.cpp lowers n_batch to a small n_ctx; a larger batch would abort it (GGML_ASSERT).
        self.batch = Batch(min(n_batch, llama_cpp.llama_n_batch(self.ctx.ptr)), 0, 1)
        self.keep = keep
        self.sink: list[int] = []  # the text's first tokens kept raw at positions 0 .. len(sink)-1
        self.n_mem = 0  # memory cells (right after the sink: positions len(sink) .. len(sink)+n_mem-1)
        self.raw: list[int] = []  # tokens of the raw window, right after the memory
        self.recall: list[int] = []  # recalled tokens, between raw[:recall_at] and raw[recall_at:]
        self._recall_lead: list[int] = []  # what the recall was decoded after, alone (set_recall's lead)
        self.recall_at = 0
        self.compressed_segments = 0
        self.tokens_seen = 0  # tokens of text the conversation stands for (memory + raw)
        self.raw_window = raw_window
        # After each compression, decode the raw window again behind the memory as it now stands (reread):
        # the view the heads are trained and diagnosed on. Without it the raw cells keep the states they
        # were decoded with, beside tokens that have since left the window (docs/memory-vs-window.md).
        self.reread = False
        # Decode the recalled passages in the conversation, after the raw window (they read the memory and
        # the raw window, as a plain prompt of the same tokens reads them), instead of alone. Alone, their
        # states never see the raw window: with a raw window of 1,024 tokens SmolLM2-135M missed the demo's
        # access code that it read in the passage; in the conversation it answers at every R (docs/memory-vs-window.md).
        self.recall_in_context = False
        # The most memory cells the decoder holds (None: every segment's). When a write would pass it, the
        # oldest segments' cells go, after the first `memory_sink` segments of the text, which stay, and the
        # later cells move down (seq_rm + seq_add, as the raw window slides): a constant number of memory
        # cells at any length, the memory of the text's latest segments (docs/memory-vs-window.md).
        self.memory_window: int | None = None
        self.memory_sink = 0
        self._recall_ctx: Context | None = None  # made at the first recall (set_recall)
        self._recall_states = runtime.recall_states  # recalls decoded before by this runtime's sessions
        self.recall_decoded = self.recall_reused = 0  # recalled tokens decoded / taken from recall_states
        # the memory's K before RoPE, float16, per write: (n_layer, cells, n_embd_k_gqa)
        self._keys: list[np.ndarray] | None = [] if query_rows else None
        self._last_logits: np.ndarray | None = None  # the last token fed (None: nothing to sample from)
        # What the last answer came to, for the OpenAI shapes (`usage`, finish_reason stop/length), and
        # whether the loop guard cut it (set by generate, also for an answer its consumer left early).
        self.generated, self.finish_reason, self.looped = 0, None, False

    @property
    def raw_window(self) -> int:
        return self._raw_window

    @raw_window.setter
    def raw_window(self, tokens: int | None) -> None:
        tokens = self.segment if tokens is None else int(tokens)
        if tokens < self.segment:
            raise UIOError(f"the raw window must hold at least one segment ({self.segment} tokens), not {tokens}")
        if len(self.raw) >= tokens:
            raise RuntimeError(f"the raw window already holds {len(self.raw)} tokens, not fewer than {tokens}")
        self._raw_window = tokens

    @property
    def n_past(self) -> int:
        """Cells in use by the conversation: sink + memory + recall + raw window."""
        return self.memory_end + len(self.recall) + len(self.raw)

    @property
    def memory_end(self) -> int:
        """The position right after the memory (where the raw window starts)."""
        return len(self.sink) + self.n_mem

    @property
    def recall_start(self) -> int:
        """The position of the recall's first cell (right after the raw tokens read before it)."""
        return self.memory_end + self.recall_at

    # ----- memory -----------------------------------------------------------------------------
    def limit_memory(self, cells: int | None, sink_segments: int = 0) -> None:
        """Holds at most `cells` memory cells from the next write on (None: no limit), the first
        `sink_segments` segments of the text always among them (see memory_window)."""
        check_memory_window(cells, self.slots, sink_segments)
        self.memory_window, self.memory_sink = cells, (sink_segments if cells is not None else 0)

    def keep_sink(self, tokens) -> None:
        """Decodes the text's first `keep` of `tokens` raw at positions 0.. of an empty conversation, for
        memory added next (add_memory) to sit behind: the layout feed leaves when it compresses the
        text's first segment with keep (causal, so the cells are the same)."""
        if self.n_past:
            raise RuntimeError("the kept tokens go into an empty conversation only")
        tokens = [int(t) for t in tokens][: self.keep]
        if not tokens:
            return
        self._check_room(len(tokens))
        self._decode_at(tokens, 0, last_logits=False)
        self.sink = tokens

    def add_memory(self, memory: SegmentMemory) -> None:
        """Appends the memory of whole segments (compressed elsewhere, e.g. read from a memory file)
        right after the existing memory. The raw window must be empty."""
        if self.raw:
            raise RuntimeError("memory can only be added at a segment boundary (raw window not empty)")
        self._write_memory(memory)
        self.tokens_seen += len(memory.k) * self.segment

    def _write_memory(self, memory: SegmentMemory) -> None:
        compressed = len(memory.k)  # every segment given, held or left out by the memory window
        if compressed == 0:
            return
        memory = self._fit_memory_window(memory)
        n_seg = len(memory.k)  # the segments held
        self._check_room(n_seg * self.slots)
        self.compressed_segments += compressed
        if self.recall or self.raw:  # they move up to make room right after the memory (K re-rotated at next decode)
            self.ctx.seq_add(DECODER_SEQ, self.memory_end, -1, n_seg * self.slots)
        positions = np.arange(self.memory_end, self.memory_end + n_seg * self.slots, dtype=np.int32)
        n_layer = memory.k.shape[1]
        # (N, n_layer, k, w) -> (n_layer, N·k, w): cells in position order, per layer, in one float32 copy
        # each (a 56K-token book's memory is 160 MB per array)
        k = np.ascontiguousarray(memory.k.transpose(1, 0, 2, 3), dtype=np.float32).reshape(
            n_layer, n_seg * self.slots, -1
        )
        v = np.ascontiguousarray(memory.v.transpose(1, 0, 2, 3), dtype=np.float32).reshape(
            n_layer, n_seg * self.slots, -1
        )
        if self._keys is not None:
            self._keys.append(k.astype(np.float16))  # before RoPE: ranking scores content, not distance
        k = self.runtime.rope.rotate_in_place(k, positions)
        from uio_gguf.native.bindings import kv_write

        kv_write(self.runtime.plugin, self.ctx.ptr, self.layout, DECODER_SEQ, SCRATCH_SEQ, positions, k, v)
        self.n_mem += n_seg * self.slots

    def _fit_memory_window(self, memory: SegmentMemory) -> SegmentMemory:
        """Makes room for `memory` inside memory_window: drops the oldest segments held after the sink
        segments, and leaves out the oldest of `memory` itself when it alone passes the window. Returns
        what is left of `memory` to write."""
        if self.memory_window is None:
            return memory
        limit = self.memory_window // self.slots  # segments
        held, incoming = self.n_mem // self.slots, len(memory.k)
        over = held + incoming - limit
        if over <= 0:
            return memory
        if self._capture is not None:  # its scores index every compressed segment
            raise UIOError("recall ranked by attention reads the whole memory: it takes no memory window")
        dropped = min(over, max(0, held - self.memory_sink))
        if dropped:
            self._drop_memory(dropped)
        left_out = over - dropped
        if not left_out:
            return memory
        sink_part = max(0, self.memory_sink - held)  # incoming segments that complete the sink
        keep = list(range(sink_part)) + list(range(sink_part + left_out, incoming))
        return SegmentMemory(memory.k[keep], memory.v[keep], None if memory.h is None else memory.h[keep])

    def _drop_memory(self, segments: int) -> None:
        """Removes the memory cells of `segments` segments right after the sink segments; every later cell
        moves down (K re-rotated at the next decode)."""
        first = len(self.sink) + self.memory_sink * self.slots
        cells = segments * self.slots
        self.ctx.seq_rm(DECODER_SEQ, first, first + cells)
        self.ctx.seq_add(DECODER_SEQ, first + cells, -1, -cells)
        self.n_mem -= cells

    def restore(self, state, segments: int, raw, sink=()) -> bool:
        """Takes an empty conversation to a saved start state (uio_gguf.store.start_state): the kept
        tokens `sink`, the memory of `segments` segments (those the memory window holds, if any: limit_memory
        first), then the raw tokens `raw`. False, with the
        conversation left empty, when the state does not hold exactly those cells."""
        if self.n_past:
            raise RuntimeError("a start state is restored into an empty conversation only")
        sink = [int(t) for t in sink]
        try:
            self.ctx.set_seq_state(state, DECODER_SEQ)
        except UIOError:
            self.ctx.seq_rm(DECODER_SEQ)
            return False
        held = held_memory_cells(segments * self.slots, self.memory_window) // self.slots
        cells = len(sink) + held * self.slots + len(raw)
        if self.ctx.seq_pos_max(DECODER_SEQ) != cells - 1 or len(raw) >= self.raw_window or len(sink) > self.keep:
            self.ctx.seq_rm(DECODER_SEQ)
            return False
        self.sink, self.n_mem, self.compressed_segments = sink, held * self.slots, segments
        if self._keys is not None:
            self._keys = None  # the state holds no K to score against: remember_keys() gives it
        self.raw = [int(t) for t in raw]
        self.tokens_seen = segments * self.segment + len(self.raw)
        self._last_logits = None  # nothing to sample from before the next feed
        return True

    def reset(self) -> None:
        """Empties the conversation: no memory, recall or raw tokens."""
        self.ctx.seq_rm(DECODER_SEQ)
        self.n_mem = self.compressed_segments = self.tokens_seen = 0
        self.sink, self.recall, self.raw, self.recall_at = [], [], [], 0
        self._keys = [] if self._capture is not None else None
        self._last_logits = None

    def _check_room(self, cells: int) -> None:
        if self.n_past + cells > self.ctx.n_ctx:
            raise UIOError(
                f"the decoder context is full ({self.ctx.n_ctx} cells: {len(self.sink)} kept + {self.n_mem} memory + "
                f"{len(self.recall)} recall + "
                f"{len(self.raw)} raw); "
                "start a new session or use a larger --n-ctx"
            )

    def _compress_oldest(self) -> None:
        """The raw window's oldest segment becomes k memory slots right after the memory; its raw cells
        go and the later cells shift down (seq_rm + seq_add; K re-rotated at the next decode, once, by
        the sum of the shifts). They keep the states they were decoded with. A recall that sits inside
        that segment stays, moved down to the front of the raw window."""
        seg, raw_at = self.segment, self.memory_end
        before = min(self.recall_at, seg) if self.recall else seg  # the segment's tokens before the recall
        after = seg - before  # and after it
        oldest, self.raw = self.raw[:seg], self.raw[seg:]
        memory = self.runtime.encoder.compress(np.asarray([oldest], dtype=np.int32))
        kept = 0
        if self.keep and raw_at == 0 and not self.compressed_segments:  # the text's first segment, at position 0
            kept = min(self.keep, before)
            self.sink = oldest[:kept]
        self.ctx.seq_rm(DECODER_SEQ, raw_at + kept, raw_at + before)
        if self.recall:
            recall_start = raw_at + self.recall_at  # as before this compression (the sink may have grown)
            recall_end = recall_start + len(self.recall)
            if after:
                self.ctx.seq_rm(DECODER_SEQ, recall_end, recall_end + after)
            # the raw tokens between the segment and the recall (if any), and the recall, move down
            self.ctx.seq_add(DECODER_SEQ, raw_at + before, recall_end, kept - before)
            self.ctx.seq_add(DECODER_SEQ, recall_end + after, -1, kept - seg)
            self.recall_at = max(0, self.recall_at - seg)
        elif self.raw:
            self.ctx.seq_add(DECODER_SEQ, raw_at + seg, -1, kept - seg)
        self._write_memory(memory)
        if self.reread:
            self._reread_raw()

    def _reread_raw(self) -> None:
        """Decodes the raw window's tokens again at their positions behind the memory, so that each
        attends over [kept][memory][the raw tokens before it] as the training view has it; the raw window's
        first token becomes its attention sink again. A recall decoded alone reads nothing of the raw window,
        so it keeps its cells (taken again from the runtime's recall states: llama.cpp decodes a sequence's
        tokens only after its last cell, so the recall's cells go while the raw tokens before them are decoded
        again, then come back, then the raw tokens after them). A recall read in context (recall_in_context)
        is read again with the raw tokens, in its place. The last raw token's logits are left for sampling
        (those of the view read again)."""
        at = self.memory_end
        if self.recall and self.recall_in_context:  # one decode: its last token leaves the logits, even
            # where no raw token follows the recall (a decode of the recall alone would leave none)
            self.ctx.seq_rm(DECODER_SEQ, at, -1)
            self._decode_at(self.raw[: self.recall_at] + self.recall + self.raw[self.recall_at :], at, last_logits=True)
            return
        before, after = (self.raw[: self.recall_at], self.raw[self.recall_at :]) if self.recall else (self.raw, [])
        self.ctx.seq_rm(DECODER_SEQ, at, -1)
        self._decode_at(before, at, last_logits=not after)
        if self.recall:
            self._put_recall(at + len(before))
        self._decode_at(after, at + len(before) + len(self.recall), last_logits=True)

    def _decode_at(self, tokens: list[int], start: int, last_logits: bool) -> None:
        """Decodes tokens into the conversation at positions start.., batch by batch (no logits, or the
        last token's only)."""
        cap = self.batch.capacity
        for at in range(0, len(tokens), cap):
            chunk = tokens[at : at + cap]
            final = last_logits and at + cap >= len(tokens)
            outputs = [final and i == len(chunk) - 1 for i in range(len(chunk))]
            self.batch.fill(
                np.arange(start + at, start + at + len(chunk)), [[DECODER_SEQ]] * len(chunk), outputs, tokens=chunk
            )
            self.ctx.decode(self.batch)

    # ----- the question's attention over the memory (recall ranking) -------------------------------
    @property
    def ranks_by_attention(self) -> bool:
        """Made with query_rows: the context captures the question's attention inputs."""
        return self._capture is not None

    def remember_keys(self, memory: SegmentMemory) -> None:
        """Gives a session restored from a start state the K of its memory (the same segments, as made),
        for memory_attention."""
        if self._capture is None:
            raise RuntimeError("this session was made without query_rows")
        n = len(memory.k)
        if n * self.slots != self.n_mem:
            raise RuntimeError(f"the memory has {n * self.slots} cells, the conversation {self.n_mem}")
        n_layer = memory.k.shape[1]
        self._keys = [
            np.ascontiguousarray(memory.k.transpose(1, 0, 2, 3), dtype=np.float16).reshape(n_layer, self.n_mem, -1)
        ]

    def memory_attention(self, tokens, projection) -> np.ndarray:
        """How much `tokens` (a question) attend to each memory segment (uio_gguf.memory.attention_rank): they are
        decoded after the conversation as it stands, their attention inputs captured (the last
        query_rows of them), and their cells removed again. -> (compressed_segments,), summing to 1."""
        from uio_gguf.memory.attention_rank import segment_scores
        from uio_gguf.native.bindings import CaptureKind

        if self._capture is None or self._keys is None:
            raise RuntimeError("memory_attention needs a session made with query_rows (and its memory's K)")
        tokens = [int(t) for t in tokens]
        if not tokens or not self.n_mem:
            return np.zeros(self.compressed_segments)
        self._check_room(len(tokens))
        at, cap = self.n_past, self.batch.capacity
        rows = min(len(tokens), self._capture.max_rows, cap)
        head, tail = tokens[:-rows], tokens[-rows:]
        self._last_logits = None  # what follows must be fed before sampling
        try:
            self._decode_at(head, at, last_logits=False)
            positions = np.arange(at + len(head), at + len(tokens))
            self.batch.fill(positions, [[DECODER_SEQ]] * rows, [i == rows - 1 for i in range(rows)], tokens=tail)
            self._capture.decode(self.ctx, self.batch, rows)
            h = self._capture.layers(CaptureKind.ATTN_NORM)
        finally:
            self.ctx.seq_rm(DECODER_SEQ, at, -1)
        if len(self._keys) > 1:
            self._keys = [np.concatenate(self._keys, axis=1)]
        model = self.runtime.model
        # No RoPE on either side: with it, the 135M model's attention leans on the latest segments whatever the
        # question (the demo's access-code segment ranked 70th of 105; 3rd by content alone)
        return segment_scores(projection(h), self._keys[0], model.n_head_kv, model.head_dim, self.slots)

    # ----- recall -----------------------------------------------------------------------------
    def set_recall(self, tokens, lead=()) -> None:
        """Replaces the recalled passages with `tokens`, as raw cells after the raw window read so far, so
        that the question fed next follows them (docs/design.md §6). The previous recall's cells are
        removed and the raw cells after them shift down (llama.cpp seq_rm + seq_add; K is re-rotated at
        the next decode), so the cache stays [memory][raw][recall][raw] at contiguous positions however
        many times it is replaced. A recall that the raw window's compression reaches moves down to the
        front of the raw window (_compress_oldest).

        The passages are decoded in a small context of their own, at their final positions, and their
        cells moved in (llama.cpp's sequence state): they attend over each other only, as a plain prompt
        of those passages would. Decoded here, every token would attend (masked) over every cell of the
        unified cache: at 56K tokens 7,000 memory cells made a 900-token recall take 16 s instead of 2 s.

        lead: tokens decoded right before the passages in that context and left out of the conversation:
        the document's first token, on which the model's attention leans (an attention sink). Passages
        decoded without it lean on their own first token instead; at 56K the answer then drifted from
        the recalled pass key (docs/design.md §6).

        With recall_in_context the passages are decoded in the conversation instead, right after the raw
        window, reading everything before them (no lead: the conversation has its own first cells); their
        cost grows with the cells they read, which the memory window bounds."""
        tokens = [int(t) for t in tokens]
        self._check_room(len(tokens) - len(self.recall))
        self._remove_recall()
        self.recall_at, start = len(self.raw), self.n_past
        self._recall_lead = [int(t) for t in lead] if len(lead) <= start else []  # it needs positions before
        self._last_logits = None  # what follows must be fed before sampling
        self.recall = tokens
        if tokens and self.recall_in_context:
            self._decode_at(tokens, start, last_logits=False)
        elif tokens:
            self._put_recall(start)

    def _put_recall(self, start: int) -> None:
        """The recall decoded alone (after its lead) at positions start.., its cells given to the conversation."""
        lead = self._recall_lead
        self.ctx.set_seq_state(self._decode_alone(lead + self.recall, start - len(lead), keep_from=start), SCRATCH_SEQ)
        self.ctx.seq_cp(SCRATCH_SEQ, DECODER_SEQ)  # shares the cells: nothing is copied
        self.ctx.seq_rm(SCRATCH_SEQ)

    def _remove_recall(self) -> None:
        """Removes the recall's cells; the raw cells after them shift down."""
        if not self.recall:
            return
        start, n = self.recall_start, len(self.recall)
        self.ctx.seq_rm(DECODER_SEQ, start, start + n)
        if self.recall_at < len(self.raw):
            self.ctx.seq_add(DECODER_SEQ, start + n, -1, -n)
        self.recall = []
        self._last_logits = None

    def _decode_alone(self, tokens: list[int], start: int, keep_from: int):
        """The cells at positions >= keep_from of `tokens` decoded by themselves at positions start.., as a
        llama.cpp sequence state. The same tokens decoded before for this runtime (at any start) are not
        decoded again: their saved cells are moved to the new positions (uio_gguf/memory/recall_states.py).
        The decode runs on the runtime's prefill model (the encoder's weight format)."""
        s = self.ctx.settings
        key = (tuple(tokens), keep_from - start, s.type_k, s.type_v, s.flash_attn)
        saved = self._recall_states.get(key)
        if saved is not None:
            self.recall_reused += len(tokens)
            return saved.state if saved.start == keep_from else self._moved(saved, keep_from, len(tokens))
        ctx = self._recall_context(len(tokens))
        ctx.clear()
        for at in range(0, len(tokens), self.batch.capacity):
            chunk = tokens[at : at + self.batch.capacity]
            positions = np.arange(start + at, start + at + len(chunk))
            self.batch.fill(positions, [[0]] * len(chunk), [False] * len(chunk), tokens=chunk)
            ctx.decode(self.batch)
        self.recall_decoded += len(tokens)
        if keep_from > start:
            ctx.seq_rm(0, start, keep_from)
        state = ctx.seq_state(0)
        ctx.clear()
        self._recall_states.put(key, state, keep_from)
        return state

    def _recall_context(self, n_tokens: int) -> Context:
        """The recall's own context, of at least n_tokens + 1 cells (one for _moved's shift)."""
        need = -(-(n_tokens + 1) // 256) * 256  # llama.cpp pads a context to 256 cells anyway
        if self._recall_ctx is None or self._recall_ctx.n_ctx < need:
            if self._recall_ctx is not None:
                self._recall_ctx.close()
            # the conversation's cache settings, without its attention capture
            settings = replace(
                self.ctx.settings,
                n_ctx=need,
                n_batch=self.batch.capacity,
                n_ubatch=min(RECALL_UBATCH, self.batch.capacity),
                cb_eval=None,
                cb_eval_user_data=None,
            )
            self._recall_ctx = Context(self.runtime.prefill_model, settings)
        return self._recall_ctx

    def _moved(self, saved, keep_from: int, n_tokens: int):
        """A saved recall's cells moved to start at keep_from: restored in the recall context, shifted
        (llama.cpp re-rotates K at the next decode, so one token is decoded in another sequence), saved again."""
        ctx = self._recall_context(n_tokens)
        ctx.clear()
        ctx.set_seq_state(saved.state, 0)
        ctx.seq_add(0, -1, -1, keep_from - saved.start)
        self.batch.fill([0], [[1]], [False], tokens=[self.runtime.model.eos])
        ctx.decode(self.batch)
        ctx.seq_rm(1)
        state = ctx.seq_state(0)
        ctx.clear()
        return state

    # ----- tokens -----------------------------------------------------------------------------
    def feed(
        self, tokens, all_logits: bool = False, should_stop: Callable[[], bool] | None = None
    ) -> np.ndarray | None:
        """Decodes tokens into the conversation, compressing at every segment boundary.

        Returns the logits of every token (n, n_vocab) with all_logits, else of the last token only
        (n_vocab,). The last token's logits stay readable through `self.last_index` for sampling.
        should_stop: polled before each batch (a long turn compresses many segments); true raises Stopped,
        leaving the session part-fed (to be closed)."""
        tokens = [int(t) for t in tokens]
        self.tokens_seen += len(tokens)
        rows = []
        last = None
        while tokens:
            if should_stop is not None and should_stop():
                raise Stopped
            take = min(self.raw_window - len(self.raw), self.batch.capacity, len(tokens))
            chunk, tokens = tokens[:take], tokens[take:]
            self._check_room(take)
            positions = np.arange(self.n_past, self.n_past + take)
            outputs = [True] * take if all_logits else [i == take - 1 for i in range(take)]
            self.batch.fill(positions, [[DECODER_SEQ]] * take, outputs, tokens=chunk)
            self.ctx.decode(self.batch)
            if all_logits:
                rows.extend(self.ctx.logits(i) for i in range(take))
            last = self.ctx.logits(take - 1) if not all_logits else rows[-1]
            self.raw.extend(chunk)
            if len(self.raw) == self.raw_window:
                self._compress_oldest()
        self._last_logits = last
        if all_logits:
            return np.stack(rows) if rows else np.zeros((0, self.runtime.model.n_vocab), np.float32)
        return last

    def generate(self, params: SamplingParams, should_stop: Callable[[], bool] = lambda: False) -> Iterator[str]:
        """Streams the answer's text. The context must have been fed at least one token. Stops at an
        end-of-generation token, a stop string, max_tokens, or when should_stop() turns true."""
        if self._last_logits is None:
            raise RuntimeError("feed a prompt before generating")
        sampler = Sampler(params, self.runtime.model.n_vocab, self.runtime.model.vocab)
        outcome = AnswerOutcome()
        try:
            yield from stream_answer(
                lambda: self._sample(sampler), self.feed, self.runtime.model, params, outcome, should_stop
            )
            # The repeat the guard cut (or the text after a stop string) was decoded but never shown: the
            # cache keeps what the user saw, not what the next turn should not build on.
            outcome.generated -= self.take_back(outcome.unshown)
        finally:
            self.generated, self.finish_reason, self.looped = outcome.generated, outcome.finish_reason, outcome.looped
            sampler.close()

    def take_back(self, n: int) -> int:
        """Removes the last n tokens fed from the raw window (those a compression has already taken into
        the memory stay); returns how many it removed. The next feed decodes after what is left."""
        n = min(n, len(self.raw) - (self.recall_at if self.recall else 0))  # the tokens after the recall
        if n <= 0:
            return 0
        self.ctx.seq_rm(DECODER_SEQ, self.n_past - n, -1)
        self.raw = self.raw[:-n]
        self.tokens_seen -= n
        self._last_logits = None  # the logits llama.cpp holds are the removed token's
        return n

    def _sample(self, sampler: Sampler) -> int:
        """Samples from the last decoded token's logits, which llama.cpp still holds: a compression in
        between only runs the encoder's own context and writes cells into this one."""
        return int(sampler.sample(self.ctx, -1))

    def close(self) -> None:
        if getattr(self, "_recall_ctx", None) is not None:
            self._recall_ctx.close()
        if hasattr(self, "ctx"):
            self.ctx.close()  # before the capture its eval callback points into
        if getattr(self, "_capture", None) is not None:
            self._capture.close()
