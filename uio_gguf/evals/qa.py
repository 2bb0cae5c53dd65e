"""`uio-gguf eval qa`: an offline long-context QA suite (RULER-style tasks), every method on the same texts.

Tasks: uio_gguf/evals/needles.py (each answer scored by exact match).

Methods (the book goes in the first user turn of the chat template, as `uio-gguf chat` reads it):
  window      no memory: the template's opening, the raw remainder UIO keeps (the tokens after the last
              full segment) and the question, in a plain llama.cpp context
  full-8k     no memory: every token, in the model's trained window with llama.cpp's context shift (the
              first 4 tokens stay, the older half of the others goes when full; as eval ppl's full-8k)
  rag         no memory: window plus the passages that recall (uio_gguf.chat.recall) brings back for the
              question, with uio+recall's budget, between the remainder and the question (where
              uio+recall reads them)
  sliding+recall  no memory: rag with the raw tokens the memory's cells could hold instead (the book's
              last tokens, as many as uio's memory cells + the remainder: a plain sliding window of the
              same cells, the opening kept as llama.cpp's --keep), then the question. What a llama.cpp
              user gets from the same cache without the memory: the baseline uio+recall has to beat.
  uio         the memory alone (Conversation with recall 0)
  uio+recall  the memory and recall (chat's default budget), passages ranked by BM25
  uio+attn    the same, segments ranked by the question's attention over their memory slots
              (uio_gguf.memory.attention_rank)
All read the training view by default: the raw window is one segment (the remainder), which window and
rag read too. --raw-window R gives the uio methods a raw window of R tokens (the book's tail that a
conversation keeps raw); window, rag and sliding+recall then read that tail too, and sliding+recall
spends the memory's (fewer) cells on the raw tokens before it.
Greedy answers of at most --max-tokens tokens. Per cell: accuracy, the share of answers that end by
themselves (end of turn before the token limit), the share with a loop (a 4-gram of words repeated 3+
times) and the median time to first token (for uio: the memory already made, as from a memory file).

Fast by construction (docs/design.md §1, §6): a segment's memory depends on that segment's tokens
alone. Each length has one filler (or --fillers of them, which the trials take in turn), compressed
once (or read from its memory file); a document is the filler's tokens with each needle's tokens written
over as many filler tokens (nothing shifts), and SegmentCache recompresses only the segments whose
tokens changed.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.evals.needles import TASKS, Document, base_document, filler_rng, found, has_loop, make_sample, splice
from uio_gguf.evals.passkey import check_grid
from uio_gguf.text import packaged

METHODS = ("window", "full-8k", "rag", "sliding+recall", "uio", "uio+recall", "uio+attn")
PLAIN_METHODS = ("window", "full-8k", "rag", "sliding+recall")  # read in a plain llama.cpp context
# uio+attn lost to BM25 (docs/evaluation.md) and costs ~3x uio+recall a question: asked for by name only
DEFAULT_METHODS = tuple(m for m in METHODS if m != "uio+attn")
RANKING = {"uio": "bm25", "uio+recall": "bm25", "uio+attn": "attention"}  # how each uio method ranks recall
DEFAULT_FILLER = packaged.HELDOUT["in"]  # held out of training (the libpng manual)
# Most tokens an answer may take, per task: three 7-digit numbers, each said in the needle's sentence
# (~15 tokens), do not fit in 48 (RULER gives its needle tasks 128 and variable tracking 30).
ANSWER_TOKENS = {"passkey": 48, "single": 48, "multikey": 48, "multivalue": 128, "vt": 48}


class SegmentCache:
    """Memory by segment: a segment's memory depends on its tokens alone, so a document that differs from
    those seen before in a few segments costs the compression of those few. Its `compress` is the
    runtime's, for a Conversation's `compress`."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.rows: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self.compressed = 0  # segments actually compressed

    def add(self, tokens, memory) -> None:
        """Memory made elsewhere (a memory file) for the full segments of `tokens`."""
        blocks = self._blocks(tokens)
        for i, block in enumerate(blocks):
            self.rows[block.tobytes()] = (memory.k[i], memory.v[i])

    def _blocks(self, tokens) -> np.ndarray:
        seg = self.runtime.segment
        tokens = np.asarray(tokens, dtype=np.int32)
        return tokens[: len(tokens) // seg * seg].reshape(-1, seg)

    def compress(self, tokens, progress=None):
        from uio_gguf.memory.encoder import SegmentMemory

        blocks = self._blocks(tokens)
        keys = [b.tobytes() for b in blocks]
        missing = list(dict.fromkeys(k for k in keys if k not in self.rows))
        if missing:
            made = self.runtime.encoder.compress(
                np.stack([np.frombuffer(k, dtype=np.int32) for k in missing]), progress=progress
            )
            for i, k in enumerate(missing):
                self.rows[k] = (made.k[i], made.v[i])
            self.compressed += len(missing)
        if not keys:
            return self.runtime.compress(tokens)
        return SegmentMemory(np.stack([self.rows[k][0] for k in keys]), np.stack([self.rows[k][1] for k in keys]))

    def clear(self) -> None:
        self.rows.clear()


def load_base(cache: SegmentCache, doc: Document, use_memory_files: bool) -> None:
    """The filler's memory into the cache: from its memory file, or compressed (and saved) once."""
    from uio_gguf.store import memory_file

    seg = cache.runtime.segment
    compressed = doc.tokens[: len(doc.tokens) // seg * seg]
    memory, from_file = memory_file.load_or_compress(cache.runtime, compressed, use_memory_files, cache.compress)
    if from_file:
        cache.add(compressed, memory)


# ----- methods ----------------------------------------------------------------------------------------
@dataclass
class Answer:
    text: str
    ended: bool  # end of turn before the token limit
    ttft: float  # seconds to the first token of the answer
    looped: bool = False  # cut by the loop guard where it began to repeat itself


def _question_tokens(model, question: str) -> np.ndarray:
    """What the chat template puts after the book in the first turn: the question and the assistant's start."""
    from uio_gguf.llamacpp.template import first_turn

    return model.tokenize(first_turn(model.chat_template(), question)[1], add_special=False)


def _plain_answer(runtime, tokens: np.ndarray, params, window: int, started: float) -> Answer:
    """Greedy answer after `tokens` in a plain llama.cpp context of `window` cells with context shift;
    the time to first token counts from `started`."""
    from uio_gguf.llamacpp.plain import PlainContext, chunks
    from uio_gguf.llamacpp.sampling import AnswerOutcome, Sampler, stream_answer

    plain = PlainContext.shifting(runtime, window)
    sampler = Sampler(params, runtime.model.n_vocab, runtime.model.vocab)

    def feed(ids) -> None:
        for chunk in chunks(ids, plain.batch.capacity):
            plain.decode(chunk, all_logits=False)

    try:
        feed([int(t) for t in tokens])
        outcome = AnswerOutcome()
        pieces = stream_answer(lambda: int(sampler.sample(plain.ctx, -1)), feed, runtime.model, params, outcome)
        text = "".join(pieces)
        ended = outcome.finish_reason == "stop" and not outcome.looped
        return Answer(text, ended, (outcome.first_token_at or time.perf_counter()) - started, outcome.looped)
    finally:
        sampler.close()
        plain.close()


def _uio_answer(
    cache: SegmentCache,
    doc: Document,
    question: str,
    params,
    recall_tokens: int,
    ranking: str = "bm25",
    raw_window: int | None = None,
    memory_window: int | None = None,
    recall_in_context: bool | None = None,
) -> Answer:
    from uio_gguf.chat.conversation import WHOLE_MEMORY, Conversation

    started = time.perf_counter()
    # default: the training view (raw window = one segment), whose raw part window and rag read too
    conversation = Conversation(
        cache.runtime,
        doc.book,
        use_memory_files=False,
        recall_tokens=recall_tokens,
        raw_window=raw_window or cache.runtime.segment,
        recall_ranking=ranking,
        compress=cache.compress,
        # memory_window here is resolved: None holds every segment's memory, which Conversation calls WHOLE_MEMORY
        memory_window=WHOLE_MEMORY if memory_window is None or ranking != "bm25" else memory_window,
        **({} if recall_in_context is None else {"recall_in_context": recall_in_context}),
    )
    try:
        making = conversation.stats.seconds  # the memory's compression: a memory file's job in chat
        text, ttft = "", None
        for piece in conversation.ask(question, params):
            ttft = ttft if ttft is not None else time.perf_counter() - started - making
            text += piece
        session = conversation.session
        ended = session.finish_reason == "stop" and not session.looped
        return Answer(text, ended, ttft if ttft is not None else time.perf_counter() - started - making, session.looped)
    finally:
        conversation.close()


def method_tokens(
    runtime,
    doc: Document,
    question: str,
    method: str,
    recall_tokens: int,
    raw_window: int | None = None,
    memory_window: int | None = None,
) -> np.ndarray:
    """The prompt a memoryless method reads: all of it (full-8k), or the opening, the raw tail UIO keeps
    with a raw window of raw_window tokens (default one segment: the remainder after the last full
    segment; sliding+recall: as many more of the book's last tokens as uio's memory has cells, at most
    memory_window), the recall (rag, sliding+recall; right before the question, where uio+recall reads it),
    then the question."""
    from uio_gguf.chat.conversation import memory_segments
    from uio_gguf.chat.recall import Recall
    from uio_gguf.memory.session import held_memory_cells

    q = _question_tokens(runtime.model, question)
    if method == "full-8k":
        return np.concatenate([doc.tokens, q])
    n_mem = memory_segments(len(doc.tokens), runtime.segment, raw_window or runtime.segment)
    raw_from = n_mem * runtime.segment
    recalled = np.zeros(0, dtype=np.int32)
    if method in ("rag", "sliding+recall") and recall_tokens and raw_from:
        recalled = Recall(runtime.model, doc.tokens[:raw_from], runtime.segment, doc.skip).recall_tokens(
            question, recall_tokens
        )
    if method == "sliding+recall":  # the memory's cells spent on the book's last raw tokens instead
        raw_from -= held_memory_cells(n_mem * runtime.slots, memory_window)
    return np.concatenate([doc.tokens[: doc.skip], doc.tokens[max(doc.skip, raw_from) :], recalled, q])


def answer(
    cache: SegmentCache,
    doc: Document,
    question: str,
    method: str,
    params,
    recall_tokens: int,
    raw_window: int | None = None,
    memory_window: int | None = None,
    recall_in_context: bool | None = None,
) -> Answer:
    runtime = cache.runtime
    if method in RANKING:
        budget = recall_tokens if method != "uio" else 0
        return _uio_answer(
            cache, doc, question, params, budget, RANKING[method], raw_window, memory_window, recall_in_context
        )
    if method in PLAIN_METHODS:
        started = time.perf_counter()  # rag's ranking counts, as uio+recall's does
        tokens = method_tokens(runtime, doc, question, method, recall_tokens, raw_window, memory_window)
        return _plain_answer(runtime, tokens, params, runtime.model.n_ctx_train, started)
    raise UIOError(f"unknown method {method!r} (choose from {', '.join(METHODS)})")


# ----- the suite --------------------------------------------------------------------------------------
def parse_names(text: str, known: tuple[str, ...], what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UIOError(f"unknown {what} {', '.join(unknown) or '(none given)'} (choose from {', '.join(known)})")
    return names


def evaluate(
    runtime,
    lengths: list[int],
    depths: list[float],
    trials: int,
    tasks: tuple[str, ...] | list[str] = TASKS,
    methods: tuple[str, ...] | list[str] = DEFAULT_METHODS,
    texts: list[str] | None = None,
    seed: int = 0,
    recall_tokens: int | None = None,
    max_tokens: int | None = None,
    loop_guard: bool = True,
    use_memory_files: bool = True,
    progress: Callable[[int, int], None] | None = None,
    partial: Callable[[dict], None] | None = None,
    fillers: int = 1,
    raw_window: int | None = None,
    memory_window: int | None = None,
    recall_in_context: bool | None = None,
) -> dict:
    """The report that `uio-gguf eval qa` prints and writes as JSON. partial(report so far) is called
    after every answer (a long run stopped midway keeps what it measured). fillers: texts drawn per
    length, trial t reading filler t % fillers; with one, every trial of a depth hides its needle in the
    same passage, so the trials sample keys, not contexts (docs/evaluation.md). raw_window: the raw tail
    every method reads (None: one segment, the training view). memory_window: the most memory cells the uio
    methods hold (None: chat's default, 0: every segment's; resolve_memory_window), and sliding+recall spends as
    many cells on raw tokens; uio+attn holds every segment's memory, which its ranking scores.
    recall_in_context: the uio methods decode the recalled passages in the conversation (Session.recall_in_context;
    None: chat's default)."""
    from uio_gguf.chat.conversation import DEFAULT_RECALL_IN_CONTEXT, resolve_memory_window
    from uio_gguf.chat.recall import DEFAULT_RECALL_TOKENS
    from uio_gguf.llamacpp.sampling import SamplingParams

    recall_tokens = DEFAULT_RECALL_TOKENS if recall_tokens is None else recall_tokens
    memory_window = resolve_memory_window(memory_window, runtime.slots)  # cells, or None: every segment's
    check_grid(lengths, depths, trials)
    if not 1 <= fillers <= trials:
        raise UIOError(f"--fillers must be from 1 to --trials ({trials}), not {fillers}")
    if recall_tokens < 0:
        raise UIOError(f"the recall budget must be 0 or more tokens, not {recall_tokens}")
    if raw_window is not None and raw_window < runtime.segment:
        raise UIOError(f"the raw window must hold at least one segment ({runtime.segment} tokens), not {raw_window}")
    if any(m.startswith("uio") for m in methods):
        limit = runtime.max_tokens()
        if max(lengths) + 64 > limit:
            raise UIOError(
                f"at ratio {runtime.bundle.ratio} the memory holds books of at most {limit} tokens "
                f"(with the template and question), not {max(lengths)}: use shorter --lengths or --ratio 32"
            )
    filler = "custom" if texts else DEFAULT_FILLER
    texts = texts or [packaged.read(DEFAULT_FILLER)]
    if max_tokens is not None and max_tokens < 1:
        raise UIOError(f"an answer needs at least 1 token, not {max_tokens}")
    budgets = {task: max_tokens or ANSWER_TOKENS[task] for task in tasks}
    params = {task: SamplingParams(max_tokens=budgets[task], loop_guard=loop_guard) for task in tasks}
    cache = SegmentCache(runtime)

    def report(samples: list[dict]) -> dict:
        return {
            "lengths": lengths,
            "depths": depths,
            "trials": trials,
            "tasks": list(tasks),
            "methods": list(methods),
            "seed": seed,
            "ratio": runtime.bundle.ratio,
            "segment": runtime.segment,
            "recall_tokens": recall_tokens,
            "raw_window": raw_window or runtime.segment,
            "memory_window": memory_window,
            "recall_in_context": DEFAULT_RECALL_IN_CONTEXT if recall_in_context is None else recall_in_context,
            "max_tokens": budgets,
            "loop_guard": loop_guard,
            "filler": filler,
            "fillers": fillers,
            "results": summarize(samples, tasks, lengths, methods),
            "samples": samples,
        }

    total = len(lengths) * len(tasks) * len(depths) * trials * len(methods)
    done, samples = 0, []
    for length in lengths:
        cache.clear()
        bases = [base_document(runtime.model, length, texts, filler_rng(seed, length, i)) for i in range(fillers)]
        if any(m.startswith("uio") for m in methods):
            for base in bases:  # the cache keeps every filler's segments: trials switch fillers for free
                load_base(cache, base, use_memory_files)
        for task in tasks:
            for depth in depths:
                for trial in range(trials):
                    rng = random.Random(f"{seed}:{task}:{length}:{depth}:{trial}")
                    sample = make_sample(task, depth, rng)
                    doc = splice(runtime.model, bases[trial % fillers], sample.needles)
                    for method in methods:
                        before = cache.compressed
                        got = answer(
                            cache,
                            doc,
                            sample.question,
                            method,
                            params[task],
                            recall_tokens,
                            raw_window,
                            memory_window,
                            recall_in_context,
                        )
                        right = [found(a, got.text) for a in sample.answers]
                        samples.append(
                            {
                                "task": task,
                                "length": length,
                                "depth": depth,
                                "trial": trial,
                                "filler": trial % fillers,
                                "method": method,
                                "question": sample.question,
                                "expected": sample.answers,
                                "answer": got.text,
                                "hit": all(right),
                                "share": sum(right) / len(right),
                                "ended": got.ended,
                                "cut": got.looped,
                                "loop": has_loop(got.text),
                                "ttft": round(got.ttft, 4),
                                "recompressed": cache.compressed - before,
                            }
                        )
                        done += 1
                        if progress:
                            progress(done, total)
                        if partial:
                            partial(report(samples))

    return report(samples)


def summarize(samples: list[dict], tasks: list[str], lengths: list[int], methods: list[str]) -> list[dict]:
    rows = []
    for task in tasks:
        for length in lengths:
            for method in methods:
                cell = [s for s in samples if (s["task"], s["length"], s["method"]) == (task, length, method)]
                if not cell:
                    continue
                rows.append(
                    {
                        "task": task,
                        "length": length,
                        "method": method,
                        "n": len(cell),
                        "hits": sum(s["hit"] for s in cell),
                        "accuracy": sum(s["hit"] for s in cell) / len(cell),
                        "ended": sum(s["ended"] for s in cell) / len(cell),
                        "cut": sum(s["cut"] for s in cell) / len(cell),
                        "loops": sum(s["loop"] for s in cell) / len(cell),
                        "ttft_median": float(np.median([s["ttft"] for s in cell])),
                        "by_depth": {
                            str(d): sum(s["hit"] for s in cell if s["depth"] == d)
                            for d in sorted({s["depth"] for s in cell})
                        },
                    }
                )
    return rows


def format_report(report: dict) -> str:
    methods = report["methods"]
    cell = {(r["task"], r["length"], r["method"]): r for r in report["results"]}
    width = max(16, *(len(m) + 2 for m in methods))  # "100% (30/30)" and a gap

    def table(title: str, value: Callable[[dict], str]) -> list[str]:
        lines = [title, f"{'task':<12}{'tokens':>9}" + "".join(f"{m:>{width}}" for m in methods)]
        for task in report["tasks"]:
            for n in report["lengths"]:
                lines.append(
                    f"{task:<12}{n:>9,}"
                    + "".join(f"{value(cell[(task, n, m)]) if (task, n, m) in cell else '-':>{width}}" for m in methods)
                )
        return lines

    lines = table(
        f"accuracy (exact match; hits / answers), ratio {report['ratio']}, recall {report['recall_tokens']} tokens, "
        f"{report['trials']} trials x {len(report['depths'])} depths a cell",
        lambda r: f"{r['accuracy']:.0%} ({r['hits']}/{r['n']})",
    )
    lines += [""] + table("answers that end by themselves", lambda r: f"{r['ended']:.0%}")
    if report.get("loop_guard"):
        lines += [""] + table("answers the loop guard cut where they began to repeat", lambda r: f"{r['cut']:.0%}")
    lines += [""] + table("answers with a loop (a 4-gram 3+ times)", lambda r: f"{r['loops']:.0%}")
    lines += [""] + table("median seconds to the first token", lambda r: f"{r['ttft_median']:.2f}")
    return "\n".join(lines)
