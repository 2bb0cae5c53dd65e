"""`uio-gguf eval qa`: an offline long-context QA suite (RULER-style tasks), every method on the same texts.

Tasks (each answer scored by exact match: every expected number or name must appear whole in the answer):
  passkey     the training task's pass-key sentence (uio_gguf.train.synthetic) at the depth asked
  single      "The special magic number for <word> is <7 digits>." at the depth asked
  multikey    4 such needles for different words (the asked one at the depth asked, the others anywhere)
  multivalue  3 numbers for one word (the first at the depth asked), all asked for
  vt          variable tracking: "VAR ABCDE = 12345." then "VAR FGHIJ = VAR ABCDE." ... spread from the depth
              asked to the end; "Which variables are assigned the value 12345?" asks for every name

Methods (the book goes in the first user turn of the chat template, as `uio-gguf chat` reads it):
  window      no memory: the template's opening, the raw remainder UIO keeps (the tokens after the last
              full segment) and the question, in a plain llama.cpp context
  full-8k     no memory: every token, in the model's trained window with llama.cpp's context shift (the
              first 4 tokens stay, the older half of the others goes when full; as eval ppl's full-8k)
  rag         no memory: window plus the passages that recall (uio_gguf.chat.recall) brings back for the
              question, with uio+recall's budget, between the opening and the remainder
  uio         the memory alone (Conversation with recall 0)
  uio+recall  the memory and recall (chat's default budget), passages ranked by BM25
  uio+attn    the same, segments ranked by the question's attention over their memory slots
              (uio_gguf.memory.attention_rank)
Both read the training view: the raw window is one segment (the remainder), which window and rag read
too; chat's longer default raw window (uio_gguf.chat.conversation.DEFAULT_RAW_SEGMENTS) is not a column yet.
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
import re
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.evals.passkey import check_grid, filler_text
from uio_gguf.train.synthetic import KEY_NAMES, PASSKEY_QUESTION, passkey_fact

TASKS = ("passkey", "single", "multikey", "multivalue", "vt")
METHODS = ("window", "full-8k", "rag", "uio", "uio+recall", "uio+attn")
# uio+attn lost to BM25 (docs/evaluation.md) and costs ~3x uio+recall a question: asked for by name only
DEFAULT_METHODS = tuple(m for m in METHODS if m != "uio+attn")
RANKING = {"uio": "bm25", "uio+recall": "bm25", "uio+attn": "attention"}  # how each uio method ranks recall
DEFAULT_LENGTHS = "4096,16384,32768,56000"
# Held out of training (docs/evaluation.md: the libpng manual is a held-out document of `uio-gguf data`).
DEFAULT_FILLER = "heldout_libpng_manual.txt"
# Most tokens an answer may take, per task: three 7-digit numbers, each said in the needle's sentence
# (~15 tokens), do not fit in 48 (RULER gives its needle tasks 128 and variable tracking 30).
ANSWER_TOKENS = {"passkey": 48, "single": 48, "multikey": 48, "multivalue": 128, "vt": 48}
LOOP_NGRAM, LOOP_REPEATS = 4, 3
SINK_TOKENS = 4  # as eval ppl's full-8k
SPLICE_TRIES = 16  # shifts tried until the whole spliced text reads back as its tokens


def default_filler() -> str:
    return resources.files("uio_gguf").joinpath("data", DEFAULT_FILLER).read_text(encoding="utf-8")


# ----- tasks ------------------------------------------------------------------------------------------
@dataclass
class Sample:
    needles: list[tuple[str, float]]  # (sentence, depth) in book order
    question: str
    answers: list[str]  # every one must appear whole in the answer


def _number(rng: random.Random, digits: int = 7) -> str:
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def _magic(word: str, number: str) -> str:
    return f"The special magic number for {word} is {number}."


def _spread(depth: float, n: int) -> list[float]:
    """n depths from `depth` towards the end, in order."""
    return [depth + (1 - depth) * i / n for i in range(n)]


def make_sample(task: str, depth: float, rng: random.Random) -> Sample:
    if task == "passkey":
        key = str(rng.randint(10_000, 99_999))
        return Sample([(passkey_fact(int(key)), depth)], PASSKEY_QUESTION, [key])
    if task == "single":
        word, number = rng.choice(KEY_NAMES), _number(rng)
        return Sample([(_magic(word, number), depth)], f"What is the special magic number for {word}?", [number])
    if task == "multikey":
        words = rng.sample(KEY_NAMES, 4)
        numbers = [_number(rng) for _ in words]
        depths = [depth] + [rng.random() for _ in words[1:]]
        needles = sorted(((_magic(w, n), d) for w, n, d in zip(words, numbers, depths)), key=lambda x: x[1])
        return Sample(needles, f"What is the special magic number for {words[0]}?", [numbers[0]])
    if task == "multivalue":
        word = rng.choice(KEY_NAMES)
        numbers = [_number(rng) for _ in range(3)]
        depths = sorted([depth] + [rng.random() for _ in range(2)])
        return Sample(
            [(_magic(word, n), d) for n, d in zip(numbers, depths)],
            f"What are all the special magic numbers for {word}?",
            numbers,
        )
    if task == "vt":
        names = ["".join(rng.choices(string.ascii_uppercase, k=5)) for _ in range(5)]
        value = _number(rng, 5)
        chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in zip(names, names[1:])]
        return Sample(
            list(zip(chain, _spread(depth, len(chain)))),
            f"Which variables are assigned the value {value}? Name all of them.",
            names,
        )
    raise UIOError(f"unknown task {task!r} (choose from {', '.join(TASKS)})")


def found(expected: str, answer: str) -> bool:
    """Exact match: `expected` appears whole (not inside a longer number or word)."""
    return re.search(rf"(?<![0-9A-Za-z]){re.escape(expected)}(?![0-9A-Za-z])", answer) is not None


def has_loop(answer: str, n: int = LOOP_NGRAM, repeats: int = LOOP_REPEATS) -> bool:
    """Some n-gram of words and punctuation occurs `repeats` or more times."""
    words = re.findall(r"\w+|[^\w\s]", answer.lower())
    counts: dict[tuple, int] = {}
    for i in range(len(words) - n + 1):
        gram = tuple(words[i : i + n])
        counts[gram] = counts.get(gram, 0) + 1
        if counts[gram] >= repeats:
            return True
    return False


# ----- documents: needles spliced into the filler's tokens ----------------------------------------------
@dataclass
class Document:
    tokens: np.ndarray  # what the conversation reads before the question: template opening + book
    book: str  # the book's text (tokenizes, after the opening, back to exactly `tokens`)
    skip: int  # tokens of the template's opening
    where: list[int] = field(default_factory=list)  # each needle's first token


def _token_texts(model, tokens) -> list[bytes]:
    return [model.piece(int(t)) for t in tokens]


def base_document(model, length: int, texts: list[str], rng: random.Random) -> Document:
    """The template's opening and `length` tokens of filler."""
    from uio_gguf.chat.conversation import document_tokens, opening

    head = model.tokenize(opening(model.chat_template()), add_special=True)
    book = filler_text(model, length, rng, texts).lstrip()  # no merge with the opening's last newline
    tokens = document_tokens(model, book)
    if not np.array_equal(tokens[: len(head)], head):
        raise UIOError("the filler's first token merges with the chat template's opening")
    return Document(tokens, book, len(head))


def filler_rng(seed: int, length: int, index: int) -> random.Random:
    """Where filler `index` of a length is drawn from (the first one as before there were several)."""
    return random.Random(f"{seed}:filler:{length}" + (f":{index}" if index else ""))


def needle_ids(model, sentence: str) -> np.ndarray:
    """A needle's tokens: the sentence on a line of its own."""
    return model.tokenize(f"\n{sentence}\n", add_special=False, parse_special=False)


def _reads_back(model, tokens: np.ndarray, start: int, end: int, margin: int = 8) -> bool:
    """Whether tokens[start:end] with `margin` tokens either side tokenize back to themselves (no merge
    across the seams)."""
    lo, hi = max(0, start - margin), min(len(tokens), end + margin)
    text = b"".join(_token_texts(model, tokens[lo:hi])).decode("utf-8", "replace")
    return np.array_equal(model.tokenize(text, add_special=False, parse_special=False), tokens[lo:hi])


def splice(model, base: Document, needles: list[tuple[str, float]]) -> Document:
    """Each needle, "\nsentence\n", written over as many of the base's tokens as it has, at the first
    token at or after its depth of the book where the result reads back as the same tokens (no merge
    across the seams). Nothing moves, so only the segments a needle touches change."""
    from uio_gguf.chat.conversation import document_tokens

    needle_tokens = [needle_ids(model, s) for s, _ in needles]
    n_book = len(base.tokens) - base.skip
    if sum(len(i) for i in needle_tokens) > n_book:
        raise UIOError(f"a {n_book}-token book cannot hold the task's {len(needles)} needle(s)")
    for shift in range(SPLICE_TRIES):  # a seam that only the whole text shows: every needle one token on
        tokens, where, floor = base.tokens.copy(), [], base.skip
        for j, ((_, depth), ids) in enumerate(zip(needles, needle_tokens)):
            last = len(tokens) - sum(len(i) for i in needle_tokens[j:])  # leaves room for the needles to come
            start = min(max(base.skip + round(depth * (n_book - len(ids))) + shift, floor), last)
            while True:
                trial = tokens.copy()
                trial[start : start + len(ids)] = ids
                if _reads_back(model, trial, start, start + len(ids)) or start >= last:
                    break
                start += 1
            tokens = trial
            where.append(start)
            floor = start + len(ids)
        book = b"".join(_token_texts(model, tokens[base.skip :])).decode("utf-8", "replace")
        if np.array_equal(document_tokens(model, book), tokens):
            return Document(tokens, book, base.skip, where)
    raise UIOError("the needles could not be spliced into the filler's tokens so that they read back the same")


class SegmentCache:
    """Memory by segment: a segment's memory depends on its tokens alone, so a document that differs from
    those seen before in a few segments costs the compression of those few. Stands in for the runtime
    (Conversation calls its `compress`); everything else is the runtime's."""

    def __init__(self, runtime):
        self.runtime = runtime
        self.rows: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}
        self.compressed = 0  # segments actually compressed

    def __getattr__(self, name):
        return getattr(self.runtime, name)

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

    runtime = cache.runtime
    compressed = doc.tokens[: len(doc.tokens) // runtime.segment * runtime.segment]
    dtype = runtime.encoder.head.memory_dtype
    key = memory_file.memory_key(runtime.bundle, compressed, dtype)
    path = memory_file.path_for(key)
    memory = memory_file.load(path, key) if use_memory_files else None
    if memory is None:
        memory = cache.compress(compressed)
        if use_memory_files and len(memory.k):
            memory_file.save(path, key, memory, dtype)
    else:
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
    from uio_gguf.chat.conversation import BOOK_MARKER, render

    first = render(model.chat_template(), [("user", f"{BOOK_MARKER}\n\n{question}")], True)  # as Conversation.ask
    return model.tokenize(first.split(BOOK_MARKER, 1)[1], add_special=False)


def _plain_answer(runtime, tokens: np.ndarray, params, window: int, started: float) -> Answer:
    """Greedy answer after `tokens` in a plain llama.cpp context of `window` cells with context shift;
    the time to first token counts from `started`."""
    from uio_gguf.evals.ppl import MAX_BATCH, Decoder
    from uio_gguf.memory.session import AnswerOutcome, Sampler, stream_answer

    decoder = Decoder(runtime, n_ctx=window, n_batch=min((window - SINK_TOKENS) // 2, MAX_BATCH))
    sampler = Sampler(params, runtime.model.n_vocab, runtime.model.vocab)

    def feed(ids) -> None:
        for at in range(0, len(ids), decoder.batch.capacity):
            chunk = ids[at : at + decoder.batch.capacity]
            if decoder.n_past + len(chunk) > window:
                decoder.drop(SINK_TOKENS, (decoder.n_past - SINK_TOKENS) // 2)
            n = len(chunk)
            positions = np.arange(decoder.n_past, decoder.n_past + n)
            decoder.batch.fill(positions, [[0]] * n, [i == n - 1 for i in range(n)], tokens=chunk)
            decoder.ctx.decode(decoder.batch)
            decoder.n_past += n

    try:
        feed([int(t) for t in tokens])
        outcome = AnswerOutcome()
        pieces = stream_answer(lambda: int(sampler.sample(decoder.ctx, -1)), feed, runtime.model, params, outcome)
        text = "".join(pieces)
        ended = outcome.finish_reason == "stop" and not outcome.looped
        return Answer(text, ended, (outcome.first_token_at or time.perf_counter()) - started, outcome.looped)
    finally:
        sampler.close()
        decoder.close()


def _uio_answer(
    cache: SegmentCache, doc: Document, question: str, params, recall_tokens: int, ranking: str = "bm25"
) -> Answer:
    from uio_gguf.chat.conversation import Conversation

    started = time.perf_counter()
    # the training view (raw window = one segment), whose raw part window and rag read too
    conversation = Conversation(
        cache,
        doc.book,
        use_memory_files=False,
        recall_tokens=recall_tokens,
        raw_window=cache.runtime.segment,
        recall_ranking=ranking,
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


def method_tokens(runtime, doc: Document, question: str, method: str, recall_tokens: int) -> np.ndarray:
    """The prompt a memoryless method reads: all of it (full-8k), or the opening, recall (rag) and the
    raw remainder UIO keeps, then the question."""
    from uio_gguf.chat.recall import Recall

    q = _question_tokens(runtime.model, question)
    if method == "full-8k":
        return np.concatenate([doc.tokens, q])
    n_full = len(doc.tokens) // runtime.segment * runtime.segment
    recalled = np.zeros(0, dtype=np.int32)
    if method == "rag" and recall_tokens and n_full:
        recalled = Recall(runtime.model, doc.tokens[:n_full], runtime.segment, doc.skip).recall_tokens(
            question, recall_tokens
        )
    return np.concatenate([doc.tokens[: doc.skip], recalled, doc.tokens[max(doc.skip, n_full) :], q])


def answer(cache: SegmentCache, doc: Document, question: str, method: str, params, recall_tokens: int) -> Answer:
    runtime = cache.runtime
    if method in RANKING:
        budget = recall_tokens if method != "uio" else 0
        return _uio_answer(cache, doc, question, params, budget, RANKING[method])
    if method in ("window", "full-8k", "rag"):
        started = time.perf_counter()  # rag's ranking counts, as uio+recall's does
        tokens = method_tokens(runtime, doc, question, method, recall_tokens)
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
) -> dict:
    """The report that `uio-gguf eval qa` prints and writes as JSON. partial(report so far) is called
    after every answer (a long run stopped midway keeps what it measured). fillers: texts drawn per
    length, trial t reading filler t % fillers; with one, every trial of a depth hides its needle in the
    same passage, so the trials sample keys, not contexts (docs/evaluation.md, session 22)."""
    from uio_gguf.chat.recall import DEFAULT_RECALL_TOKENS
    from uio_gguf.memory.session import SamplingParams

    recall_tokens = DEFAULT_RECALL_TOKENS if recall_tokens is None else recall_tokens
    check_grid(lengths, depths, trials)
    if not 1 <= fillers <= trials:
        raise UIOError(f"--fillers must be from 1 to --trials ({trials}), not {fillers}")
    if recall_tokens < 0:
        raise UIOError(f"the recall budget must be 0 or more tokens, not {recall_tokens}")
    if any(m.startswith("uio") for m in methods):
        limit = runtime.max_tokens()
        if max(lengths) + 64 > limit:
            raise UIOError(
                f"at ratio {runtime.bundle.ratio} the memory holds books of at most {limit} tokens "
                f"(with the template and question), not {max(lengths)}: use shorter --lengths or --ratio 32"
            )
    filler = "custom" if texts else DEFAULT_FILLER
    texts = texts or [default_filler()]
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
                        got = answer(cache, doc, sample.question, method, params[task], recall_tokens)
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
