"""Builds the native plugin against the installed llama-cpp-python and loads it.

The shared library is compiled on first use with the system C compiler into a cache directory keyed by
the plugin source, the compile command and the exact libllama it links to, so a new llama-cpp-python
(or a rebuilt one) gets a fresh build. `python -m uio_gguf.native.build` builds it and prints its path.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

from uio_gguf.atomic import atomic_file
from uio_gguf.cache import cache_root
from uio_gguf.errors import UIOError

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "uio_plugin.c", HERE / "uio_plugin.h")
LIB_NAME = "libuio_plugin.so"
CFLAGS = ["-O2", "-std=c11", "-fPIC", "-shared", "-Wall", "-Wextra", "-Wno-unused-parameter"]

_loaded: ctypes.CDLL | None = None


def llama_cpp_paths() -> tuple[Path, Path]:
    """(include dir, library dir) of the installed llama-cpp-python."""
    import llama_cpp

    package = Path(llama_cpp.__file__).resolve().parent
    include, lib = package.parent / "include", package / "lib"
    if not (include / "llama.h").is_file():
        raise UIOError(f"llama-cpp-python installed no headers (no {include / 'llama.h'}): reinstall it from source")
    if not (lib / "libllama.so").is_file():
        raise UIOError(f"llama-cpp-python has no {lib / 'libllama.so'}")
    return include, lib


def cache_dir() -> Path:
    return cache_root() / "native"


def find_compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise UIOError("no C compiler found (install gcc or clang): needed once to build the native plugin")


def compile_command(compiler: str, output: Path) -> list[str]:
    include, lib = llama_cpp_paths()
    # The rpath finds the very libraries llama_cpp loaded (same sonames, so they are not loaded twice).
    return [
        compiler,
        *CFLAGS,
        f"-I{include}",
        str(SOURCES[0]),
        "-o",
        str(output),
        f"-L{lib}",
        "-lllama",
        "-lggml-base",
        f"-Wl,-rpath,{lib}",
    ]


def build_key(compiler: str) -> str:
    """Changes with the plugin source, the compile command and the libllama it links to."""
    import llama_cpp

    digest = hashlib.sha256()
    digest.update(" ".join(compile_command(compiler, Path("OUTPUT"))).encode())
    for source in SOURCES:
        digest.update(source.read_bytes())
    _, lib = llama_cpp_paths()
    libllama = (lib / "libllama.so").resolve()
    stat = libllama.stat()
    digest.update(f"{llama_cpp.__version__}|{libllama}|{stat.st_size}|{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


def first_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if "error" in line.lower():
            return line.strip()
    return lines[0].strip() if lines else "no compiler output"


def build() -> Path:
    """Compiles the plugin unless the cache already holds this exact build; returns the library path."""
    compiler = find_compiler()
    target = cache_dir() / build_key(compiler) / LIB_NAME
    if target.is_file():
        return target
    # atomic: a concurrent build or load never sees half a library
    with atomic_file(target, suffix=".so") as tmp:
        result = subprocess.run(compile_command(compiler, tmp), capture_output=True, text=True)
        if result.returncode != 0:
            raise UIOError(f"building the native plugin failed: {first_error_line(result.stderr)}")
    return target


def load_plugin() -> ctypes.CDLL:
    """The plugin as a ctypes library (built on first use), loaded after libllama."""
    global _loaded
    if _loaded is None:
        import llama_cpp  # noqa: F401  (loads libllama and ggml first: the plugin binds to those copies)

        _loaded = ctypes.CDLL(str(build()))
    return _loaded


def main() -> None:
    try:
        print(build())
    except UIOError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
