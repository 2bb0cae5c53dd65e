"""`uio-gguf eval ppl`: perplexity of long texts through the llama.cpp runtime, UIO memory side by side
with the baselines it has to beat.

For a length L every method predicts the same targets: tokens 1..L-1 of the text's first L tokens.
  uio-r{ratio}  Session.feed, as in chat and training: a token sees the memory of every full segment
                before it plus the raw tokens since the last segment boundary.
  chat-r{ratio} Session.feed with chat's default raw window R (uio_gguf.chat.conversation.DEFAULT_RAW_SEGMENTS
                segments, docs/design.md §6): a token sees the memory of every segment compressed
                before it plus the last R - l .. R - 1 raw tokens (raw cells shifted down, not
                recomputed, when the oldest segment is compressed). --reread decodes them again behind the
                memory instead (Session.reread); --memory-window keeps only the latest segments' memory
                (Session.limit_memory), and the column's name says so (+reread, +mem1024).
  raw-R         a uio or chat column's raw window alone, no memory: the same raw tokens at positions from
                0, the oldest segment dropped (not compressed) whenever the window passes R tokens.
  sliding-same:C  a plain sliding window with the same KV cells as column C at each length (C's memory
                cells when its last target is read + its raw window R), llama.cpp's context shift as in
                full-8k (the first 4 tokens kept, as llama.cpp's --keep). What a llama.cpp user gets from
                the same cache without the memory: the baseline the memory has to beat.
  window        each segment-length window decoded alone, from position 0 (raw-l, kept for old reports).
  full-8k       full attention inside the model's trained window W (n_ctx_train): when the cache is
                full, the text's first 4 tokens stay and the older half of the others is dropped, the
                rest shifted down (llama.cpp's context shift, as with its --keep: seq_rm + seq_add, K
                re-rotated at the next decode; the window filled to its last cell first, a batch cut
                there), so a token sees those 4 plus the last ~W/2 to W tokens. Why pin 4: a model that
                loses the first tokens (its attention sinks, StreamingLLM) breaks down. SmolLM2 on tokens 512-1023 of a
                held-out text at W=512: ppl 28.8 with nothing pinned, 10.9 with 4; window-only 12.3.
  full          plain full attention over all L tokens, positions past W included.
Every method is causal, so one pass over a text's first L_max tokens gives each shorter length as a
prefix. Logits arrive chunk by chunk and only the NLL of each target is kept.

Each text belongs to a domain, and each domain gets a table of its own: in domain is held-out text from
the kind of sources training drew on (manuals), out of domain is prose from sources it never drew on
(scripture, literature). With no texts given, the command reads the two held-out texts the package ships.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.llamacpp.plain import MAX_BATCH, SINK_TOKENS, PlainContext, chunks
from uio_gguf.memory.session import check_memory_window, held_memory_cells
from uio_gguf.text import packaged

# the baselines' names for --baselines: same = sliding-same and raw-R beside every uio/chat column;
# sliding = full-8k (full attention in the model's trained window with context shift)
BASELINES = ("same", "window", "sliding", "full")
DOMAINS = {"in": "in domain", "out": "out of domain"}


@dataclass
class Text:
    name: str
    tokens: np.ndarray
    domain: str = "in"


def packaged_text(domain: str) -> tuple[str, str]:
    """(file name, text) of the held-out text the package ships for a domain ("in" or "out")."""
    name = packaged.HELDOUT[domain]
    return name, packaged.read(name)


@dataclass
class Method:
    name: str
    logits: Callable[[np.ndarray], Iterator[np.ndarray]]  # tokens -> their logits, chunk by chunk
    # a method made for one length only (sliding-same: its cells depend on the length), scored on that
    # prefix alone; None: every length is a prefix of one pass
    length: int | None = None


def method_identity(method: Method) -> str:
    """What a method computes, as a string two runs can compare (--resume): its function and settings, the
    length it is made for, and the files it reads (the base model; the head and the encoder's weight format
    for the memory columns). Column names leave some of this out (the raw window of a single chat column)."""
    runtime, fn = method.logits.args[0], method.logits.func
    bundle = runtime.bundle
    files = [
        bundle.model_fingerprint,
        f"kv:{runtime.kv_type}",
        f"fa:{runtime.flash_attn}",
        f"segment:{runtime.segment}",
    ]
    if fn is uio_logits:
        files += [bundle.head_fingerprint, f"encoder:{runtime.encoder_weights}", f"slots:{runtime.slots}"]
    settings = ",".join(f"{k}={v}" for k, v in sorted(method.logits.keywords.items()))
    return f"{fn.__name__}({settings}) length={method.length} " + " ".join(files)


def text_digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens, dtype=np.int32).tobytes()).hexdigest()[:32]


# ----- the methods ------------------------------------------------------------------------------------
def uio_logits(
    runtime,
    tokens: np.ndarray,
    raw_window: int | None = None,
    keep: int = 0,
    reread: bool = False,
    memory_window: int | None = None,
    memory_sink: int = 0,
) -> Iterator[np.ndarray]:
    """memory_window, memory_sink: Session.limit_memory (None: the memory of every segment)."""
    raw_window = raw_window or runtime.segment
    memory = len(tokens) // runtime.segment * runtime.slots
    cells = keep + held_memory_cells(memory, memory_window) + raw_window  # kept + memory + raw window
    session = runtime.new_session(n_ctx=cells)
    session.raw_window, session.keep, session.reread = raw_window, keep, reread
    session.limit_memory(memory_window, memory_sink)
    try:
        for chunk in chunks(tokens, runtime.segment):
            yield session.feed(chunk, all_logits=True)
    finally:
        session.close()


def window_logits(runtime, tokens: np.ndarray) -> Iterator[np.ndarray]:
    segment = runtime.segment
    plain = PlainContext(runtime, n_ctx=segment, n_batch=min(segment, MAX_BATCH))  # Session's batching
    try:
        for window in chunks(tokens, segment):
            plain.clear()
            for chunk in chunks(window, plain.batch.capacity):
                yield plain.decode(chunk)
    finally:
        plain.close()


def shifted_logits(
    runtime, tokens: np.ndarray, window: int, keep: int, drop: int | None = None
) -> Iterator[np.ndarray]:
    """A plain context of `window` cells; when it is full to its last cell, `drop` cells after the first
    `keep` go (None: the older half of them, llama.cpp's context shift)."""
    plain = PlainContext.shifting(runtime, window, keep, drop)
    try:
        for chunk in chunks(tokens, plain.batch.capacity):
            yield plain.decode(chunk)
    finally:
        plain.close()


def reread_raw_logits(runtime, tokens: np.ndarray, raw_window: int) -> Iterator[np.ndarray]:
    """The raw window of a Session with reread, without its memory: when it reaches `raw_window` tokens its
    oldest segment goes and the rest is decoded again from position 0 (its first token the attention sink
    again), then the next segment after it."""
    seg = runtime.segment
    plain = PlainContext(runtime, n_ctx=raw_window, n_batch=min(raw_window, MAX_BATCH))
    window: list[int] = []
    try:
        for chunk in chunks(tokens, seg):
            if len(window) == raw_window:
                window = window[seg:]
                plain.clear()
                if window:
                    plain.feed(window)
            yield plain.decode(chunk)
            window.extend(int(t) for t in chunk)
    finally:
        plain.close()


def raw_logits(runtime, tokens: np.ndarray, raw_window: int, keep: int = 0) -> Iterator[np.ndarray]:
    """The raw window of Session.feed without its memory: batches of one segment, the oldest segment
    dropped when the next one would pass `raw_window` tokens (after the `keep` first ones, which stay)."""
    return shifted_logits(runtime, tokens, window=raw_window + keep, keep=keep, drop=runtime.segment)


def memory_cells(n_inputs: int, segment: int, slots: int, raw_window: int, memory_window: int | None = None) -> int:
    """The KV cells a uio/chat column uses to read n_inputs tokens: the memory of the segments it has
    compressed before the last token (one whenever the raw window reached raw_window tokens; at most
    memory_window cells of them) plus a full raw window."""
    compressed = max(0, (n_inputs - 1 - raw_window) // segment + 1)
    return held_memory_cells(compressed * slots, memory_window) + raw_window


def full_logits(runtime, tokens: np.ndarray) -> Iterator[np.ndarray]:
    plain = PlainContext(runtime, n_ctx=len(tokens), n_batch=MAX_BATCH)
    try:
        for chunk in chunks(tokens, MAX_BATCH):
            yield plain.decode(chunk)
    finally:
        plain.close()


def _short(n: int) -> str:
    return f"{n // 1024}k" if n % 1024 == 0 else str(n)


def _full_window(runtimes: list, asked: int | None) -> int:
    return asked or runtimes[0].model.n_ctx_train


def parse_baselines(text: str) -> tuple[str, ...]:
    """--baselines: names from BASELINES, comma separated, or 'none'."""
    chosen = () if text.strip() == "none" else tuple(b.strip() for b in text.split(","))
    unknown = [b for b in chosen if b not in BASELINES]
    if unknown:
        raise UIOError(f"unknown baseline {', '.join(unknown)} (choose from {', '.join(BASELINES)}, or none)")
    return chosen


def methods(
    runtimes: list,
    full_window: int | None = None,
    full_keep: int = SINK_TOKENS,
    baselines: tuple[str, ...] = BASELINES,
    raw_windows: tuple[int, ...] | None = None,
    lengths: list[int] | None = None,
    chat_keep: int = 0,
    chat_reread: bool = False,
    chat_memory: tuple[int | None, int] = (None, 0),
) -> list[Method]:
    """uio-r{ratio} for each runtime, then chat-r{ratio} (raw_windows: the raw windows R in tokens, one
    column each; None: chat's default; (): none), then the chosen baselines on the first runtime's model
    and segment (every method is deterministic, so a run may leave out baselines measured before).
    lengths: the lengths the sliding-same baselines are made for (one method each). chat_reread: the chat
    columns decode their raw window again behind the memory after each compression (Session.reread).
    chat_memory: (memory window in cells, sink segments) of the chat columns (Session.limit_memory)."""
    base = runtimes[0]
    for rt in runtimes[1:]:
        if rt.bundle.model_fingerprint != base.bundle.model_fingerprint:
            raise UIOError(
                f"{rt.bundle.path} and {base.bundle.path} are made for different base models: "
                "their perplexities share no baseline"
            )
        if rt.segment != base.segment:
            raise UIOError(
                f"{rt.bundle.path} has segment {rt.segment}, {base.bundle.path} {base.segment}: "
                "the window baseline needs one segment length"
            )
    window = _full_window(runtimes, full_window)
    if full_keep < 0 or window < full_keep + 2:
        raise UIOError(f"the full-attention window ({window}) must hold the {full_keep} pinned tokens and 2 more")
    names = [f"uio-r{rt.bundle.ratio}" for rt in runtimes]
    names = [n if names.count(n) == 1 else f"{n}:{rt.bundle.path.name}" for n, rt in zip(names, runtimes)]
    if raw_windows is None:
        from uio_gguf.chat.conversation import DEFAULT_RAW_SEGMENTS

        raw_windows = (DEFAULT_RAW_SEGMENTS * base.segment,)
    if not 0 <= chat_keep < base.segment:
        raise UIOError(f"--keep takes 0 to {base.segment - 1} tokens (fewer than a segment), not {chat_keep}")
    if any(r < base.segment for r in raw_windows):
        raise UIOError(f"a raw window holds at least one segment ({base.segment} tokens)")
    memory_window, memory_sink = chat_memory
    check_memory_window(memory_window, base.slots, memory_sink)  # before minutes of other columns
    if memory_sink and memory_window is None:
        raise UIOError("--memory-sink needs --memory-window")
    chat, columns = [], [(n, rt, rt.segment, 0, False, None) for n, rt in zip(names, runtimes)]
    for r in raw_windows:
        for n, rt in zip(names, runtimes):
            name = n.replace("uio-", "chat-", 1) + ("" if len(raw_windows) == 1 else f"-raw{r}")
            name += (f"+keep{chat_keep}" if chat_keep else "") + ("+reread" if chat_reread else "")
            if memory_window:
                name += f"+mem{memory_window}" + (f"s{memory_sink}" if memory_sink else "")
            logits = partial(
                uio_logits,
                rt,
                raw_window=r,
                keep=chat_keep,
                reread=chat_reread,
                memory_window=memory_window,
                memory_sink=memory_sink,
            )
            chat.append(Method(name, logits))
            columns.append((name, rt, r, chat_keep, chat_reread, memory_window))
    same = same_cell_methods(columns, lengths or [], full_keep) if "same" in baselines else []
    every = {
        "window": Method("window", partial(window_logits, base)),
        "sliding": Method(f"full-{_short(window)}", partial(shifted_logits, base, window=window, keep=full_keep)),
        "full": Method("full", partial(full_logits, base)),
    }
    return (
        [Method(n, partial(uio_logits, rt)) for n, rt in zip(names, runtimes)]
        + chat
        + same
        + [every[b] for b in BASELINES if b in baselines and b != "same"]
    )


def raw_label(raw_window: int, kept: int, reread: bool = False) -> str:
    """The name of the raw-R baseline of a memory column with raw window R that keeps `kept` tokens (and
    reads its raw window again after each compression: then the baseline rereads too, and keeps nothing)."""
    if reread:
        return f"raw-{raw_window}+reread"
    return f"raw-{raw_window}" + (f"+keep{kept}" if kept else "")


def same_cell_methods(columns: list[tuple], lengths: list[int], keep: int = SINK_TOKENS) -> list[Method]:
    """raw-R (once per raw window R, kept tokens and reread) and, for each length, sliding-same:C of each
    column C: (name, runtime, raw window R, tokens C keeps in front of its memory, whether C rereads its raw
    window, C's memory window or None). The memory has to beat both: raw-R is what it adds to, sliding-same what its cells would hold
    as plain tokens. A column that rereads its raw window is measured against a raw window that rereads too
    (a window kept fresh with no memory; the kept tokens play no part there, its first token is the sink)."""
    raw, same = {}, []
    for name, rt, r, kept, reread, memory_window in columns:
        label = raw_label(r, kept, reread)
        logits = (
            partial(reread_raw_logits, rt, raw_window=r) if reread else partial(raw_logits, rt, raw_window=r, keep=kept)
        )
        raw.setdefault(label, Method(label, logits))
        for n in lengths:
            cells = kept + memory_cells(n - 1, rt.segment, rt.slots, r, memory_window)  # the last token: a target
            same.append(Method(f"sliding-same:{name}", partial(shifted_logits, rt, window=cells, keep=keep), n))
    return list(raw.values()) + same


# ----- scoring ----------------------------------------------------------------------------------------
def target_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """-log softmax(logits)[target] per row, in float64."""
    top = logits.max(-1)
    log_sum = np.log(np.exp(logits - top[:, None]).sum(-1, dtype=np.float64)) + top
    return log_sum - logits[np.arange(len(targets)), targets]


def score(
    method: Method, tokens: np.ndarray, lengths: list[int], step: Callable[[int], None]
) -> tuple[np.ndarray, dict]:
    """The NLL of tokens[1:] and, for each length, the seconds until its last target was scored."""
    inputs = tokens[:-1]  # the last token is only a target
    nll = np.empty(len(inputs))
    seconds: dict[int, float] = {}
    started, done = time.perf_counter(), 0
    for logits in method.logits(inputs):
        n = len(logits)
        nll[done : done + n] = target_nll(logits, tokens[done + 1 : done + 1 + n])
        done += n
        for length in lengths:
            if length not in seconds and done >= length - 1:
                seconds[length] = time.perf_counter() - started
        step(n)
    return nll, seconds


@dataclass
class Totals:
    nll: float = 0.0
    tokens: int = 0
    seconds: float = 0.0
    texts: int = 0


def evaluate(
    runtimes: list,
    texts: list[Text],
    lengths: list[int],
    full_window: int | None = None,
    full_keep: int = SINK_TOKENS,
    progress: Callable[[int, int], None] | None = None,
    baselines: tuple[str, ...] = BASELINES,
    raw_windows: tuple[int, ...] | None = None,
    partial: Callable[[dict], None] | None = None,
    chat_keep: int = 0,
    chat_reread: bool = False,
    columns: tuple[str, ...] = (),
    chat_memory: tuple[int | None, int] = (None, 0),
    earlier: dict | None = None,
) -> dict:
    """The report that `uio-gguf eval ppl` prints and writes as JSON; `partial` gets the report so far
    after each method has read each text (cells not yet done have ppl None). chat_keep: tokens the chat
    columns keep raw in front of their memory (Session's keep); chat_reread: they decode their raw window
    again after each compression (Session's reread); chat_memory: their memory window in cells and its sink
    segments (Session.limit_memory). columns: only the methods whose names start with one
    of these (every method is deterministic: columns measured by an earlier run need not be rerun).
    earlier: a report of an earlier run (--resume): each method's pass over a text that it holds, with the
    same method_identity and text, is taken from it instead of read again (read again where it stops short
    of a length asked); the report then shows every column of the run, those that `columns` leaves out
    with what the earlier report holds of them."""
    lengths = sorted(set(lengths))
    if not lengths or lengths[0] < 2:
        raise UIOError("every length must be at least 2 tokens")
    for text in texts:
        if len(text.tokens) < lengths[0]:
            raise UIOError(
                f"{text.name} has {len(text.tokens):,} tokens, fewer than every length (the shortest is {lengths[0]:,})"
            )
    every_method = methods(
        runtimes, full_window, full_keep, baselines, raw_windows, lengths, chat_keep, chat_reread, chat_memory
    )
    chosen = every_method
    if columns:
        chosen = [m for m in every_method if m.name.startswith(tuple(columns))]
        if not chosen:
            named = ", ".join(dict.fromkeys(m.name for m in every_method))
            raise UIOError(f"--columns {','.join(columns)} names none of this run's columns ({named})")
    longest = {t.name: max(n for n in lengths if n <= len(t.tokens)) for t in texts}
    digests = {t.name: text_digest(t.tokens) for t in texts}

    def read(method: Method, text: Text) -> int:
        """How many tokens of the text the method reads: a one-length method its length (if the text has it)."""
        if method.length is None:
            return longest[text.name]
        return method.length if method.length <= len(text.tokens) else 0

    def scored_lengths(method: Method, text: Text) -> list[int]:
        n = read(method, text)
        return [m for m in lengths if m <= n] if method.length is None else [n]

    # (method name, its length, text name) -> one pass of a method over a text: its NLL and seconds per length
    scored: dict[tuple, dict] = {}
    # an earlier pass to a shorter length shows its cells, and is read again (to every length) if chosen
    earlier_passes = {(e["method_id"], e["text_sha"]): e for e in (earlier or {}).get("passes", [])}
    whole: set[tuple] = set()
    for method in every_method:
        for text in texts:
            found = earlier_passes.get((method_identity(method), digests[text.name])) if read(method, text) else None
            if found:
                key = (method.name, method.length, text.name)
                scored[key] = {**found, "method": method.name, "text": text.name}
                if all(str(n) in found["cells"] for n in scored_lengths(method, text)):
                    whole.add(key)
    shown = [m for m in every_method if m in chosen or any(k[:2] == (m.name, m.length) for k in scored)]
    todo = [(m, t) for m in chosen for t in texts if read(m, t) and (m.name, m.length, t.name) not in whole]

    total = sum(read(m, t) - 1 for m, t in todo)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    domains = [d for d in DOMAINS if any(t.domain == d for t in texts)]
    # a cell is done when every text of its domain that reaches its length has been scored
    due = {(d, n): sum(t.domain == d and n <= len(t.tokens) for t in texts) for d in domains for n in lengths}
    order = list(dict.fromkeys(m.name for m in shown))

    def report() -> dict:
        totals = {(d, name, n): Totals() for d in domains for name in order for n in lengths}
        for (name, _, _), one in scored.items():
            for n, cell in one["cells"].items():
                if (one["domain"], name, int(n)) in totals:
                    into = totals[(one["domain"], name, int(n))]
                    into.nll += cell["nll"]
                    into.tokens += cell["tokens"]
                    into.seconds += cell["seconds"]
                    into.texts += 1
        results = [
            {
                "domain": domain,
                "method": name,
                "length": n,
                "ppl": math.exp(c.nll / c.tokens) if c.tokens and c.texts == due[(domain, n)] else None,
                "tokens": c.tokens,
                "seconds": round(c.seconds, 3),
            }
            for (domain, name, n), c in totals.items()
        ]
        results.sort(key=lambda r: (domains.index(r["domain"]), r["length"], order.index(r["method"])))
        memory_columns = [m for m in shown if m.name.startswith(("uio-", "chat-"))]
        shown_ids = pass_ids(scored.values())
        return {
            "lengths": lengths,
            "domains": domains,
            "methods": order,
            "segment": runtimes[0].segment,
            "full_window": _full_window(runtimes, full_window),
            "full_keep": full_keep,
            "raw_windows": [m.logits.keywords["raw_window"] for m in shown if m.name.startswith("chat-")],
            # each memory column's raw window R, and the raw-R baseline it is measured against
            "raw_window_of": {
                m.name: m.logits.keywords.get("raw_window") or runtimes[0].segment for m in memory_columns
            },
            "raw_baseline_of": {
                m.name: raw_label(
                    m.logits.keywords.get("raw_window") or runtimes[0].segment,
                    m.logits.keywords.get("keep", 0),
                    m.logits.keywords.get("reread", False),
                )
                for m in memory_columns
            },
            "keep": chat_keep,
            "reread": chat_reread,
            "memory_window": chat_memory[0],
            "memory_sink": chat_memory[1],
            "texts": [{"name": t.name, "tokens": len(t.tokens), "domain": t.domain} for t in texts],
            "skipped": {str(n): [t.name for t in texts if len(t.tokens) < n] for n in lengths},
            "results": results,
            # every pass behind the cells, for --resume, and those of the earlier report that this run does
            # not show (other columns, texts or lengths): a resumed file loses nothing
            "passes": list(scored.values()) + [e for k, e in earlier_passes.items() if k not in shown_ids],
        }

    # method by method over every text: a run stopped midway (see `partial`) has whole columns
    for method, text in todo:
        tokens = text.tokens[: read(method, text)]
        wanted = scored_lengths(method, text)
        nll, seconds = score(method, tokens, wanted, step)
        scored[(method.name, method.length, text.name)] = {
            "method": method.name,
            "text": text.name,
            "domain": text.domain,
            "method_id": method_identity(method),
            "text_sha": digests[text.name],
            "cells": {
                str(n): {"nll": float(nll[: n - 1].sum()), "tokens": n - 1, "seconds": round(seconds[n], 3)}
                for n in wanted
            },
        }
        if partial:
            partial(report())
    return report()


def pass_ids(passes) -> set[tuple[str, str]]:
    return {(p["method_id"], p["text_sha"]) for p in passes}


def read_earlier(path: Path | None, resume: bool) -> dict | None:
    """The report a --resume run continues: the --json file if it exists (None: nothing to resume, the run
    starts afresh). A file that is not such a report is an error: resuming must not write over it."""
    if not resume:
        return None
    if path is None:
        raise UIOError("--resume continues the run of a --json file: give it with --json")
    if not path.exists():
        return None
    try:
        earlier = json.loads(path.read_text())
        passes = earlier["passes"]
        for one in passes:
            for cell in one["cells"].values():
                float(cell["nll"]), int(cell["tokens"]), float(cell["seconds"])
            str(one["method_id"]), str(one["text_sha"]), str(one["domain"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise UIOError(
            f"cannot resume from {path}: not a report of eval ppl with its passes ({type(err).__name__}: {err}); "
            "give another --json, or drop --resume"
        ) from None
    return earlier


def tokenize_texts(model, named_texts: list[tuple[str, str]], domain: str = "in") -> list[Text]:
    """As training tokenizes: no BOS, special-token text read as plain text."""
    return [
        Text(name, model.tokenize(text, add_special=False, parse_special=False), domain) for name, text in named_texts
    ]


# ----- the table ----------------------------------------------------------------------------------------
def gap_closed(uio: float, raw: float, same: float) -> float | None:
    """The share of the gap between the raw window alone and a plain sliding window of the same cells
    that the memory closes: 1 when its cells are worth as much as raw tokens, below 0 when it hurts.
    None when the same cells read no better than the raw window alone: there is no gap to close (a ratio
    over a gap near 0 would read as thousands of percent either way)."""
    return (raw - uio) / (raw - same) if raw > same else None


def change(ppl: float, baseline: float) -> str:
    """ppl against a baseline's, signed percent: -2.7% when the memory column reads 2.7% better."""
    return f"{ppl / baseline - 1:+.1%}"


def format_report(report: dict) -> str:
    methods_ = report["methods"]
    domains = report["domains"]
    cell = {(r["domain"], r["method"], r["length"]): r for r in report["results"]}
    sliding = f"full-{_short(report['full_window'])}"
    uio_columns = [m for m in methods_ if m.startswith(("uio-", "chat-"))]

    def table(title: str, columns: list[str], value: Callable[[str, str, int], str]) -> list[str]:
        cells = [value(d, m, n) for d in domains for m in columns for n in report["lengths"]]
        width = 2 + max(len(c) for c in [*columns, *cells])
        rows = [title]
        for d in domains:
            if len(domains) > 1:
                rows.append(f"{DOMAINS[d]}: " + ", ".join(t["name"] for t in report["texts"] if t["domain"] == d))
            rows.append(f"{'tokens':>8}" + "".join(f"{m:>{width}}" for m in columns))
            rows += [f"{n:>8,}" + "".join(f"{value(d, m, n):>{width}}" for m in columns) for n in report["lengths"]]
        return rows

    def ppl(d: str, m: str, n: int) -> str:
        r = cell[(d, m, n)]
        return f"{r['ppl']:.3f}" if r["ppl"] is not None else "-"

    raw_of = report.get("raw_baseline_of", {})

    def baselines(d: str, m: str, n: int) -> tuple:
        """(raw-R, sliding-same, the column itself) perplexities of memory column m, None where not run."""
        names = (raw_of.get(m), f"sliding-same:{m}", m)
        return tuple(cell[(d, name, n)]["ppl"] if (d, name, n) in cell else None for name in names)

    def gap(d: str, m: str, n: int) -> str:
        raw, same, uio = baselines(d, m, n)
        share = gap_closed(uio, raw, same) if None not in (raw, same, uio) else None
        return "-" if share is None else f"{share:.0%}"

    def margin(against: int) -> Callable[[str, str, int], str]:
        def value(d: str, m: str, n: int) -> str:
            *compared, uio = baselines(d, m, n)
            base = compared[against]
            return "-" if None in (base, uio) else change(uio, base)

        return value

    lines = table("perplexity of tokens 1..L-1 (lower is better)", methods_, ppl)
    if any(raw_of.get(m) in methods_ for m in uio_columns):
        # the floor (never worse than R alone) and the aim (better than the same cells), as the issue states them
        lines += [""] + table(
            "the memory against its raw window R alone (raw-R; above 0: worse)", uio_columns, margin(0)
        )
    if uio_columns and any(m.startswith("sliding-same:") for m in methods_):  # --columns may leave either out
        lines += [""] + table(
            "the memory against a plain window of its cells (sliding-same; above 0: worse)", uio_columns, margin(1)
        )
        title = (
            "share of the same-cell gap closed: (raw-R - C) / (raw-R - sliding-same:C), C a memory column with "
            "raw window R (100%: the memory's cells are worth the raw tokens they could hold; below 0: worse than no "
            "memory; -: the same cells read no better than R alone, no gap to close)"
        )
        lines += [""] + table(title, uio_columns, gap)
    seconds = table(
        "seconds", methods_, lambda d, m, n: f"{cell[(d, m, n)]['seconds']:.1f}" if cell[(d, m, n)]["tokens"] else "-"
    )
    lines += [""] + seconds
    lines += ["", "texts: " + ", ".join(f"{t['name']} ({t['tokens']:,} tokens)" for t in report["texts"])]
    for n, names in report["skipped"].items():
        if names:
            lines.append(f"skipped at {int(n):,} tokens (too short): {', '.join(names)}")
    raw_windows = ", ".join(map(str, sorted(set(report.get("raw_windows", [])))))
    lines.append(
        "raw-R = a memory column's raw window of R tokens without the memory; sliding-same:C = a plain sliding "
        f"window with C's KV cells (memory + raw window) at each length, the first {report['full_keep']} tokens kept; "
        f"window = one segment ({report['segment']} tokens) without memory; "
        + (f"chat = memory + a raw window of {raw_windows} tokens (chat's view); " if raw_windows else "")
        + f"{sliding} = full attention in a {report['full_window']:,}-token "
        f"window that keeps the first {report['full_keep']} tokens and drops the older half of the others "
        "when full; full = all tokens"
    )
    return "\n".join(lines)
