"""Which llama.cpp pre-tokenizer (GGUF key tokenizer.ggml.pre) splits text like a Hugging Face tokenizer.

llama.cpp cannot run the tokenizer.json pipeline; it has a fixed set of named pre-tokenizers. We name
the one whose behaviour matches: each candidate below is rebuilt as a `tokenizers` pre-tokenizer and
run on a probe text next to the model's own; the one that splits the probe identically wins.
"""

from __future__ import annotations

from uio_gguf.errors import UIOError

# Probe: digit runs, contractions in both cases, whitespace runs and line breaks, accents, CJK, emoji.
PROBE = (
    "Hello world! I'M sure you'll like it, we've got 3 cats and 12345 dogs in 2024.\n\n"
    "  Tabs\tand   spaces\r\n... naïve café, 日本語のテキスト 🦙🦙 (x+y)=z; don't STOP'd 3.14159 1,000,000\n"
)

# The splitting regexes of the LLaMA-3 and Qwen2 tokenizers (their tokenizer.json files): they differ
# only in how many digits a number piece may hold.
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _candidates() -> dict:
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    def split_then_bytes(pattern: str):
        return pt.Sequence(
            [pt.Split(Regex(pattern), behavior="isolated"), pt.ByteLevel(add_prefix_space=False, use_regex=False)]
        )

    return {
        # GPT-2's byte-level regex, with every digit its own piece (SmolLM, SmolLM2)
        "smollm": pt.Sequence(
            [pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False, use_regex=True)]
        ),
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        "llama-bpe": split_then_bytes(_LLAMA3_SPLIT),
        "qwen2": split_then_bytes(_QWEN2_SPLIT),
    }


def _pieces(pre_tokenizer) -> list[str]:
    return [piece for piece, _ in pre_tokenizer.pre_tokenize_str(PROBE)]


def detect_pre_tokenizer(tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer of a fast (tokenizers-backed) Hugging Face tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    pre = backend.pre_tokenizer if backend is not None else None
    if pre is None:
        raise UIOError(
            "the base model's tokenizer has no pre-tokenizer that llama.cpp knows (a fast byte-level BPE tokenizer is needed)"
        )
    ours = _pieces(pre)
    for name, candidate in _candidates().items():
        if _pieces(candidate) == ours:
            return name
    raise UIOError(
        f"unknown pre-tokenizer in the base model's tokenizer: it splits text like none of llama.cpp's "
        f"{', '.join(_candidates())} (convert from a GGUF of the base with --base-gguf instead)"
    )
