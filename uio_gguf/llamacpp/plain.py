"""PlainContext: one sequence in a plain llama.cpp context, without memory. The baselines UIO is
measured against (eval ppl, eval qa) and the plain side of `uio-gguf bench` decode in it.

With `keep`, a decode that would pass the context's end fills it to its last cell, then makes room as
llama.cpp's context shift does (its --keep): the first `keep` tokens stay, the older half of the others
goes, the rest shift down (seq_rm + seq_add, K re-rotated at the next decode). Why keep 4: a model that loses its first tokens
(its attention sinks, StreamingLLM) breaks down: uio_gguf/evals/ppl.py gives the measurement.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from uio_gguf.handles import Handle
from uio_gguf.llamacpp.api import Batch, Context, ContextSettings

MAX_BATCH = 512
SINK_TOKENS = 4  # tokens at the start that a context shift never drops (StreamingLLM's choice)


def chunks(tokens, size: int) -> Iterator[np.ndarray]:
    tokens = np.asarray(tokens)
    for start in range(0, len(tokens), size):
        yield tokens[start : start + size]


class PlainContext(Handle):
    """One sequence in a plain llama.cpp context (no memory), with the runtime's cache settings."""

    def __init__(self, runtime, n_ctx: int, n_batch: int, keep: int | None = None, drop: int | None = None, model=None):
        """keep: with a number, decode() shifts the context when it is full, keeping that many first
        tokens and dropping `drop` cells after them (None: the older half of the others); keep None: the
        caller sees to it that everything fits. model: another of the runtime's models (default: the
        decoder's, runtime.model)."""
        self.ctx = Context(
            model or runtime.model,
            ContextSettings(
                n_ctx=n_ctx,
                n_batch=n_batch,
                n_ubatch=n_batch,
                flash_attn=runtime.flash_attn,
                type_k=runtime.kv_type,
                type_v=runtime.kv_type,
                n_threads=runtime.n_threads,
            ),
        )
        self.batch = Batch(n_batch)
        self.n_ctx, self.keep, self.shift = n_ctx, keep, drop
        self.n_past = 0

    @classmethod
    def shifting(cls, runtime, window: int, keep: int = SINK_TOKENS, drop: int | None = None) -> PlainContext:
        """A context of `window` cells that shifts when full: its batch is at most half the unpinned
        window (or `drop` cells), which always fits once they are gone."""
        n_batch = min(drop or (window - keep) // 2, MAX_BATCH)
        return cls(runtime, n_ctx=window, n_batch=n_batch, keep=keep, drop=drop)

    def feed(self, tokens) -> np.ndarray:
        """Decodes tokens batch by batch after those already in; only the last token's logits (prefill)."""
        for chunk in chunks(tokens, self.batch.capacity):
            self.decode(chunk, all_logits=False)
        return self.ctx.logits(-1)

    def decode(self, tokens, all_logits: bool = True) -> np.ndarray | None:
        """One batch after the tokens already in: the logits of every token (n, n_vocab); without
        all_logits only the last token's are computed (ctx.logits(-1)) and None is returned."""
        room = self.n_ctx - self.n_past
        if self.keep is not None and len(tokens) > room:
            # the window is filled to its last cell before it shifts, as llama.cpp's generation loop fills it
            # token by token: a batch cut at the shift, not the whole batch moved past it (which left up
            # to a batch of cells unused)
            head = self._decode(tokens[:room], all_logits) if room else None  # room >= 0: n_past <= n_ctx
            self.drop(self.keep, self.shift or (self.n_past - self.keep) // 2)
            tail = self.decode(tokens[room:], all_logits)
            return np.concatenate([head, tail]) if all_logits and head is not None else tail
        return self._decode(tokens, all_logits)

    def _decode(self, tokens, all_logits: bool) -> np.ndarray | None:
        n = len(tokens)
        outputs = [True] * n if all_logits else [i == n - 1 for i in range(n)]
        self.batch.fill(np.arange(self.n_past, self.n_past + n), [[0]] * n, outputs, tokens=tokens)
        self.ctx.decode(self.batch)
        self.n_past += n
        return np.stack([self.ctx.logits(i) for i in range(n)]) if all_logits else None

    def drop(self, keep: int, n: int) -> None:
        """llama.cpp's context shift: the n cells after the first `keep` go, the later ones move down by n."""
        self.ctx.seq_rm(0, keep, keep + n)
        self.ctx.seq_add(0, keep + n, -1, -n)
        self.n_past -= n

    def clear(self) -> None:
        self.ctx.clear()
        self.n_past = 0

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()
