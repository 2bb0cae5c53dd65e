"""Commands of the runtime: info, compress, chat, demo."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from uio_gguf.chat.recall import DEFAULT_RECALL_TOKENS
from uio_gguf.cli.options import (
    AutoRatio,
    EncoderFormat,
    FlashAttn,
    ForceNCtx,
    GpuLayers,
    KeepTokens,
    LoopGuardOption,
    MemoryWindow,
    Model,
    NCtx,
    RawWindow,
    RecallInContext,
    Reread,
    Threads,
    Verbose,
    app,
    check_n_ctx,
    open_runtime,
    progress_bar,
)
from uio_gguf.errors import UIOError

DEFAULT_DRY = 0.0  # chat's DRY multiplier (see docs/evaluation.md for the answers measured with and without)

Recall = Annotated[
    int,
    typer.Option(
        "--recall",
        help="Tokens of the book brought back raw for each question (the passages BM25 ranks best for it); "
        "0: the compressed memory alone.",
    ),
]
RecallRanking = Annotated[
    str,
    typer.Option(
        "--recall-ranking",
        help="How recall ranks the book's passages: bm25 (the question's words) or attention (the question's "
        "attention over each segment's memory slots; see docs/evaluation.md for both measured).",
    ),
]
DryMultiplier = Annotated[
    float,
    typer.Option(
        "--dry",
        help="llama.cpp's DRY sampler: penalty multiplier for a token that extends a sequence the answer already "
        "said (base 1.75, allowed length 2); 0: off.",
    ),
]
RepeatPenalty = Annotated[
    float, typer.Option("--repeat-penalty", help="llama.cpp's repetition penalty over the last 64 tokens; 1: off.")
]


@app.command()
def info(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the information as JSON."),
):
    """What a bundle holds: architecture, sizes, segment/ratio, types, fingerprints and whether they match."""
    from uio_gguf.format.bundle import Bundle, format_info

    opened = Bundle.open(bundle, check=False)
    details = opened.info()
    typer.echo(json.dumps(details, indent=2) if as_json else format_info(details))
    if not all(fp["matches"] for fp in details["fingerprints"].values()):
        opened.verify()  # raises: the files do not belong together


@app.command()
def compress(
    book: Path = typer.Argument(..., help="A UTF-8 text file."),
    model: Model = None,
    out: Path | None = typer.Option(None, "-o", "--out", help="Also copy the memory file here."),
    ratio: AutoRatio = None,
    n_gpu_layers: GpuLayers = 0,
    threads: Threads = None,
    encoder_format: EncoderFormat = "auto",
    flash_attn: FlashAttn = False,
    verbose: Verbose = False,
):
    """Compress a book into its memory file (cached: `chat` on the same book starts instantly)."""
    from uio_gguf.chat.conversation import Conversation
    from uio_gguf.text.book import read_book

    if out is not None:
        _check_output_file(out)  # before the work, not after it
    text = read_book(book)
    runtime = open_runtime(
        model, ratio, n_gpu_layers, flash_attn, verbose, book=text, threads=threads, encoder_format=encoder_format
    )
    bar, update = progress_bar("compressing")
    conversation = Conversation(runtime, text, progress=update, recall_tokens=0, must_save=True)
    bar.close()
    stats = conversation.stats
    source = "memory file (cached)" if stats.from_file else f"{stats.tokens_per_second:,.0f} tokens/s"
    typer.echo(
        f"{len(conversation.book_tokens):,} tokens, {stats.tokens:,} compressed into "
        f"{conversation.session.n_mem:,} memory slots in {stats.seconds:.1f} s ({source})"
    )
    if out is not None:
        _copy_out(conversation.memory_path, out)
        typer.echo(f"memory file: {out}")
    else:
        typer.echo(f"memory file: {conversation.memory_path}")


@app.command()
def chat(
    book: Path = typer.Argument(..., help="A UTF-8 text file: the book to talk about."),
    model: Model = None,
    prompt: str | None = typer.Option(None, "--prompt", "-p", help="Ask one question, print the answer, exit."),
    ratio: AutoRatio = None,
    n_gpu_layers: GpuLayers = 0,
    n_ctx: NCtx = None,
    force_n_ctx: ForceNCtx = False,
    threads: Threads = None,
    temperature: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(40, "--top-k", help="Top-k sampling (with --temp > 0)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Top-p sampling (with --temp > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per answer."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    recall: Recall = DEFAULT_RECALL_TOKENS,
    recall_ranking: RecallRanking = "bm25",
    raw_window: RawWindow = None,
    keep_tokens: KeepTokens = None,
    reread: Reread = None,
    memory_window: MemoryWindow = None,
    recall_in_context: RecallInContext = None,
    repeat_penalty: RepeatPenalty = 1.0,
    dry: DryMultiplier = DEFAULT_DRY,
    loop_guard: LoopGuardOption = True,
    encoder_format: EncoderFormat = "auto",
    flash_attn: FlashAttn = False,
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Do not read or write memory files (nor the start caches beside them)."
    ),
    verbose: Verbose = False,
):
    """Chat about a book of any length: it is compressed into memory slots in llama.cpp's KV cache.

    Ctrl-C stops the current answer; a second Ctrl-C (or Ctrl-D at the prompt) exits."""
    from uio_gguf.chat.conversation import RANKINGS, Conversation
    from uio_gguf.llamacpp.sampling import SamplingParams
    from uio_gguf.text.book import read_book

    # Bad settings get their line before the book is compressed.
    params = SamplingParams(
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        seed=seed,
        max_tokens=max_tokens,
        stop=stop,
        repeat_penalty=repeat_penalty,
        dry_multiplier=dry,
        loop_guard=loop_guard,
    )
    check_n_ctx(n_ctx)  # the lower bound; the model's trained context once it is open
    if recall_ranking not in RANKINGS:
        raise UIOError(f"--recall-ranking must be one of {', '.join(RANKINGS)}, not {recall_ranking!r}")
    text = read_book(book)
    runtime = open_runtime(
        model,
        ratio,
        n_gpu_layers,
        flash_attn,
        verbose,
        book=text,
        n_ctx=n_ctx,
        force_n_ctx=force_n_ctx,
        threads=threads,
        encoder_format=encoder_format,
    )
    bar, update = progress_bar("compressing")
    conversation = Conversation(
        runtime,
        text,
        n_ctx=n_ctx,
        use_memory_files=not no_cache,
        progress=update,
        recall_tokens=recall,
        raw_window=raw_window,
        recall_ranking=recall_ranking,
        **({} if keep_tokens is None else {"keep": keep_tokens}),
        memory_window=memory_window,
        **({} if reread is None else {"reread": reread}),
        **({} if recall_in_context is None else {"recall_in_context": recall_in_context}),
    )
    bar.close()
    stats = conversation.stats
    typer.echo(
        f"[{len(conversation.book_tokens):,} tokens -> {conversation.session.n_mem:,} memory slots + "
        f"{len(conversation.session.raw)} raw tokens; "
        + ("memory file reused]" if stats.from_file else f"compressed at {stats.tokens_per_second:,.0f} tokens/s]"),
        err=True,
    )
    try:
        _chat_loop(conversation, params, prompt)
    except KeyboardInterrupt:  # the second Ctrl-C: leave cleanly
        typer.echo("\n[bye]", err=True)
    used, full = conversation.kv_bytes()
    typer.echo(
        f"[KV cache: {used / 2**20:.1f} MiB used; full attention over the same "
        f"{conversation.session.tokens_seen:,} tokens would need {full / 2**20:.1f} MiB]",
        err=True,
    )


def _check_output_file(out: Path) -> None:
    """UIOError unless a file can be written at `out` (its folder exists, it is not a folder)."""
    if out.is_dir():
        raise UIOError(f"-o {out} is a directory: name the memory file to write (e.g. {out / 'book.mem'})")
    if not out.parent.is_dir():
        raise UIOError(f"-o {out}: the directory {out.parent} does not exist")
    if not os.access(out.parent, os.W_OK):
        raise UIOError(f"-o {out}: cannot write to the directory {out.parent}")


def _copy_out(source: Path, out: Path) -> None:
    """Copies the memory file to -o whole or not at all: a full disk leaves no partial file (a device or a
    pipe, e.g. -o /dev/stdout, is written as it is)."""
    import shutil

    from uio_gguf.atomic import atomic_file

    try:
        if out.exists() and not out.is_file():
            with open(source, "rb") as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
        else:
            with atomic_file(out) as tmp:
                shutil.copyfile(source, tmp)
    except OSError as err:
        raise UIOError(f"-o {out}: cannot write the memory file: {err.strerror or err}") from None


@app.command()
def demo(
    ratio: AutoRatio = None,
    n_gpu_layers: GpuLayers = 0,
    recall: Recall = DEFAULT_RECALL_TOKENS,
    raw_window: RawWindow = None,
    keep_tokens: KeepTokens = None,
    reread: Reread = None,
    memory_window: MemoryWindow = None,
    recall_in_context: RecallInContext = None,
    repeat_penalty: RepeatPenalty = 1.0,
    dry: DryMultiplier = DEFAULT_DRY,
    loop_guard: LoopGuardOption = True,
):
    """The main job on the embedded default: SmolLM2-135M reads a bundled 13K-token text (its own
    8K window could not hold it) through UIO memory and answers one question about its first lines."""
    from uio_gguf.text.packaged import DEMO_BOOK, DEMO_QUESTION, path

    book = path(DEMO_BOOK)
    typer.echo(f"demo: {book.name} (the access code is stated in its first lines)\nquestion: {DEMO_QUESTION}", err=True)
    chat(
        book=book,
        model=None,
        prompt=DEMO_QUESTION,
        ratio=ratio,
        n_gpu_layers=n_gpu_layers,
        n_ctx=None,
        force_n_ctx=False,
        threads=None,
        temperature=0.0,
        top_k=40,
        top_p=0.95,
        seed=0,
        max_tokens=64,
        stop=[],
        recall=recall,
        recall_ranking="bm25",
        raw_window=raw_window,
        keep_tokens=keep_tokens,
        reread=reread,
        memory_window=memory_window,
        recall_in_context=recall_in_context,
        repeat_penalty=repeat_penalty,
        dry=dry,
        loop_guard=loop_guard,
        flash_attn=False,
        no_cache=False,
        verbose=False,
    )


EXIT_WORDS = ("exit", "quit", "/bye", "/exit", "/quit")  # typed at the prompt: leave (never asked of the model)


def _chat_loop(conversation, params, prompt: str | None) -> None:
    """One answer (--prompt) or a REPL. The first Ctrl-C during an answer stops that answer."""
    import signal

    interrupts = {"n": 0}

    def on_sigint(_sig, _frame):
        interrupts["n"] += 1
        if interrupts["n"] >= 2:
            raise KeyboardInterrupt

    def answer(question: str) -> None:
        interrupts["n"] = 0
        previous = signal.signal(signal.SIGINT, on_sigint)
        try:
            for piece in conversation.ask(question, params, should_stop=lambda: interrupts["n"] > 0):
                typer.echo(piece, nl=False)
        finally:
            signal.signal(signal.SIGINT, previous)
        typer.echo("" if interrupts["n"] == 0 else " [stopped]")

    # Ctrl-C at the prompt leaves, even in a process that inherited SIGINT ignored (a background job)
    outer = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if prompt is not None:
            answer(prompt)
            return
        while True:
            try:
                question = input("> ")
            except (EOFError, KeyboardInterrupt):
                typer.echo("")
                return
            if question.strip().lower() in EXIT_WORDS:
                return
            if question.strip():
                try:
                    answer(question)
                except UIOError as err:  # e.g. a question the window cannot hold: the conversation goes on
                    typer.echo(f"uio-gguf: {err}", err=True)
    finally:
        signal.signal(signal.SIGINT, outer)
