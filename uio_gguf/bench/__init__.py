"""Benchmarks: the runtime next to plain llama.cpp, and the server under load."""
