"""`uio-gguf bench`: speed and KV size of UIO memory next to plain llama.cpp full attention, per text
length, in one process: one llama.cpp build, one model (the runtime's), one cache type, one thread count.

For each length L (tokens of the chat document: the template's opening, then the book):
  plain   a context of L + N cells (a PlainContext): the L tokens prefilled 512 per decode
          (only the last row's logits), then N greedy tokens decoded one at a time. Past the model's
          trained window llama.cpp runs, but what full attention computes there is not meaningful:
          measured for speed only, and the table says so.
  uio     a Conversation, the path `chat` takes (memory alone, no recall): the book's full segments
          compressed by the encoder and written into the decoder's cache, its memory file saved, the
          remainder decoded raw = ingest; then N greedy tokens over [memory ; raw window] (a raw window
          that fills is compressed, as in chat: that cost is part of decode).
  sliding a plain context with the cells uio holds at the end of its ingest (what a llama.cpp user gets
          from the same KV cache without the memory): the L tokens read 512 per decode with llama.cpp's
          context shift (the first 4 kept, the older half of the others dropped when full), then N
          greedy tokens.
  ttft    a new Conversation on the same book, whose memory now comes from its memory file, asked one
          question: seconds until the answer's first token is sampled (memory alone, then with the
          default recall budget, as `chat` runs, the runtime's saved recalls cleared first; then once
          more, the recall's cells kept from before). With first_token_runs N, the median of N rounds.
  limit   per segment the encoder reads l tokens and k slot rows (docs/design.md §1), so ingest cannot
          beat a short-context prefill of segment-sized chunks (each decoded from position 0 in a
          cleared context, on the encoder's weights) × l/(l+k); ingest is also given as a share of that limit.
The encoder pass and the recall's prefill run on the runtime's encoder format (--encoder-format,
uio_gguf/format/derived.py), the decoder's token steps and the plain sides on the bundle's model file.
KV bytes: the cells in use (llama.cpp's last position of the sequence + 1; positions are contiguous)
× the bytes of a cell (layers × (K + V widths) × the cache type's size). Both sides take the argmax
of the logits, so a decoded token costs them the same work outside llama.cpp.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator

import llama_cpp
import numpy as np

from uio_gguf.chat.conversation import Conversation, resolve_memory_window
from uio_gguf.chat.recall import DEFAULT_RECALL_TOKENS
from uio_gguf.errors import UIOError
from uio_gguf.format import derived
from uio_gguf.llamacpp.plain import SINK_TOKENS, PlainContext
from uio_gguf.llamacpp.sampling import SamplingParams
from uio_gguf.llamacpp.template import document_tokens
from uio_gguf.llamacpp.threads import usable_cpus
from uio_gguf.memory.session import DECODER_SEQ
from uio_gguf.text.packaged import DEMO_QUESTION

DECODE_TOKENS = 64
PREFILL_BATCH = 512  # llama.cpp's default micro-batch
LIMIT_TOKENS = 2048  # the short-context prefill is timed over at most this many tokens per length
TEXT_SEPARATOR = "\n\n"  # between copies of a text repeated to reach a length


def book_of_length(model, text: str, n_tokens: int) -> tuple[str, int]:
    """(book, copies): a book whose chat document (template opening + book) has about n_tokens tokens:
    `text` repeated (a blank line between copies) until it is long enough, cut at a token boundary."""
    need = max(1, n_tokens - len(document_tokens(model, "")))
    per_copy = max(1, len(model.tokenize(text)))
    copies = -(-need // per_copy)
    while True:
        tokens = model.tokenize(TEXT_SEPARATOR.join([text] * copies))
        if len(tokens) >= need:
            return b"".join(model.piece(t) for t in tokens[:need]).decode("utf-8", "replace"), copies
        copies += 1


def greedy_rate(step: Callable[[int], np.ndarray], token: int, n: int) -> float:
    """Tokens/s of n greedy tokens from `token` on, each decoded by step(token) -> its logits."""
    started = time.perf_counter()
    for _ in range(n):
        token = int(np.argmax(step(token)))
    return n / (time.perf_counter() - started)


def short_prefill_rate(runtime, tokens: np.ndarray) -> tuple[float, int]:
    """(tokens/s, tokens timed): segment-sized chunks of `tokens`, each prefilled from position 0 in a
    cleared segment-sized context, as the encoder reads a segment (its micro-batch and its weights too)."""
    seg = runtime.segment
    n = min(len(tokens), LIMIT_TOKENS) // seg * seg
    if n == 0:
        raise UIOError(f"a length must hold at least one segment ({seg} tokens)")
    with PlainContext(runtime, n_ctx=seg, n_batch=seg, model=runtime.prefill_model) as plain:
        started = time.perf_counter()
        for chunk in np.asarray(tokens[:n]).reshape(-1, seg):
            plain.clear()
            plain.feed(chunk)
        return n / (time.perf_counter() - started), n


def measure_plain(runtime, tokens: np.ndarray, n_decode: int) -> dict:
    cell = runtime.kv_cell_bytes
    n_ctx = len(tokens) + n_decode
    with PlainContext(runtime, n_ctx=n_ctx, n_batch=min(PREFILL_BATCH, n_ctx)) as plain:
        started = time.perf_counter()
        logits = plain.feed(tokens)
        prefill_s = time.perf_counter() - started
        decode = greedy_rate(lambda t: plain.feed([t]), int(np.argmax(logits)), n_decode)
        cells = plain.ctx.seq_pos_max(0) + 1
    return {
        "prefill_s": prefill_s,
        "prefill_tok_s": len(tokens) / prefill_s,
        "decode_tok_s": decode,
        "kv_cells": cells,
        "kv_bytes": cells * cell,
    }


def measure_sliding(runtime, tokens: np.ndarray, cells: int, n_decode: int) -> dict:
    """A plain sliding window of `cells` cells (llama.cpp's context shift, SINK_TOKENS kept) reading
    `tokens`, then n_decode greedy tokens."""
    with PlainContext.shifting(runtime, cells, SINK_TOKENS) as window:
        feed = window.feed  # decodes batch by batch, shifting the context when it is full
        started = time.perf_counter()
        logits = feed(tokens)
        ingest_s = time.perf_counter() - started
        decode = greedy_rate(lambda t: feed([t]), int(np.argmax(logits)), n_decode)
    return {
        "ingest_s": ingest_s,
        "ingest_tok_s": len(tokens) / ingest_s,
        "decode_tok_s": decode,
        "kv_cells": cells,
        "kv_bytes": cells * runtime.kv_cell_bytes,
    }


def measure_uio(runtime, book: str, n_decode: int, runs: int = 1, memory_window: int | None = None) -> dict:
    """Ingest and decode once; each first-token time the median of `runs` new conversations. memory_window:
    Conversation's (the most memory cells the decoder holds)."""
    cell = runtime.kv_cell_bytes
    started = time.perf_counter()
    with Conversation(runtime, book, use_memory_files=True, recall_tokens=0, memory_window=memory_window) as conv:
        ingest_s = time.perf_counter() - started
        session = conv.session
        segments = session.compressed_segments
        tokens = len(conv.book_tokens)
        # A book of whole segments leaves no raw token, hence no logits: decoding then starts from its
        # last token (what is decoded does not change the work a token costs).
        first = int(np.argmax(session.ctx.logits(-1))) if session.raw else int(conv.book_tokens[-1])
        decode = greedy_rate(lambda t: session.feed([t]), first, n_decode)
        cells = session.ctx.seq_pos_max(DECODER_SEQ) + 1
        report = {
            "tokens": tokens,
            "ingest_s": ingest_s,
            "ingest_tok_s": tokens / ingest_s,
            "compress_s": conv.stats.seconds,  # the encoder passes and the memory file's write, inside ingest
            "decode_tok_s": decode,
            "decode_compressions": session.compressed_segments - segments,  # raw windows that filled in decode
            "segments": session.compressed_segments,  # compressed into memory: the rest of the tokens are raw
            "raw_window": getattr(session, "raw_window", runtime.segment),  # R (docs/design.md §6)
            "memory_cells": session.n_mem,
            "raw_cells": len(session.raw),
            "kv_cells": cells,
            "kv_bytes": cells * cell,
        }
    from_file, times = [], {"ttft_s": [], "ttft_recall_s": [], "ttft_recall_again_s": []}

    def first_token(name: str, recall: int) -> Conversation:
        started = time.perf_counter()
        with Conversation(
            runtime, book, use_memory_files=True, recall_tokens=recall, memory_window=memory_window
        ) as again:
            for _ in again.ask(DEMO_QUESTION, SamplingParams(max_tokens=1)):
                pass
            times[name].append(time.perf_counter() - started)
            from_file.append(again.stats.from_file)
        return again

    for _ in range(runs):
        first_token("ttft_s", 0)
        runtime.recall_states.clear()  # the first question of this runtime on these passages
        first_token("ttft_recall_s", DEFAULT_RECALL_TOKENS)
        # A later question whose recall this runtime decoded before (uio_gguf/memory/recall_states.py): a
        # new conversation asked the same question again takes the recalled passages' saved cells.
        again = first_token("ttft_recall_again_s", DEFAULT_RECALL_TOKENS)
        report["recall_tokens"] = len(again.session.recall)
        report["recall_reused"] = again.session.recall_decoded == 0 and again.session.recall_reused > 0
    for name, seconds in times.items():
        report[name] = statistics.median(seconds)
        report[f"{name}_runs"] = seconds  # each run's, in order: this CPU's spread is ±0.3 s
    report["ttft_from_file"] = all(from_file)  # all read the memory the ingest saved
    return report


def resident_mib() -> float | None:
    """This process's resident memory now (VmRSS; None where /proc does not say): the mapped weights
    read so far count in it."""
    with contextlib.suppress(OSError, StopIteration, ValueError):
        with open("/proc/self/status") as status:
            return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) / 1024
    return None


@contextlib.contextmanager
def private_memory_files() -> Iterator[None]:
    """Memory files go to a fresh cache for the run, so the first ingest compresses and nothing stays
    behind. Call it after the runtime is open: the default bundle is assembled in the user's cache."""
    before = os.environ.get("UIO_GGUF_CACHE")
    with tempfile.TemporaryDirectory(prefix="uio-bench-") as cache:
        os.environ["UIO_GGUF_CACHE"] = cache
        try:
            yield
        finally:
            if before is None:
                os.environ.pop("UIO_GGUF_CACHE", None)
            else:
                os.environ["UIO_GGUF_CACHE"] = before


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    return {
        "cpu": cpu,
        "cpus": usable_cpus(),
        "platform": platform.platform(),
        "llama_cpp_python": llama_cpp.__version__,
    }


def run(
    runtime,
    lengths: list[int],
    text: str,
    text_name: str,
    n_decode: int = DECODE_TOKENS,
    plain: bool = True,
    log: Callable[[str], None] = lambda line: None,
    on_row: Callable[[dict], None] = lambda report: None,
    first_token_runs: int = 1,
    memory_window: int | None = None,
) -> dict:
    """The bench on an open runtime (its threads and offload are both sides'). Returns the report;
    on_row(report) is called after each length (a long run that is stopped keeps its finished rows)."""
    if n_decode < 1:
        raise UIOError(f"--decode-tokens must be 1 or more, not {n_decode}")
    if first_token_runs < 1:
        raise UIOError(f"--first-token-runs must be 1 or more, not {first_token_runs}")
    for length in lengths:
        if length < runtime.segment:
            raise UIOError(f"length {length} is shorter than a segment ({runtime.segment} tokens)")
        runtime.check_length(length)  # before minutes of work, not after
    model = runtime.model
    report = {
        "machine": machine(),
        "load_average_before": os.getloadavg(),
        "model": {
            "bundle": str(runtime.bundle.path),
            "segment": runtime.segment,
            "ratio": runtime.bundle.ratio,
            "slots": runtime.slots,
            "n_ctx_train": model.n_ctx_train,
            "kv_type": "f32" if runtime.kv_type == llama_cpp.GGML_TYPE_F32 else "f16",
            "kv_cell_bytes": runtime.kv_cell_bytes,
            # the weights the encoder pass and the recall's prefill run on (uio_gguf/format/derived.py), and
            # the decoder's (the bundle's model file)
            "encoder_format": runtime.encoder_weights,
            "encoder_weights_bytes": os.path.getsize(runtime.prefill_model.path),
            "decoder_format": derived.label(runtime.bundle.model_path, derived.MODEL),
            "decoder_weights_bytes": os.path.getsize(runtime.model.path),
        },
        "settings": {
            "threads": runtime.n_threads,
            "segments_per_batch": runtime.encoder.per_batch,
            "flash_attn": runtime.flash_attn,
            "decode_tokens": n_decode,
            "first_token_runs": first_token_runs,
            "memory_window": resolve_memory_window(memory_window, runtime.slots),  # None: every segment's
            "plain": plain,
            "question": DEMO_QUESTION,
        },
        "text": {"name": text_name, "chars": len(text)},
        "rows": [],
    }
    seg, k = runtime.segment, runtime.slots
    with private_memory_files():
        for weights in {id(m): m for m in (model, runtime.prefill_model)}.values():
            with PlainContext(runtime, n_ctx=seg, n_batch=seg, model=weights) as warm:  # paged in before timing
                warm.feed(model.tokenize(text)[:seg])
        for length in lengths:
            book, copies = book_of_length(model, text, length)
            log(f"length {length}: uio ingest")
            uio = measure_uio(runtime, book, n_decode, first_token_runs, memory_window)
            tokens = document_tokens(model, book)
            log(f"length {length}: short-context prefill (the ingest limit)")
            short, short_n = short_prefill_rate(runtime, tokens)
            limit = short * seg / (seg + k)
            row = {
                "length": length,
                "tokens": len(tokens),
                "text_copies": copies,
                "beyond_trained_window": len(tokens) + n_decode > model.n_ctx_train,
                "uio": uio,
                "limit": {
                    "short_prefill_tok_s": short,
                    "short_prefill_tokens": short_n,
                    "ingest_limit_tok_s": limit,
                    "ingest_share": uio["ingest_tok_s"] / limit,
                },
                "plain": None,
                "ratios": None,
            }
            row["sliding"] = None
            if plain:
                log(f"length {length}: a plain sliding window of uio's cells")
                row["sliding"] = measure_sliding(runtime, tokens, uio["kv_cells"], n_decode)
                log(f"length {length}: plain llama.cpp prefill and decode")
                p = row["plain"] = measure_plain(runtime, tokens, n_decode)
                row["ratios"] = {
                    "ingest_over_prefill": uio["ingest_tok_s"] / p["prefill_tok_s"],
                    "decode": uio["decode_tok_s"] / p["decode_tok_s"],
                    "kv": uio["kv_bytes"] / p["kv_bytes"],
                }
            report["rows"].append(row)
            on_row(report)
    report["load_average_after"] = os.getloadavg()
    report["resident_mib"] = resident_mib()
    return report


def _short(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else f"{n:,}"


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def format_table(report: dict) -> str:
    """A markdown table, one column per length, and the lines that say what it was measured on."""
    rows, m, s = report["rows"], report["model"], report["settings"]
    heads = [_short(r["length"]) + (" †" if r["beyond_trained_window"] and r["plain"] else "") for r in rows]
    with_plain = any(r["plain"] for r in rows)

    def line(name: str, value) -> str:
        return f"| {name} | " + " | ".join(value(r) for r in rows) + " |"

    def plain(value):
        return lambda r: value(r) if r["plain"] else "-"

    out = ["| | " + " | ".join(heads) + " |", "|---" + "|---:" * len(rows) + "|"]
    out.append(line("tokens", lambda r: f"{r['tokens']:,}"))
    if with_plain:
        out.append(line("plain prefill, tok/s", plain(lambda r: f"{r['plain']['prefill_tok_s']:,.0f}")))
    out.append(line("uio ingest, tok/s", lambda r: f"{r['uio']['ingest_tok_s']:,.0f}"))
    out.append(line("ingest limit, tok/s", lambda r: f"{r['limit']['ingest_limit_tok_s']:,.0f}"))
    out.append(line("ingest / limit", lambda r: f"{r['limit']['ingest_share']:.2f}"))
    if with_plain:
        out.append(line("ingest / plain prefill", plain(lambda r: f"{r['ratios']['ingest_over_prefill']:.2f}×")))
        out.append(line("plain decode, tok/s", plain(lambda r: f"{r['plain']['decode_tok_s']:,.1f}")))
    out.append(line("uio decode, tok/s", lambda r: f"{r['uio']['decode_tok_s']:,.1f}"))
    if with_plain:
        out.append(line("sliding-same ingest, tok/s", plain(lambda r: f"{r['sliding']['ingest_tok_s']:,.0f}")))
        out.append(line("sliding-same decode, tok/s", plain(lambda r: f"{r['sliding']['decode_tok_s']:,.1f}")))
    if with_plain:
        out.append(line("uio decode / plain decode", plain(lambda r: f"{r['ratios']['decode']:.2f}×")))
        out.append(line("plain KV", plain(lambda r: _mib(r["plain"]["kv_bytes"]))))
    out.append(line("uio KV", lambda r: _mib(r["uio"]["kv_bytes"])))
    if with_plain:
        out.append(line("KV, plain / uio", plain(lambda r: f"{1 / r['ratios']['kv']:.1f}× smaller")))
        out.append(line("plain prefill time, s", plain(lambda r: f"{r['plain']['prefill_s']:.1f}")))
    out.append(line("uio first token from the memory file, s", lambda r: f"{r['uio']['ttft_s']:.2f}"))
    out.append(line("the same with recall, s", lambda r: f"{r['uio']['ttft_recall_s']:.2f}"))
    out.append(line("again, its recall decoded before, s", lambda r: f"{r['uio']['ttft_recall_again_s']:.2f}"))
    notes = [
        "",
        f"encoder weights {m['encoder_format']} ({_mib(m['encoder_weights_bytes'])}; the encoder pass and the "
        f"recall's prefill), decoder weights {m['decoder_format']} ({_mib(m['decoder_weights_bytes'])})"
        + (f"; resident {report['resident_mib']:,.0f} MiB at the end" if report.get("resident_mib") else ""),
        f"model {m['bundle']} (segment {m['segment']}, ratio {m['ratio']}: {m['slots']} slots per segment), "
        f"{m['kv_type']} KV cache ({m['kv_cell_bytes']:,} bytes a cell), trained window {m['n_ctx_train']:,} tokens; "
        f"{s['threads']} threads, {s['segments_per_batch']} segment(s) per encoder batch, "
        f"{s['decode_tokens']} greedy tokens decoded per side; uio raw window "
        + ", ".join(sorted({f"{r['uio'].get('raw_window', m['segment']):,}" for r in rows}))
        + " tokens",
        f"text: {report['text']['name']} ({report['text']['chars']:,} characters"
        + (f", repeated up to {max(r['text_copies'] for r in rows)} times" if rows else "")
        + ")",
        f"machine: {report['machine']['cpu']}, {report['machine']['cpus']} CPUs; load average "
        f"{report['load_average_before'][0]:.2f} before, {report['load_average_after'][0]:.2f} after "
        "(the run's own threads count in the second)",
        f"ingest limit = short-context prefill of {m['segment']}-token chunks on the encoder's weights × "
        f"{m['segment']}/({m['segment']}+{m['slots']}); first token: a new conversation whose memory comes from the "
        f"memory file, asked {s['question']!r} (recall: {DEFAULT_RECALL_TOKENS} tokens; again: one more "
        "conversation asked the same, its recalled passages' cells kept from the one before)"
        + (f"; each the median of {runs} runs" if (runs := s.get("first_token_runs", 1)) > 1 else ""),
        f"sliding-same = a plain llama.cpp window with uio's KV cells (the same KV size), reading the whole text "
        f"with context shift (the first {SINK_TOKENS} tokens kept)",
    ]
    if any(r["beyond_trained_window"] and r["plain"] for r in rows):
        notes.append(
            f"† past the model's trained window ({m['n_ctx_train']:,} tokens): plain full attention measured "
            "for speed only (what it computes there is not meaningful)"
        )
    if report["load_average_before"][0] > 1:
        notes.append(
            "the machine was shared with other jobs (load average above 1 before the run): figures are lower than idle"
        )
    return "\n".join(out + notes)


def format_comparison(reports: list[dict]) -> str:
    """One row per (encoder format, length) of several runs of the same lengths: what the format changes."""
    out = [
        "| encoder weights | length | ingest, tok/s | ingest limit, tok/s | uio decode, tok/s | first token, s "
        "| with recall, s | again, recall decoded before, s | weights, MiB | resident, MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for report in reports:
        m = report["model"]
        weights = m["encoder_weights_bytes"] + (
            m["decoder_weights_bytes"] if m["encoder_format"] != m["decoder_format"] else 0
        )
        for r in report["rows"]:
            u = r["uio"]
            out.append(
                f"| {m['encoder_format']} | {_short(r['length'])} | {u['ingest_tok_s']:,.0f} | "
                f"{r['limit']['ingest_limit_tok_s']:,.0f} | {u['decode_tok_s']:,.1f} | {u['ttft_s']:.2f} | "
                f"{u['ttft_recall_s']:.2f} | {u['ttft_recall_again_s']:.2f} | {weights / 2**20:,.0f} | "
                + (f"{report['resident_mib']:,.0f}" if report.get("resident_mib") else "-")
                + " |"
            )
    return "\n".join(out)
