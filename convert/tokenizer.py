"""The tokenizer part of model.gguf: vocabulary, token types, merges, pre-tokenizer, special tokens,
chat template.

Two sources: a Hugging Face tokenizer directory (byte-level BPE), or, when the base model itself came
from a GGUF file, that file's own tokenizer keys, copied as they are (nothing is lost in a round trip).
"""

from __future__ import annotations

from pathlib import Path

import gguf

from uio_gguf.convert.pretokenizer import detect_pre_tokenizer
from uio_gguf.errors import UIOError

TOKENIZER_PREFIX = "tokenizer."


def copy_tokenizer_from_gguf(writer: gguf.GGUFWriter, source: Path) -> None:
    """Every tokenizer.* key of an existing GGUF, with its exact value types."""
    reader = gguf.GGUFReader(source)
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        vtype = field.types[0]
        sub_type = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), vtype, sub_type=sub_type)


def write_hf_tokenizer(writer: gguf.GGUFWriter, tokenizer, directory: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer ("gpt2" in llama.cpp) from a Hugging Face directory."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model_type = type(backend.model).__name__ if backend is not None else None
    if model_type != "BPE":
        raise UIOError(
            f"the base model's tokenizer is {model_type or type(tokenizer).__name__}, not byte-level BPE: "
            "convert from a GGUF of the base with --base-gguf instead"
        )
    tokens, types = token_table(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(detect_pre_tokenizer(tokenizer))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=vocab_size)
    # llama.cpp's default for adding BOS depends on the pre-tokenizer; state what the HF tokenizer does.
    special.add_special_token.update(_adds_special_tokens(tokenizer))
    special.add_to_gguf(writer, quiet=True)


def token_table(tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings by id and their llama.cpp types; ids the tokenizer does not use are padding."""
    by_id = {i: token for token, i in tokenizer.get_vocab().items()}
    if max(by_id) >= vocab_size:
        raise UIOError(f"the tokenizer has token id {max(by_id)}, beyond the model's vocabulary of {vocab_size}")
    added = tokenizer.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _adds_special_tokens(tokenizer) -> dict[str, bool]:
    ids = tokenizer("a")["input_ids"]
    return {
        "bos": tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id is not None and ids[-1] == tokenizer.eos_token_id,
    }
