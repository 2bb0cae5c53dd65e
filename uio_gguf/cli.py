"""The `uio-gguf` command line. Each command imports its stage lazily, so `--help` is instant and the
runtime works without the training extra."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from uio_gguf.default_bundle import DEFAULT_RATIO
from uio_gguf.errors import UIOError

app = typer.Typer(
    help="Long-context memory for llama.cpp: compress a book into memory slots (UIO-LLMs) and chat with it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

TRAIN_EXTRA_HINT = "the training extra is not installed: pip install 'uio-gguf[train]' (install torch==2.13.0 first on CPU)"


def _require_training_stack() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UIOError(TRAIN_EXTRA_HINT) from None


@app.command()
def train(
    base: str = typer.Option(..., help="Base model: a Hugging Face directory or a .gguf file (LLaMA family)."),
    data: list[Path] = typer.Option([], help="Training text: .txt files (one document each) or .jsonl with a 'text' field. Repeat for several. Not needed once OUT/tokens.npz exists."),
    out: Path = typer.Option(..., help="Output directory: tokens.npz, checkpoint/, log.jsonl."),
    heldout: list[Path] = typer.Option([], help="Held-out text for the perplexity in the log (same formats as --data; default: every 10th --data document)."),
    segment: int = typer.Option(1024, help="Segment length l in tokens."),
    ratio: int = typer.Option(32, help="Compression ratio r: k = l / r memory slots per segment."),
    segments: int = typer.Option(8, help="Segments per training crop (T)."),
    batch: int = typer.Option(1, help="Crops per step."),
    steps: int = typer.Option(1000, help="Optimizer steps."),
    estimator: str = typer.Option("unbiased", help="Gradient estimator: full, tbptt, incremental, unbiased."),
    window: int = typer.Option(2, help="S: TBPTT window / reservoir size."),
    windows_per_pass: int = typer.Option(1, help="Decoder windows per model call. 1: one segment at a time (least memory). More: the crop in a few large calls, the same gradient, N times the decoder memory (lower it as --batch grows); for GPUs, where small calls leave the card idle."),
    loss_windows: Optional[int] = typer.Option(None, help="Score only this many windows of each crop, drawn at random (an unbiased estimate of the crop's loss): long crops, and so long memories, for the cost of their encoder passes and a few decoder windows. Default: every window."),
    rank: int = typer.Option(32, help="LoRA rank of the encoder and transfer adapters."),
    alpha: float = typer.Option(128.0, help="LoRA alpha."),
    lr: float = typer.Option(1e-4, help="Peak learning rate (AdamW, 1% warm-up, cosine)."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay."),
    clip: float = typer.Option(1.0, help="Gradient-norm clip."),
    eval_every: int = typer.Option(100, help="Held-out perplexity every N steps."),
    eval_crops: int = typer.Option(4, help="Held-out crops in that perplexity (each a full crop of --segments)."),
    save_every: int = typer.Option(100, help="Checkpoint every N steps (and at the end)."),
    seed: int = typer.Option(0, help="Seed for initialisation, crops and the reservoir."),
    resume: bool = typer.Option(False, "--resume", help="Continue the checkpoint in --out exactly where it stopped."),
    device: str = typer.Option("auto", help="auto (CUDA if available, bf16; else CPU, fp32), cpu or cuda."),
    retrieval_share: float = typer.Option(0.0, help="Share of crops turned into recall tasks: pass-key / key-value facts in the memory segments, asked at the crop's end."),
    chat_recall_share: float = typer.Option(0.0, help="Share of steps whose crops are pass-key chat turns (the book in the user turn, the question, the assistant's answer), scored on the answer's tokens alone: recall training in `uio-gguf eval passkey`'s format."),
    init: Optional[Path] = typer.Option(None, help="Start from the weights of this UIO checkpoint, or of a converted bundle such as a shipped head (uio_gguf/bundles/...; its checkpoint is rebuilt in OUT/init-checkpoint). Fine-tuning: new optimizer and schedule; its segment, ratio, rank and alpha are used; a --seed other than the original run's draws other crops."),
    max_minutes: Optional[float] = typer.Option(None, help="Stop with a checkpoint after this many minutes; --resume continues (the schedule still spans --steps)."),
    prepare_only: bool = typer.Option(False, "--prepare-only", help="Only tokenize --data into OUT/tokens.npz (e.g. to train on another machine without the text or llama.cpp)."),
    kill_after: Optional[int] = typer.Option(None, hidden=True),
):
    """Train the UIO memory (encoder LoRA, transfer head, memory embedding) over a frozen base model."""
    _require_training_stack()
    from train.loop import TrainArgs
    from train.loop import train as run_training

    args = TrainArgs(
        base=base, data=[str(p) for p in data], heldout=[str(p) for p in heldout], out=str(out), segment=segment, ratio=ratio, segments=segments,
        batch=batch, steps=steps, estimator=estimator, window=window, windows_per_pass=windows_per_pass, loss_windows=loss_windows, rank=rank, alpha=alpha, lr=lr,
        weight_decay=weight_decay, clip=clip, eval_every=eval_every, eval_crops=eval_crops, save_every=save_every, seed=seed,
        resume=resume, device=device, retrieval_share=retrieval_share, chat_recall_share=chat_recall_share, init=None if init is None else str(init),
        max_minutes=max_minutes, prepare_only=prepare_only, kill_after=kill_after,
    )
    written = run_training(args)
    typer.echo(f"{'tokens' if prepare_only else 'checkpoint'}: {written}")


@app.command("train-check")
def train_check(
    samples: int = typer.Option(200, help="Sampled estimates per (S, factor)."),
    segments: int = typer.Option(12, help="Segments in the test crop (T)."),
    windows: str = typer.Option("1,2,4,8", help="Reservoir sizes S, comma separated."),
    seed: int = typer.Option(0, help="Seed of the tiny model and the sampling."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of {S, factor, ratio, cosine}."),
):
    """The paper's Table 4 on a tiny random model: ||g_est|| / ||g_full|| of the unbiased estimator
    with and without the max(1, (t-1)/S) factor, and the cosine of the averaged estimate with g_full."""
    _require_training_stack()
    from train.check import PAPER_TABLE4, format_table, gradient_study

    rows = gradient_study(samples=samples, segments=segments, windows=[int(w) for w in windows.split(",")], seed=seed)
    typer.echo(json.dumps(rows) if as_json else format_table(rows, PAPER_TABLE4))


@app.command()
def data(
    out: Path = typer.Option(..., help="Output directory: train.jsonl, heldout.jsonl, sources.json."),
    sources: str = typer.Option("all", help="Comma separated sources, 'all', or 'none' (only --extra-dir): "
                                "debian-handbook, debian-reference, python-docs, debian-docs, licenses, "
                                "python-stdlib, pypi-descriptions."),
    extra_dir: list[Path] = typer.Option([], help="A folder of your own .txt/.md/.rst files to add (repeatable)."),
    extra_license: str = typer.Option("unknown (user-supplied)", help="Licence recorded for --extra-dir files."),
    min_chars: int = typer.Option(2000, help="Leave out documents shorter than this many characters."),
    max_docs: Optional[int] = typer.Option(None, help="Keep at most this many documents (a seeded sample)."),
    heldout_share: float = typer.Option(0.05, help="Share of each source's documents held out."),
    synthetic_share: float = typer.Option(0.05, help="Share of the train characters given to synthetic passkey / key-value tasks."),
    synthetic_max_chars: int = typer.Option(32_000, help="Length of the longest synthetic document, in characters."),
    seed: int = typer.Option(0, help="Seed of the sample, the split and the synthetic tasks."),
):
    """Training text that needs no network: books and manuals from Debian and PyPI packages, split into
    train / held-out by document, with synthetic long-range recall tasks mixed in."""
    from train.dataset import DataArgs, build, format_report

    chosen = None if sources == "all" else [s for s in sources.split(",") if s not in ("", "none")]
    args = DataArgs(out=str(out), sources=chosen, extra_dirs=[str(d) for d in extra_dir], extra_license=extra_license,
                    min_chars=min_chars, max_docs=max_docs, heldout_share=heldout_share,
                    synthetic_share=synthetic_share, synthetic_max_chars=synthetic_max_chars, seed=seed)
    typer.echo(format_report(build(args)))



# ----- converter: checkpoint -> bundle, and what a bundle holds ---------------------------------------
@app.command()
def convert(
    checkpoint: Path = typer.Argument(..., help="A UIO checkpoint directory (the checkpoint/ that `train` writes)."),
    out: Path = typer.Option(..., "-o", "--out", help="Bundle directory to write."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model to convert: a Hugging Face directory or a .gguf (default: the one the checkpoint recorded)."),
    base_gguf: Optional[Path] = typer.Option(None, "--base-gguf", help="A GGUF of exactly the base weights, used as model.gguf as it is (--outtype ignored)."),
    outtype: str = typer.Option("f16", "--outtype", help="Type of model.gguf: f32, f16, bf16, q8_0, or a llama.cpp quantization such as q4_k_m, q5_k_m, q6_k."),
    force: bool = typer.Option(False, "--force", help="Replace the output directory if it exists."),
):
    """Convert a checkpoint to a bundle that stock llama.cpp loads: model.gguf, encoder.lora.gguf, uio.gguf."""
    _require_training_stack()
    from convert import convert_checkpoint

    bundle = convert_checkpoint(checkpoint, out, base=base, base_gguf=base_gguf, outtype=outtype, force=force, progress=True)
    typer.echo(f"bundle: {bundle}")


@app.command()
def info(
    bundle: Path = typer.Argument(..., help="A bundle directory."),
    as_json: bool = typer.Option(False, "--json", help="Print the information as JSON."),
):
    """What a bundle holds: architecture, sizes, segment/ratio, types, fingerprints and whether they match."""
    from uio_gguf.bundle import Bundle, format_info

    opened = Bundle.open(bundle, check=False)
    details = opened.info()
    typer.echo(json.dumps(details, indent=2) if as_json else format_info(details))
    if not all(fp["matches"] for fp in details["fingerprints"].values()):
        opened.verify()  # raises: the files do not belong together


# ----- runtime: compress and chat ------------------------------------------------------------------
BUNDLE_HELP = "UIO bundle directory (model.gguf, encoder.lora.gguf, uio.gguf). Default: the embedded SmolLM2 bundle."
RATIO_HELP = "Without -m: which shipped SmolLM2 bundle, by compression ratio (8: finer memory, books up to ~56K tokens; 32: up to ~225K)."


def _runtime(bundle: Optional[Path], ratio: int, n_gpu_layers: int, flash_attn: bool, verbose: bool):
    from uio_gguf.default_bundle import default_bundle_path
    from uio_gguf.runtime import UIORuntime

    bundle = bundle if bundle is not None else default_bundle_path(ratio)
    runtime = UIORuntime(bundle, n_gpu_layers=n_gpu_layers, flash_attn=flash_attn, verbose=verbose)
    if runtime.bundle.trained_steps == 0:
        typer.echo("note: this UIO head is untrained (zero LoRA deltas): the memory is the model's own states, "
                   "not a trained compression; answers about far-away text will be weak", err=True)
    return runtime


def _progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="tok", unit_scale=True, leave=False, disable=None)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, update


@app.command()
def compress(
    book: Path = typer.Argument(..., help="A UTF-8 text file."),
    model: Optional[Path] = typer.Option(None, "-m", "--model", help=BUNDLE_HELP),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Also copy the memory file here."),
    ratio: int = typer.Option(DEFAULT_RATIO, "--ratio", help=RATIO_HELP),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers offloaded to the GPU (CUDA builds)."),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="Use flash attention."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's log."),
):
    """Compress a book into its memory file (cached: `chat` on the same book starts instantly)."""
    import shutil

    from uio_gguf.book import read_book
    from uio_gguf.chat import Conversation

    text = read_book(book)
    runtime = _runtime(model, ratio, n_gpu_layers, flash_attn, verbose)
    bar, update = _progress_bar("compressing")
    conversation = Conversation(runtime, text, progress=update)
    bar.close()
    stats = conversation.stats
    source = "memory file (cached)" if stats.from_file else f"{stats.tokens_per_second:,.0f} tokens/s"
    typer.echo(f"{len(conversation.book_tokens):,} tokens, {stats.tokens:,} compressed into "
               f"{conversation.session.n_mem:,} memory slots in {stats.seconds:.1f} s ({source})")
    if out is not None:
        shutil.copyfile(conversation.memory_path, out)
        typer.echo(f"memory file: {out}")
    else:
        typer.echo(f"memory file: {conversation.memory_path}")


@app.command()
def chat(
    book: Path = typer.Argument(..., help="A UTF-8 text file: the book to talk about."),
    model: Optional[Path] = typer.Option(None, "-m", "--model", help=BUNDLE_HELP),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Ask one question, print the answer, exit."),
    ratio: int = typer.Option(DEFAULT_RATIO, "--ratio", help=RATIO_HELP),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers offloaded to the GPU (CUDA builds)."),
    n_ctx: Optional[int] = typer.Option(None, "--n-ctx", help="Decoder window in tokens (default: the model's trained context)."),
    temperature: float = typer.Option(0.0, "--temp", help="Sampling temperature; 0 = greedy."),
    top_k: int = typer.Option(40, "--top-k", help="Top-k sampling (with --temp > 0)."),
    top_p: float = typer.Option(0.95, "--top-p", help="Top-p sampling (with --temp > 0)."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    max_tokens: int = typer.Option(512, "--max-tokens", "-n", help="Most tokens per answer."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="Use flash attention."),
    no_cache: bool = typer.Option(False, "--no-cache", help="Do not read or write memory files."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's log."),
):
    """Chat about a book of any length: it is compressed into memory slots in llama.cpp's KV cache.

    Ctrl-C stops the current answer; a second Ctrl-C (or Ctrl-D at the prompt) exits."""
    from uio_gguf.book import read_book
    from uio_gguf.chat import Conversation
    from uio_gguf.session import SamplingParams

    text = read_book(book)
    runtime = _runtime(model, ratio, n_gpu_layers, flash_attn, verbose)
    bar, update = _progress_bar("compressing")
    conversation = Conversation(runtime, text, n_ctx=n_ctx, use_memory_files=not no_cache, progress=update)
    bar.close()
    stats = conversation.stats
    typer.echo(f"[{len(conversation.book_tokens):,} tokens -> {conversation.session.n_mem:,} memory slots + "
               f"{len(conversation.session.raw)} raw tokens; "
               + ("memory file reused]" if stats.from_file else f"compressed at {stats.tokens_per_second:,.0f} tokens/s]"),
               err=True)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, max_tokens=max_tokens, stop=stop)
    try:
        _chat_loop(conversation, params, prompt)
    except KeyboardInterrupt:  # the second Ctrl-C: leave cleanly
        typer.echo("\n[bye]", err=True)
    used, full = conversation.kv_bytes()
    typer.echo(f"[KV cache: {used / 2**20:.1f} MiB used; full attention over the same "
               f"{conversation.session.tokens_seen:,} tokens would need {full / 2**20:.1f} MiB]", err=True)


DEMO_QUESTION = "What is the access code of the archive?"


@app.command()
def demo(
    ratio: int = typer.Option(DEFAULT_RATIO, "--ratio", help=RATIO_HELP),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers offloaded to the GPU (CUDA builds)."),
):
    """The main job on the embedded default: SmolLM2-135M reads a bundled 13K-token text (its own
    8K window could not hold it) through UIO memory and answers one question about its first lines."""
    from importlib.resources import files

    book = Path(str(files("uio_gguf") / "data" / "demo_book.txt"))
    typer.echo(f"demo: {book.name} (the access code is stated in its first lines)\nquestion: {DEMO_QUESTION}", err=True)
    chat(book=book, model=None, prompt=DEMO_QUESTION, ratio=ratio, n_gpu_layers=n_gpu_layers, n_ctx=None,
         temperature=0.0, top_k=40, top_p=0.95, seed=0, max_tokens=64, stop=[], flash_attn=False, no_cache=False,
         verbose=False)


def _chat_loop(conversation, params, prompt: Optional[str]) -> None:
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
            if question.strip():
                answer(question)
    finally:
        signal.signal(signal.SIGINT, outer)


# ----- evaluation: does the memory work? ---------------------------------------------------------------
eval_app = typer.Typer(help="Measure the memory through the llama.cpp runtime: perplexity and pass-key retrieval.",
                       no_args_is_help=True)
app.add_typer(eval_app, name="eval")


def _lengths(text: str, what: str = "--lengths") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UIOError(f"{what} takes comma separated token counts, not {text!r}") from None
    if not values:
        raise UIOError(f"{what} is empty")
    return values


def _write_json(path: Optional[Path], report: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"json: {path}", err=True)


@eval_app.command("ppl")
def eval_ppl(
    files: list[Path] = typer.Argument(..., help="Held-out UTF-8 text files (one document each)."),
    lengths: str = typer.Option("4096,8192,16384,32768", "--lengths", help="Token lengths L, comma separated: each text's first L tokens."),
    model: list[Path] = typer.Option([], "-m", "--model", help="UIO bundle directory (repeatable: one uio column each)."),
    ratio: list[int] = typer.Option([], "--ratio", help="A shipped SmolLM2 bundle by ratio (repeatable). Default, without -m: every shipped ratio."),
    full_window: Optional[int] = typer.Option(None, "--full-window", help="Window of the sliding full-attention baseline (default: the model's trained context)."),
    full_keep: int = typer.Option(4, "--full-keep", help="Tokens at the start the sliding baseline never drops (attention sinks; llama.cpp's --keep)."),
    baselines: str = typer.Option("window,sliding,full", "--baselines", help="Baselines to compute, comma separated: window (no memory), sliding (full attention in the trained window), full; 'none' for the uio columns alone (each method is deterministic: baselines measured once need not be rerun)."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results here as JSON."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers offloaded to the GPU (CUDA builds)."),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="Use flash attention."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's log."),
):
    """Perplexity of long texts: UIO memory (each bundle) next to the same raw window without memory,
    full attention inside the model's trained window (sliding), and full attention over everything."""
    from uio_gguf import eval_ppl
    from uio_gguf.book import read_book
    from uio_gguf.default_bundle import shipped_bundles

    asked = _lengths(lengths)
    chosen = eval_ppl.parse_baselines(baselines)
    texts = [(path.name, read_book(path)) for path in files]
    if not model and not ratio:
        ratio = sorted(shipped_bundles(), reverse=True)
    runtimes = [_runtime(path, 0, n_gpu_layers, flash_attn, verbose) for path in model]
    runtimes += [_runtime(None, r, n_gpu_layers, flash_attn, verbose) for r in ratio]
    tokenized = eval_ppl.tokenize_texts(runtimes[0].model, texts)
    bar, update = _progress_bar("evaluating")
    report = eval_ppl.evaluate(runtimes, tokenized, asked, full_window=full_window,
                               full_keep=full_keep, progress=update, baselines=chosen)
    bar.close()
    typer.echo(eval_ppl.format_report(report))
    _write_json(json_out, report)


@eval_app.command("passkey")
def eval_passkey(
    lengths: str = typer.Option("4096,16384", "--lengths", help="Document lengths in tokens, comma separated."),
    depths: str = typer.Option("0.1,0.5,0.9", "--depths", help="Where the pass key sits (0: start, 1: end), comma separated."),
    trials: int = typer.Option(5, "--trials", help="Documents (each with its own key) per length and depth."),
    seed: int = typer.Option(0, "--seed", help="Seed of the keys and of the filler."),
    model: Optional[Path] = typer.Option(None, "-m", "--model", help=BUNDLE_HELP),
    ratio: int = typer.Option(DEFAULT_RATIO, "--ratio", help=RATIO_HELP),
    filler: list[Path] = typer.Option([], "--filler", help="Text files to draw the filler from (repeatable). Default: the classic 'The grass is green...' lines."),
    json_out: Optional[Path] = typer.Option(None, "--json", help="Also write the results (with every answer) here as JSON."),
    n_gpu_layers: int = typer.Option(0, "--n-gpu-layers", help="Layers offloaded to the GPU (CUDA builds)."),
    flash_attn: bool = typer.Option(False, "--flash-attn", help="Use flash attention."),
    verbose: bool = typer.Option(False, "--verbose", help="Show llama.cpp's log."),
):
    """Pass-key retrieval: a number hidden at several depths of long filler, asked for through the chat path."""
    from uio_gguf import eval_passkey as passkey
    from uio_gguf.book import read_book

    asked = _lengths(lengths)
    try:
        where = [float(d) for d in depths.split(",") if d.strip()]
    except ValueError:
        raise UIOError(f"--depths takes comma separated fractions between 0 and 1, not {depths!r}") from None
    texts = [read_book(path) for path in filler] or None
    runtime = _runtime(model, ratio, n_gpu_layers, flash_attn, verbose)
    bar, update = _progress_bar("asking")
    bar.unit = "doc"
    report = passkey.evaluate(runtime, asked, where, trials, seed=seed, texts=texts, progress=update)
    bar.close()
    typer.echo(passkey.format_report(report))
    _write_json(json_out, report)


def main() -> None:
    try:
        app()
    except UIOError as err:
        typer.echo(f"uio-gguf: error: {err}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        typer.echo("uio-gguf: interrupted", err=True)
        sys.exit(130)
