"""A thin, owning layer over llama-cpp-python's low-level API: a model, a context, a batch.

Why not `llama_cpp.Llama`: its `eval` deletes KV cells past its own token count, and UIO writes memory
cells that no token produced. Here every call maps to one llama.cpp function, errors become UIOError,
and each handle is freed exactly once.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from pathlib import Path

import llama_cpp
import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.handles import Handle
from uio_gguf.llamacpp.threads import default_threads

_backend_ready = False


def _init_backend(verbose: bool) -> None:
    global _backend_ready
    from llama_cpp import _logger  # installs llama-cpp-python's log callback (quiet unless verbose)

    _logger.set_verbose(verbose)
    if not _backend_ready:
        llama_cpp.llama_backend_init()
        _backend_ready = True


def model_params(n_gpu_layers: int = 0, vocab_only: bool = False):
    """llama.cpp's model parameters as UIO loads every model. Weight repacking into llama.cpp's extra
    CPU buffer types is off: on a CPU with AMX, llama-cpp-python 0.3.36's native build puts the weights
    in the AMX buffer and the first decode crashes (segmentation fault, seen on this project's 2-core
    development machine, also with llama-cpp-python's own Llama class); without repacking, llama.cpp's
    ordinary CPU kernels read the weights as stored."""
    params = llama_cpp.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.vocab_only = vocab_only
    params.use_extra_bufts = False
    return params


def quantize_model(source: str | Path, target: str | Path, ftype: int, n_threads: int = 0) -> None:
    """Writes `source`'s weights in llama.cpp file type `ftype` (a LLAMA_FTYPE_*) to `target`, through
    llama.cpp's own quantizer: quantized tensors are dequantized first (allow_requantize), so F16 or F32
    gives the source's weights as float, rounded to that type."""
    if not _backend_ready:
        _init_backend(False)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    params.nthread = n_threads or default_threads()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), params) != 0:
        raise UIOError(f"llama.cpp could not write {source} as file type {ftype} to {target}")


class Model(Handle):
    """A GGUF loaded by llama.cpp, with the few hyper-parameters UIO needs."""

    def __init__(self, path: str | Path, n_gpu_layers: int = 0, verbose: bool = False, vocab_only: bool = False):
        _init_backend(verbose)
        self.path = Path(path)
        params = model_params(n_gpu_layers, vocab_only)
        self.ptr = llama_cpp.llama_model_load_from_file(str(self.path).encode(), params)
        if not self.ptr:
            raise UIOError(f"llama.cpp could not load {self.path} (not a GGUF model it supports, or damaged)")
        self.vocab = llama_cpp.llama_model_get_vocab(self.ptr)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        if vocab_only:  # no hyper-parameters were loaded: asking for them aborts
            return
        self.n_layer = llama_cpp.llama_model_n_layer(self.ptr)
        self.n_embd = llama_cpp.llama_model_n_embd(self.ptr)
        self.n_head = llama_cpp.llama_model_n_head(self.ptr)
        self.n_head_kv = llama_cpp.llama_model_n_head_kv(self.ptr)
        self.head_dim = self.n_embd // self.n_head
        self.n_ctx_train = llama_cpp.llama_model_n_ctx_train(self.ptr)

    def meta(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(4096)
        n = llama_cpp.llama_model_meta_val_str(self.ptr, key.encode(), buf, len(buf))
        return buf.value.decode("utf-8", "replace") if n >= 0 else None

    def chat_template(self) -> str | None:
        template = llama_cpp.llama_model_chat_template(self.ptr, None)
        return template.decode("utf-8") if template else None

    # ----- tokens ------------------------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool = False, parse_special: bool = True) -> np.ndarray:
        data = text.encode("utf-8")
        capacity = len(data) + 16
        out = (llama_cpp.llama_token * capacity)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, parse_special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            out = (llama_cpp.llama_token * capacity)()
            n = llama_cpp.llama_tokenize(self.vocab, data, len(data), out, capacity, add_special, parse_special)
        return np.ctypeslib.as_array(out)[:n].astype(np.int32)

    def piece(self, token: int) -> bytes:
        buf = ctypes.create_string_buffer(256)
        n = llama_cpp.llama_token_to_piece(self.vocab, int(token), buf, len(buf), 0, False)
        return buf.raw[:n] if n >= 0 else b""

    @property
    def eos(self) -> int:
        return int(llama_cpp.llama_vocab_eos(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, int(token)))

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_model_free(self.ptr)
            self.ptr = None

    __del__ = close


class LoraAdapter:
    """A llama.cpp LoRA adapter file, loaded against a model."""

    def __init__(self, model: Model, path: str | Path):
        self.model = model  # the adapter must not outlive its model
        self.ptr = llama_cpp.llama_adapter_lora_init(model.ptr, str(path).encode())
        if not self.ptr:
            raise UIOError(f"llama.cpp could not load the LoRA adapter {path} (made for another model?)")


@dataclass
class ContextSettings:
    n_ctx: int
    n_batch: int
    n_ubatch: int
    n_seq_max: int = 1
    flash_attn: bool = False
    type_k: int = llama_cpp.GGML_TYPE_F16
    type_v: int = llama_cpp.GGML_TYPE_F16
    n_threads: int = 0  # 0: the CPUs idle at start (uio_gguf.llamacpp.threads)
    cb_eval: object = None  # a ggml_backend_sched_eval_callback (ctypes), or None
    cb_eval_user_data: object = None


class Context(Handle):
    """A llama.cpp context with a unified KV cache (sequences share cells: the step-expansion mask and
    the memory copy between sequences need it)."""

    def __init__(self, model: Model, settings: ContextSettings):
        self.model = model
        self.settings = settings
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = settings.n_ctx
        params.n_batch = settings.n_batch
        params.n_ubatch = settings.n_ubatch
        params.n_seq_max = settings.n_seq_max
        params.kv_unified = True
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED if settings.flash_attn else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        params.type_k = settings.type_k
        params.type_v = settings.type_v
        # llama.cpp's own default is 4 threads, whatever the machine: on 2 CPUs that halves decode speed
        # (SmolLM2 Q4_1, 2 CPUs: 29.9 tokens/s with 4 threads, 50.9 with 2); a busy CPU is left out
        params.n_threads = params.n_threads_batch = settings.n_threads or default_threads()
        if settings.cb_eval is not None:
            params.cb_eval = settings.cb_eval
            params.cb_eval_user_data = settings.cb_eval_user_data
        self.ptr = llama_cpp.llama_init_from_model(model.ptr, params)
        if not self.ptr:
            raise UIOError(f"llama.cpp could not create a context of {settings.n_ctx} tokens (out of memory?)")
        self.memory = llama_cpp.llama_get_memory(self.ptr)
        self.n_ctx = llama_cpp.llama_n_ctx(self.ptr)

    def set_adapters(self, adapters: list[LoraAdapter], scale: float = 1.0) -> None:
        n = len(adapters)
        array = (llama_cpp.llama_adapter_lora_p_ctypes * max(n, 1))(*[a.ptr for a in adapters])
        scales = (ctypes.c_float * max(n, 1))(*([scale] * n))
        if llama_cpp.llama_set_adapters_lora(self.ptr, array if n else None, n, scales if n else None) != 0:
            raise UIOError("llama.cpp refused the LoRA adapter for this context")

    def decode(self, batch: Batch) -> None:
        code = llama_cpp.llama_decode(self.ptr, batch.batch)
        if code != 0:
            reason = {1: "no free KV-cache slot (the context is full)", 2: "aborted"}.get(code, f"error {code}")
            raise UIOError(f"llama_decode failed: {reason}")

    def logits(self, index: int) -> np.ndarray:
        """The logits of the batch row `index` that asked for output (a copy)."""
        ptr = llama_cpp.llama_get_logits_ith(self.ptr, index)
        return np.ctypeslib.as_array(ptr, shape=(self.model.n_vocab,)).copy()

    # ----- KV cache ------------------------------------------------------------------------------
    def seq_rm(self, seq: int, p0: int = -1, p1: int = -1) -> None:
        llama_cpp.llama_memory_seq_rm(self.memory, seq, p0, p1)

    def seq_add(self, seq: int, p0: int, p1: int, delta: int) -> None:
        """Moves the positions of cells in [p0, p1) by delta; K is re-rotated at the next decode."""
        if not llama_cpp.llama_memory_can_shift(self.memory):
            raise UIOError("this model's KV cache cannot shift positions")
        llama_cpp.llama_memory_seq_add(self.memory, seq, p0, p1, delta)

    def seq_cp(self, src: int, dst: int, p0: int = -1, p1: int = -1) -> None:
        """Adds seq dst to the cells of seq src in [p0, p1) (a unified cache shares them, copying nothing)."""
        llama_cpp.llama_memory_seq_cp(self.memory, src, dst, p0, p1)

    def seq_state(self, seq: int) -> ctypes.Array:
        """The cells of one sequence as llama.cpp saves them (positions, K and V of every layer)."""
        size = llama_cpp.llama_state_seq_get_size(self.ptr, seq)
        state = (ctypes.c_uint8 * max(size, 1))()
        if size and llama_cpp.llama_state_seq_get_data(self.ptr, state, size, seq) != size:
            raise UIOError(f"llama.cpp could not save sequence {seq} ({size} bytes)")
        return state

    def set_seq_state(self, state: ctypes.Array | np.ndarray, seq: int) -> None:
        """Replaces sequence seq's cells with a saved state (from any context of the same model and
        cache types; a ctypes byte array or a uint8 numpy array); the cells keep their saved positions."""
        if isinstance(state, np.ndarray):
            state = np.ascontiguousarray(state, dtype=np.uint8)
            size, data = state.nbytes, state.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8))
        else:
            size, data = len(state), state
        if llama_cpp.llama_state_seq_set_data(self.ptr, data, size, seq) != size:
            raise UIOError(f"llama.cpp could not restore {size} bytes into sequence {seq} (context full?)")

    def seq_pos_max(self, seq: int) -> int:
        return llama_cpp.llama_memory_seq_pos_max(self.memory, seq)

    def clear(self) -> None:
        llama_cpp.llama_memory_clear(self.memory, True)

    def close(self) -> None:
        if getattr(self, "ptr", None):
            llama_cpp.llama_free(self.ptr)
            self.ptr = None

    __del__ = close


class Batch(Handle):
    """One llama_batch of either token ids or embeddings, each row with its position, its sequence ids
    (the first one decides what the row sees) and whether it wants output."""

    def __init__(self, capacity: int, embd: int = 0, max_seqs: int = 1):
        self.capacity, self.embd, self.max_seqs = capacity, embd, max_seqs
        self.batch = llama_cpp.llama_batch_init(capacity, embd, max_seqs)
        self.n = 0

    def fill(
        self, positions, seqs: list[list[int]], outputs, tokens=None, embeddings: np.ndarray | None = None
    ) -> None:
        n = len(positions)
        if n > self.capacity:
            raise ValueError(f"batch of {n} rows exceeds its capacity {self.capacity}")
        b = self.batch
        for i in range(n):
            if tokens is not None:
                b.token[i] = int(tokens[i])
            b.pos[i] = int(positions[i])
            ids = seqs[i]
            b.n_seq_id[i] = len(ids)
            for j, s in enumerate(ids):
                b.seq_id[i][j] = s
            b.logits[i] = 1 if outputs[i] else 0
        if embeddings is not None:
            flat = np.ascontiguousarray(embeddings, dtype=np.float32).reshape(-1)
            ctypes.memmove(b.embd, flat.ctypes.data, flat.nbytes)
        b.n_tokens = n
        self.n = n

    def close(self) -> None:
        if getattr(self, "batch", None) is not None:
            llama_cpp.llama_batch_free(self.batch)
            self.batch = None

    __del__ = close
