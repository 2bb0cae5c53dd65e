"""`uio-gguf eval`: does the memory work? Measured through the llama.cpp runtime."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from uio_gguf.cli.options import (
    FlashAttn,
    GpuLayers,
    LoopGuardOption,
    MemoryWindow,
    Model,
    Ratio,
    RecallInContext,
    Verbose,
    app,
    open_runtime,
    parse_depths,
    parse_lengths,
    progress_bar,
    write_json,
)

eval_app = typer.Typer(
    help="Measure the memory through the llama.cpp runtime: perplexity, pass-key retrieval and long-context QA.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")


@eval_app.command("ppl")
def eval_ppl(
    files: list[Path] = typer.Argument(
        None,
        help="Held-out UTF-8 text files in domain (like training's sources), one document each. "
        "With no texts at all: the in-domain and the out-of-domain text the package ships.",
        show_default=False,
    ),
    out_of_domain: list[Path] = typer.Option(
        [],
        "--out-of-domain",
        help="A held-out text from sources training never drew on (literature, scripture), reported in a "
        "table of its own (repeatable).",
    ),
    lengths: str = typer.Option(
        "4096,8192,16384,32768", "--lengths", help="Token lengths L, comma separated: each text's first L tokens."
    ),
    model: list[Path] = typer.Option(
        [], "-m", "--model", help="UIO bundle directory (repeatable: one uio column each)."
    ),
    ratio: list[int] = typer.Option(
        [], "--ratio", help="A shipped SmolLM2 bundle by ratio (repeatable). Default, without -m: every shipped ratio."
    ),
    full_window: int | None = typer.Option(
        None,
        "--full-window",
        help="Window of the sliding full-attention baseline (default: the model's trained context).",
    ),
    full_keep: int = typer.Option(
        4,
        "--full-keep",
        help="Tokens at the start the sliding baseline never drops (attention sinks; llama.cpp's --keep).",
    ),
    baselines: str = typer.Option(
        "same,sliding,full",
        "--baselines",
        help="Baselines to compute, comma separated: same (beside every memory column C with raw window R: raw-R, "
        "that raw window without memory, and sliding-same:C, a plain sliding window with C's KV cells, the baseline "
        "the memory has to beat), window (each segment alone), sliding (full attention in the trained window), full; "
        "'none' for the memory columns alone (each method is deterministic: baselines measured once need not be rerun).",
    ),
    chat: bool = typer.Option(
        True, "--chat/--no-chat", help="Also the chat-rR columns: the memory with chat's default raw window."
    ),
    keep: int = typer.Option(
        0,
        "--keep",
        help="Tokens the chat columns keep raw in front of their memory: the text's first tokens, as llama.cpp's "
        "--keep (attention sinks; docs/memory-vs-window.md). 0: none, as chat does today.",
    ),
    reread: bool = typer.Option(
        False,
        "--reread",
        help="The chat columns decode their raw window again behind the memory after each compression (the view "
        "the heads are trained on; costs R/l more decoding), measured against a raw window that rereads too.",
    ),
    memory_window: int | None = typer.Option(
        None,
        "--memory-window",
        help="The chat columns hold at most this many memory cells (a multiple of the slots per segment): the "
        "oldest segments' cells go first, so the decoder's cells stop growing with the text "
        "(docs/memory-vs-window.md). Default: the memory of every segment.",
    ),
    memory_sink: int = typer.Option(
        0,
        "--memory-sink",
        min=0,
        help="With --memory-window: the text's first N segments' memory always stays (attention sinks).",
    ),
    raw_windows: str | None = typer.Option(
        None,
        "--raw-windows",
        help="Raw windows R for the chat columns (memory + the last R raw tokens), comma separated, e.g. "
        "128,512,1024,2048 (default: chat's). Implies --chat.",
    ),
    columns: str | None = typer.Option(
        None,
        "--columns",
        help="Compute only the columns whose names start with these, comma separated (e.g. chat-,sliding-same:chat): "
        "every method is deterministic, so columns an earlier run measured need not be read again.",
    ),
    json_out: Path | None = typer.Option(
        None,
        "--json",
        help="Also write the results here as JSON (after each method and text: a stopped run keeps them).",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue the run whose --json file this is: each column's pass over a text that the file holds (the "
        "same computation: files, settings and tokens) is taken from it, and only the rest is read (a pass to a "
        "shorter length is read again). The table shows every column of the command, those --columns leaves out "
        "with what the file holds; the file keeps every pass it held.",
    ),
    n_gpu_layers: GpuLayers = 0,
    flash_attn: FlashAttn = False,
    verbose: Verbose = False,
):
    """Perplexity of long texts: UIO memory (each bundle) next to the same raw window without memory,
    full attention inside the model's trained window (sliding), and full attention over everything.
    In-domain and out-of-domain texts get a table each."""
    from uio_gguf.evals import ppl as eval_ppl
    from uio_gguf.format.shipped import shipped_bundles
    from uio_gguf.text.book import read_book

    asked = parse_lengths(lengths)
    chosen = eval_ppl.parse_baselines(baselines)
    earlier = eval_ppl.read_earlier(json_out, resume)
    texts = {"in": [(path.name, read_book(path)) for path in files or []]}
    texts["out"] = [(path.name, read_book(path)) for path in out_of_domain]
    if not texts["in"] and not texts["out"]:
        texts = {domain: [eval_ppl.packaged_text(domain)] for domain in eval_ppl.DOMAINS}
    if not model and not ratio:
        ratio = sorted(shipped_bundles(), reverse=True)
    runtimes = [open_runtime(path, None, n_gpu_layers, flash_attn, verbose) for path in model]
    runtimes += [open_runtime(None, r, n_gpu_layers, flash_attn, verbose) for r in ratio]
    tokenized = [
        t for domain, named in texts.items() for t in eval_ppl.tokenize_texts(runtimes[0].model, named, domain)
    ]
    bar, update = progress_bar("evaluating")
    report = eval_ppl.evaluate(
        runtimes,
        tokenized,
        asked,
        full_window=full_window,
        full_keep=full_keep,
        progress=update,
        baselines=chosen,
        raw_windows=tuple(parse_lengths(raw_windows, "--raw-windows")) if raw_windows else (None if chat else ()),
        chat_keep=keep,
        chat_reread=reread,
        chat_memory=(memory_window, memory_sink),
        columns=tuple(c.strip() for c in columns.split(",") if c.strip()) if columns else (),
        partial=(lambda r: json_out.write_text(json.dumps(r, indent=2) + "\n")) if json_out else None,
        earlier=earlier,
    )
    bar.close()
    write_json(json_out, report)  # first: a long run's figures are kept whatever happens to the table
    typer.echo(eval_ppl.format_report(report))


@eval_app.command("passkey")
def eval_passkey(
    lengths: str = typer.Option("4096,16384", "--lengths", help="Document lengths in tokens, comma separated."),
    depths: str = typer.Option(
        "0.1,0.5,0.9", "--depths", help="Where the pass key sits (0: start, 1: end), comma separated."
    ),
    trials: int = typer.Option(5, "--trials", help="Documents (each with its own key) per length and depth."),
    seed: int = typer.Option(0, "--seed", help="Seed of the keys and of the filler."),
    model: Model = None,
    ratio: Ratio = None,
    filler: list[Path] = typer.Option(
        [],
        "--filler",
        help="Text files to draw the filler from (repeatable). Default: the classic 'The grass is green...' lines.",
    ),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the results (with every answer) here as JSON."
    ),
    recall: int = typer.Option(
        0, "--recall", help="Tokens brought back raw for the question, as chat's --recall; 0: the memory alone."
    ),
    n_gpu_layers: GpuLayers = 0,
    flash_attn: FlashAttn = False,
    verbose: Verbose = False,
):
    """Pass-key retrieval: a number hidden at several depths of long filler, asked for through the chat path."""
    from uio_gguf.evals import passkey
    from uio_gguf.text.book import read_book

    asked = parse_lengths(lengths)
    where = parse_depths(depths)
    texts = [read_book(path) for path in filler] or None
    runtime = open_runtime(model, ratio, n_gpu_layers, flash_attn, verbose)
    bar, update = progress_bar("asking")
    bar.unit = "doc"
    report = passkey.evaluate(
        runtime, asked, where, trials, seed=seed, texts=texts, progress=update, recall_tokens=recall
    )
    bar.close()
    typer.echo(passkey.format_report(report))
    write_json(json_out, report)


@eval_app.command("qa")
def eval_qa(
    lengths: str = typer.Option("4096,16384,32768,56000", "--lengths", help="Book lengths in tokens, comma separated."),
    depths: str = typer.Option(
        "0.1,0.5,0.9", "--depths", help="Where the (asked) needle sits (0: start, 1: end), comma separated."
    ),
    trials: int = typer.Option(2, "--trials", help="Questions per task, length and depth."),
    fillers: int = typer.Option(
        1,
        "--fillers",
        help="Fillers drawn per length, which the trials take in turn (at most --trials). With one, the trials of "
        "a depth hide their needles in the same passage: more fillers sample contexts, not only needles "
        "(each costs one compression of the book).",
    ),
    # None: eval_qa's own defaults, so the list lives in one place (and eval_qa is imported only when run)
    tasks: str | None = typer.Option(
        None,
        "--tasks",
        help="Tasks, comma separated: passkey, single, multikey, multivalue, vt (default: all; see "
        "docs/evaluation.md).",
        show_default=False,
    ),
    methods: str | None = typer.Option(
        None,
        "--methods",
        help="Methods side by side on the same texts, comma separated: window, full-8k, rag, uio, uio+recall "
        "(the default: all of these) and uio+attn (recall ranked by the question's attention over the memory "
        "instead of BM25; ~3x a question's time).",
        show_default=False,
    ),
    filler: list[Path] = typer.Option(
        [],
        "--filler",
        help="Text files to draw the filler from (repeatable). Default: a held-out text shipped with the package "
        "(see --domain).",
    ),
    domain: str = typer.Option(
        "in",
        "--domain",
        help="Which shipped held-out text is the filler when no --filler is given: in (the libpng manual, a "
        "manual like training's sources) or out (KJV Genesis and Exodus, a kind of text training never saw).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed of the needles and of the filler."),
    model: Model = None,
    ratio: Ratio = None,
    recall: int | None = typer.Option(
        None, "--recall", help="Recall budget in tokens for rag, uio+recall and uio+attn (default: chat's)."
    ),
    max_tokens: int | None = typer.Option(
        None,
        "--max-tokens",
        "-n",
        help="Most tokens per answer (greedy). Default: 128 for multivalue (three numbers), 48 for the others.",
    ),
    raw_window: int | None = typer.Option(
        None,
        "--raw-window",
        help="The raw tail of the book the uio methods keep (chat's --raw-window); window, rag and sliding+recall "
        "read the same tail. Default: one segment, the training view.",
    ),
    memory_window: MemoryWindow = None,
    recall_in_context: RecallInContext = None,
    loop_guard: LoopGuardOption = True,
    no_cache: bool = typer.Option(False, "--no-cache", help="Neither read nor write the fillers' memory files."),
    json_out: Path | None = typer.Option(
        None, "--json", help="Also write the results (with every answer) here as JSON."
    ),
    n_gpu_layers: GpuLayers = 0,
    flash_attn: FlashAttn = False,
    verbose: Verbose = False,
):
    """Long-context QA (RULER-style tasks, exact match): window, full-8k, rag, uio, uio+recall and uio+attn on
    the same texts, with the share of answers that end by themselves, loops and time to first token."""
    from uio_gguf.errors import UIOError
    from uio_gguf.evals import ppl as eval_ppl
    from uio_gguf.evals import qa
    from uio_gguf.text.book import read_book

    asked = parse_lengths(lengths)
    where = parse_depths(depths)
    chosen_tasks = list(qa.TASKS) if tasks is None else qa.parse_names(tasks, qa.TASKS, "task")
    chosen_methods = list(qa.DEFAULT_METHODS) if methods is None else qa.parse_names(methods, qa.METHODS, "method")
    texts = [read_book(path) for path in filler] or None
    named = None  # the report's name of the filler when it is a shipped text other than eval_qa's default
    if domain not in eval_ppl.DOMAINS:
        raise UIOError(f"--domain is in or out, not {domain}")
    if not texts and domain == "out":
        named, text = eval_ppl.packaged_text("out")
        texts = [text]

    def name_filler(report: dict) -> dict:
        return {**report, "filler": named} if named else report

    runtime = open_runtime(model, ratio, n_gpu_layers, flash_attn, verbose)
    bar, update = progress_bar("asking")
    bar.unit = "answer"
    report = qa.evaluate(
        runtime,
        asked,
        where,
        trials,
        tasks=chosen_tasks,
        methods=chosen_methods,
        texts=texts,
        seed=seed,
        recall_tokens=recall,
        max_tokens=max_tokens,
        loop_guard=loop_guard,
        use_memory_files=not no_cache,
        fillers=fillers,
        raw_window=raw_window,
        memory_window=memory_window,
        recall_in_context=recall_in_context,
        progress=update,
        partial=(lambda r: json_out.write_text(json.dumps(name_filler(r), indent=2) + "\n")) if json_out else None,
    )
    bar.close()
    report = name_filler(report)
    typer.echo(qa.format_report(report))
    write_json(json_out, report)
