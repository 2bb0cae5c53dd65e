"""uio-gguf: long-context memory for llama.cpp (UIO-LLMs)."""
