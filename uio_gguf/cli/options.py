"""What the commands share: the Typer app, the options every runtime command takes (declared once
here), and the helpers that open a runtime and draw a progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from uio_gguf.errors import UIOError
from uio_gguf.format.shipped import DEFAULT_RATIO

__all__ = ["DEFAULT_RATIO", "app"]

app = typer.Typer(
    help="Long-context memory for llama.cpp: compress a book into memory slots (UIO-LLMs) and chat with it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

BUNDLE_HELP = "UIO bundle directory (model.gguf, encoder.lora.gguf, uio.gguf). Default: the embedded SmolLM2 bundle."
RATIO_HELP = "Without -m: which shipped SmolLM2 bundle, by compression ratio (8: finer memory, books up to ~56K tokens; 32: up to ~225K)."

# The options of every command that runs the model (use with a default: `ratio: Ratio = None`, which is
# DEFAULT_RATIO without -m; with -m, --ratio is refused: check_ratio).
Model = Annotated[Path | None, typer.Option("-m", "--model", help=BUNDLE_HELP)]
Ratio = Annotated[int | None, typer.Option("--ratio", help=RATIO_HELP + f" Default: {DEFAULT_RATIO}.")]
# For commands that read a book: None picks the finest shipped ratio that holds it (open_runtime's book=).
AutoRatio = Annotated[
    int | None,
    typer.Option("--ratio", help=RATIO_HELP + " Default: 8, or 32 for a book longer than ratio 8 holds."),
]
# Chat's, the server's and eval qa's answers (uio_gguf.llamacpp.loop_guard).
LoopGuardOption = Annotated[
    bool,
    typer.Option(
        "--loop-guard/--no-loop-guard",
        help="Stop an answer where it starts to repeat itself (a sentence it already said, or a short unit three "
        "times in a row); the repeat is not shown. SmolLM2-135M rarely ends a turn after a long book.",
    ),
]
# chat's and the server's decoder window
MIN_N_CTX = 256  # llama.cpp's smallest window: it rounds a context up to a multiple of 256 cells
NCtx = Annotated[
    int | None,
    typer.Option(
        "--n-ctx",
        help=f"Decoder window in tokens, {MIN_N_CTX} up to the model's trained context (the default; past it "
        "with --force-n-ctx).",
    ),
]
ForceNCtx = Annotated[
    bool,
    typer.Option(
        "--force-n-ctx",
        help="Allow an --n-ctx past the model's trained context: positions it never saw, and a cache that grows with it.",
    ),
]
Threads = Annotated[
    int | None,
    typer.Option(
        "--threads",
        help="CPU threads for llama.cpp (default: the usable CPUs idle at start; a CPU another process keeps busy "
        "would hold every thread back).",
    ),
]
RawWindow = Annotated[
    int | None,
    typer.Option(
        "--raw-window",
        help="The most recent tokens kept raw (the book's tail, the question, the recent turns); older ones are "
        "compressed a segment at a time. Default: 8 segments (1,024 tokens with the shipped heads), the layout "
        "that reads best at equal cells (docs/memory-vs-window.md); one segment (the training view) where the "
        "memory and the recall leave no room for 8.",
    ),
]
KeepTokens = Annotated[
    int | None,
    typer.Option(
        "--keep-tokens",
        min=0,
        help="The book's first tokens kept raw in front of the memory (attention sinks, as llama.cpp's --keep; "
        "with a raw window over one segment, 4 reads better: docs/memory-vs-window.md). Default: 0.",
    ),
]
Reread = Annotated[
    bool | None,
    typer.Option(
        "--reread/--no-reread",
        help="After each compression, decode the raw window again behind the memory (the view the heads are trained "
        "on; with a raw window over one segment it reads better than a plain window of the same cells, at R/l "
        "times the decoding when a turn passes R: docs/memory-vs-window.md). Default: on.",
        show_default=False,
    ),
]
RecallInContext = Annotated[
    bool | None,
    typer.Option(
        "--recall-in-context/--recall-alone",
        help="Decode the recalled passages in the conversation, after the raw window, reading the memory and the "
        "raw window as a plain prompt of the same tokens reads them; --recall-alone decodes them by themselves "
        "(reused between questions, cheaper with every segment's memory; with a long raw window SmolLM2-135M "
        "then misses facts it reads in them: docs/memory-vs-window.md). Default: in context.",
        show_default=False,
    ),
]
MemoryWindow = Annotated[
    int | None,
    typer.Option(
        "--memory-window",
        min=0,
        help="The most memory cells the decoder holds: those of the book's latest segments (a multiple of the "
        "slots per segment). The far memory reads no better than none, and the window keeps decoding fast on "
        "long books (docs/memory-vs-window.md); the recall still searches the whole book. 0: every segment's "
        "memory. Default: 1024 (every segment's with --recall-ranking attention).",
    ),
]
GpuLayers = Annotated[int, typer.Option("--n-gpu-layers", help="Layers offloaded to the GPU (CUDA builds).")]
ENCODER_FORMAT_HELP = (
    "Weights of the encoder pass and, with --recall-alone, the recall's prefill (uio_gguf/format/derived.py): "
    "auto (an F16 copy of a quantized model, written once into the cache: llama.cpp's fast CPU kernels, within "
    "fp16 of the weights the head was trained on; a float model as it is), model (the bundle's file as it is), "
    "f16, f32, q8_0, q4_0, q4_1."
)
EncoderFormat = Annotated[str, typer.Option("--encoder-format", help=ENCODER_FORMAT_HELP)]
FlashAttn = Annotated[bool, typer.Option("--flash-attn", help="Use flash attention.")]
Verbose = Annotated[bool, typer.Option("--verbose", help="Show llama.cpp's log.")]

TRAIN_EXTRA_HINT = (
    "the training extra is not installed: pip install 'uio-gguf[train]' (install torch==2.13.0 first on CPU)"
)


def require_training_stack() -> None:
    try:
        import peft  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise UIOError(TRAIN_EXTRA_HINT) from None


def check_n_ctx(n_ctx: int | None, trained: int | None = None, force: bool = False) -> None:
    """--n-ctx between MIN_N_CTX and the model's trained context (unless forced); one line otherwise.
    Without `trained` (before the model is open) only the lower bound is checked."""
    if n_ctx is None:
        return
    if n_ctx < MIN_N_CTX:
        raise UIOError(f"--n-ctx must be a positive number of tokens, at least {MIN_N_CTX}, not {n_ctx}")
    if trained is not None and n_ctx > trained and not force:
        raise UIOError(
            f"--n-ctx {n_ctx} is past this model's trained context ({trained} tokens): positions it never saw, "
            "and a cache that grows with it; add --force-n-ctx to use it anyway"
        )


def check_ratio(bundle: Path | None, ratio: int | None) -> None:
    """--ratio picks a shipped bundle: beside -m it would be ignored without a word, so it is refused."""
    if bundle is not None and ratio is not None:
        raise UIOError(f"--ratio {ratio} picks a shipped bundle, and -m {bundle} brings its own ratio: leave one out")


def open_runtime(
    bundle: Path | None,
    ratio: int | None,
    n_gpu_layers: int,
    flash_attn: bool,
    verbose: bool,
    book: str | None = None,
    n_ctx: int | None = None,
    force_n_ctx: bool = False,
    threads: int | None = None,
    encoder_format: str = "auto",
):
    """The runtime of a bundle, or of the shipped bundle of `ratio`. n_ctx is checked against the model
    (check_n_ctx). With a book, its length is checked here; without -m and --ratio (ratio None), a book
    longer than the default ratio holds gets the finest shipped ratio that holds it, and one line says so."""
    from uio_gguf.format.shipped import default_bundle_path
    from uio_gguf.memory.runtime import UIORuntime

    if threads is not None and threads < 1:
        raise UIOError(f"--threads must be 1 or more, not {threads}")

    def opened(path):
        return UIORuntime(
            path,
            n_gpu_layers=n_gpu_layers,
            flash_attn=flash_attn,
            n_threads=threads or 0,
            verbose=verbose,
            encoder_format=encoder_format,
        )

    check_ratio(bundle, ratio)
    auto = bundle is None and ratio is None
    ratio = DEFAULT_RATIO if ratio is None else ratio
    runtime = opened(bundle if bundle is not None else default_bundle_path(ratio))
    try:
        check_n_ctx(n_ctx, runtime.model.n_ctx_train, force_n_ctx)
    except UIOError:
        runtime.close()
        raise
    if book is not None:
        runtime = _fit_book(runtime, book, n_ctx, ratio if bundle is None else None, auto, opened)
    if runtime.bundle.trained_steps == 0:
        typer.echo(
            "note: this UIO head is untrained (zero LoRA deltas): the memory is the model's own states, "
            "not a trained compression; answers about far-away text will be weak",
            err=True,
        )
    return runtime


def _fit_book(runtime, book: str, n_ctx: int | None, ratio: int | None, auto: bool, opened):
    """runtime if the book fits; else, for a shipped ratio, the finest larger shipped ratio that holds it
    (auto) or an error that names it (an explicit --ratio); else the length error."""
    from uio_gguf.format.bundle import Bundle
    from uio_gguf.format.shipped import default_bundle_path, shipped_bundles
    from uio_gguf.llamacpp.template import document_tokens
    from uio_gguf.memory.runtime import max_book_tokens

    n_tokens = len(document_tokens(runtime.model, book))
    if n_tokens <= runtime.max_tokens(n_ctx):
        return runtime
    hint = ""
    if ratio is not None:
        window = n_ctx or runtime.model.n_ctx_train
        for larger in (r for r in sorted(shipped_bundles()) if r > ratio):
            head = Bundle.open(default_bundle_path(larger), check=False)
            limit = max_book_tokens(window, head.segment, head.slots)
            if n_tokens > limit:  # the longest book any shipped head holds, if none fits
                hint = f"the ratio-{larger} head holds at most {limit}: cut the text to {limit} tokens or less"
                continue
            if not auto:
                hint = f"--ratio {larger} holds up to {limit} tokens"
                break
            typer.echo(
                f"note: the book has {n_tokens:,} tokens, more than ratio {ratio} holds "
                f"({runtime.max_tokens(n_ctx):,}): using the ratio-{larger} head (up to {limit:,})",
                err=True,
            )
            runtime.close()
            return opened(default_bundle_path(larger))
    runtime.check_length(n_tokens, n_ctx, hint)
    return runtime


def progress_bar(desc: str):
    from tqdm import tqdm

    bar = tqdm(total=0, desc=desc, unit="tok", unit_scale=True, leave=False, disable=None)

    def update(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return bar, update


def parse_lengths(text: str, what: str = "--lengths") -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UIOError(f"{what} takes comma separated token counts, not {text!r}") from None
    if not values:
        raise UIOError(f"{what} is empty")
    return values


def parse_depths(text: str) -> list[float]:
    """--depths: where a needle sits, as fractions of the text (checked by the evaluation itself)."""
    try:
        return [float(d) for d in text.split(",") if d.strip()]
    except ValueError:
        raise UIOError(f"--depths takes comma separated fractions between 0 and 1, not {text!r}") from None


def write_json(path: Path | None, report: dict) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=2) + "\n")
        typer.echo(f"json: {path}", err=True)
