"""The native uio-gguf plugin: activation capture and KV-cache writes next to llama.cpp (see uio_plugin.h)."""
