"""The converter: a UIO checkpoint and its Hugging Face base model -> a bundle that stock llama.cpp loads.

arch.py          per architecture: llama.cpp name, RoPE type, the LLaMA Q/K row permutation
pretokenizer.py  which llama.cpp pre-tokenizer matches the HF tokenizer
tokenizer.py     the tokenizer keys of model.gguf
outtypes.py      output types: gguf-py's own, or llama.cpp's quantizer
base_model.py    model.gguf
adapters.py      the PEFT adapters of the checkpoint, encoder.lora.gguf
head.py          uio.gguf
gguf_save.py     the four steps that write out a GGUFWriter
bundle_writer.py convert_checkpoint(): all of the above, checked and written atomically
"""

from uio_gguf.convert.bundle_writer import convert_checkpoint

__all__ = ["convert_checkpoint"]
