"""Thin wrappers over llama.cpp's C API (through llama-cpp-python) and the answer's loop guard."""
