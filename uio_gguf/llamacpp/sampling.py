"""Sampling an answer: its parameters, llama.cpp's sampler chain, and the loop that samples, feeds and
streams the answer's text (stop strings, the token limit, the loop guard). Chat's sessions and eval qa's
plain-context baselines answer through it.
"""

from __future__ import annotations

import codecs
import ctypes
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import llama_cpp

from uio_gguf.errors import UIOError
from uio_gguf.handles import Handle
from uio_gguf.llamacpp.api import Context
from uio_gguf.llamacpp.loop_guard import LoopGuard


def _stop_prefix(text: str, stops: list[str]) -> int:
    """How many of text's last characters could be the start of a stop string (held until it is told)."""
    return max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)


@dataclass
class SamplingParams:
    temperature: float = 0.0  # 0: greedy
    top_k: int = 40
    top_p: float = 0.95
    seed: int = 0
    max_tokens: int = 256
    stop: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        """Values without a meaning are refused (one line), not silently read as something else. An empty
        stop string is ignored (it would end every answer before its first token)."""
        self.stop = [s for s in self.stop if s]
        checks = [
            (self.max_tokens >= 0, f"max tokens must be 0 or more, not {self.max_tokens}"),
            (
                math.isfinite(self.temperature) and self.temperature >= 0,
                f"the temperature must be 0 (greedy) or a finite number above it, not {self.temperature}",
            ),
            (self.top_k >= 0, f"top-k must be 0 (off) or more, not {self.top_k}"),
            (0 <= self.top_p <= 1, f"top-p must lie between 0 and 1, not {self.top_p}"),
            (
                math.isfinite(self.dry_multiplier) and self.dry_multiplier >= 0,
                f"the DRY multiplier must be 0 (off) or a finite number above it, not {self.dry_multiplier}",
            ),
            (
                math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0,
                f"the repetition penalty must be a finite number above 0 (1: off), not {self.repeat_penalty}",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise UIOError(message)

    repeat_penalty: float = 1.0  # llama.cpp's repetition penalty over the last repeat_last_n tokens; 1: off
    repeat_last_n: int = 64
    # llama.cpp's DRY sampler ("don't repeat yourself"): a token that would extend a sequence already
    # seen in the answer past dry_allowed_length tokens is penalised by multiplier·base^(excess); 0: off
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_last_n: int = 0  # tokens looked back over; 0: the whole answer (DRY sees the answer's tokens only)
    # Stop where the answer starts to repeat itself (uio_gguf.llamacpp.loop_guard); chat and the server turn it on.
    loop_guard: bool = False


class Sampler(Handle):
    """llama.cpp's own sampler chain (top-k, top-p, temperature, seeded draw; or greedy)."""

    DRY_BREAKERS = (b"\n", b":", b'"', b"*")  # llama.cpp's defaults: a repeat restarts at these

    def __init__(self, params: SamplingParams, n_vocab: int, vocab=None):
        """vocab: the model's llama_vocab, which the DRY sampler needs (DRY stays off without it)."""
        self.ptr = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        add = lambda s: llama_cpp.llama_sampler_chain_add(self.ptr, s)  # noqa: E731 - the chain owns s
        if params.repeat_penalty != 1.0 and params.repeat_last_n != 0:
            # this llama.cpp's signature still takes n_vocab first (see its llama.h)
            add(llama_cpp.llama_sampler_init_penalties(n_vocab, params.repeat_last_n, params.repeat_penalty, 0.0, 0.0))
        if params.dry_multiplier > 0 and vocab is not None:
            breakers = (ctypes.c_char_p * len(self.DRY_BREAKERS))(*self.DRY_BREAKERS)
            add(
                llama_cpp.llama_sampler_init_dry(
                    vocab,
                    params.dry_multiplier,
                    params.dry_base,
                    params.dry_allowed_length,
                    params.dry_last_n or max(params.max_tokens, 1),
                    breakers,
                    len(self.DRY_BREAKERS),
                )
            )
        if params.temperature <= 0:
            add(llama_cpp.llama_sampler_init_greedy())
        else:
            if params.top_k > 0:
                add(llama_cpp.llama_sampler_init_top_k(params.top_k))
            if 0 < params.top_p < 1:
                add(llama_cpp.llama_sampler_init_top_p(params.top_p, 1))
            add(llama_cpp.llama_sampler_init_temp(params.temperature))
            add(llama_cpp.llama_sampler_init_dist(params.seed))

    def sample(self, ctx: Context, index: int) -> int:
        return llama_cpp.llama_sampler_sample(self.ptr, ctx.ptr, index)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_sampler_free(self.ptr)
            self.ptr = None

    __del__ = close


@dataclass
class AnswerOutcome:
    """What stream_answer's answer came to, for the OpenAI shapes (`usage`, finish_reason stop/length)."""

    generated: int = 0  # tokens sampled and fed (not the end-of-generation token)
    finish_reason: str = "length"  # "stop": an end of turn, a stop string, should_stop() or the loop guard
    looped: bool = False  # cut by the loop guard where it began to repeat itself
    unshown: int = 0  # the last tokens fed whose text the user never saw (a cut repeat, a stop string)
    first_token_at: float | None = None  # time.perf_counter() at the first sampled token


def stream_answer(
    sample: Callable[[], int],
    feed: Callable[[list[int]], None],
    model,
    params: SamplingParams,
    outcome: AnswerOutcome,
    should_stop: Callable[[], bool] = lambda: False,
) -> Iterator[str]:
    """Samples, feeds and streams one answer's text: stops at an end-of-generation token, a stop string,
    max_tokens, when should_stop() turns true, or where the loop guard sees a repeat. The one loop of
    chat's sessions and eval qa's plain-context baselines; `outcome` is filled as it goes."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    guard = LoopGuard(params.loop_guard)
    text, shown_chars, released, hit = "", 0, 0, -1  # released: how much of text the guard has had
    starts: list[int] = []  # where each generated token's text starts in `text`
    for _ in range(params.max_tokens):
        if should_stop():
            outcome.finish_reason = "stop"
            break
        token = sample()
        if outcome.first_token_at is None:
            outcome.first_token_at = time.perf_counter()
        if model.is_eog(token):
            outcome.finish_reason = "stop"
            break
        piece = decoder.decode(model.piece(token))
        feed([token])
        outcome.generated += 1
        starts.append(len(text))
        text += piece
        hit = min((text.find(s) for s in params.stop if s in text), default=-1)
        # text before a stop string goes on; the start of one that may still complete is held
        upto = hit if hit >= 0 else len(text) - _stop_prefix(text, params.stop)
        shown, looped = guard.push(text[released:upto])  # upto never falls: a held start only grows
        released = upto
        if shown:
            shown_chars += len(shown)
            yield shown
        if hit >= 0 or looped:
            outcome.finish_reason, outcome.looped = "stop", looped
            break
    tail = ""
    if hit < 0 and not outcome.looped:  # a held start of a stop string that never completed
        tail, _ = guard.push(text[released:])
    if tail := tail + guard.flush():
        shown_chars += len(tail)
        yield tail
    if guard.looped:  # cut after the last token: by that push, or by flush() (the answer ended on a repeat)
        outcome.finish_reason, outcome.looped = "stop", True
    # A token whose text starts within what was shown stays; the rest was decoded but never shown.
    outcome.unshown = sum(1 for start in starts if start >= shown_chars)
