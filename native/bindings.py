"""ctypes binding of the native plugin (native/uio_plugin.h) and small numpy-friendly wrappers.

`ctx` arguments are llama_cpp's low-level context pointers (what llama_cpp.llama_init_from_model
returns). Failures raise uio_gguf.errors.UIOError with the plugin's one-line reason.

The plugin is one library per process, so the wrappers find it themselves; they also accept it as a
leading argument (`probe(plugin, ctx, scratch)`, `Capture(plugin, n_layer, ...)`), as the runtime
passes the library that native.build.load_plugin() returned.
"""

from __future__ import annotations

import ctypes
import enum
import functools
from ctypes import POINTER, c_bool, c_char_p, c_float, c_int32, c_size_t, c_uint8, c_void_p

import numpy as np

from uio_gguf.errors import UIOError
from uio_gguf.handles import Handle
from uio_gguf.native.build import load_plugin


class CaptureKind(enum.IntEnum):
    """What a capture holds per layer (mirrors enum uio_capture_kind in uio_plugin.h)."""

    ATTN_NORM = 0  # the attention input (Q/K/V projections' input), width n_embd
    KCUR = 1  # K before RoPE, width n_embd_k_gqa
    VCUR = 2  # V, width n_embd_v_gqa


MAX_LAYERS = 512

_configured: ctypes.CDLL | None = None


class KVLayout(ctypes.Structure):
    """The KV cache layout that uio_kv_probe learns (mirrors uio_kv_layout)."""

    _fields_ = [
        ("n_layer", c_int32),
        ("n_embd_k_gqa", c_int32),
        ("n_embd_v_gqa", c_int32),
        ("v_trans", c_int32),
        ("k_type", c_int32 * MAX_LAYERS),
        ("v_type", c_int32 * MAX_LAYERS),
    ]

    @property
    def k_types(self) -> list[int]:
        return list(self.k_type[: self.n_layer])

    @property
    def v_types(self) -> list[int]:
        return list(self.v_type[: self.n_layer])

    def __repr__(self) -> str:
        return (
            f"KVLayout(n_layer={self.n_layer}, n_embd_k_gqa={self.n_embd_k_gqa}, n_embd_v_gqa={self.n_embd_v_gqa}, "
            f"v_trans={self.v_trans}, k_types={sorted(set(self.k_types))}, v_types={sorted(set(self.v_types))})"
        )


def _declare(lib: ctypes.CDLL, name: str, restype, *argtypes) -> None:
    fn = getattr(lib, name)
    fn.restype = restype
    fn.argtypes = list(argtypes)


def plugin() -> ctypes.CDLL:
    """The loaded plugin with the signature of every function declared."""
    global _configured
    if _configured is None:
        lib = load_plugin()
        _declare(lib, "uio_last_error", c_char_p)
        _declare(lib, "uio_plugin_version", c_int32)
        _declare(lib, "uio_capture_new", c_void_p, c_int32, c_int32, c_int32, c_int32, c_int32)
        _declare(lib, "uio_capture_free", None, c_void_p)
        _declare(lib, "uio_capture_arm", None, c_void_p, c_int32)
        _declare(lib, "uio_capture_disarm", None, c_void_p)
        _declare(lib, "uio_capture_eval_cb", c_bool, c_void_p, c_bool, c_void_p)
        _declare(lib, "uio_capture_status", c_int32, c_void_p)
        _declare(lib, "uio_capture_error_message", c_char_p, c_void_p)
        _declare(lib, "uio_capture_n_rows", c_int32, c_void_p)
        _declare(lib, "uio_capture_rows", POINTER(c_float), c_void_p, c_int32, c_int32)
        _declare(lib, "uio_kv_probe", c_int32, c_void_p, c_int32, POINTER(KVLayout))
        _declare(
            lib,
            "uio_kv_write",
            c_int32,
            c_void_p,
            POINTER(KVLayout),
            c_int32,
            c_int32,
            POINTER(c_int32),
            c_int32,
            POINTER(c_float),
            POINTER(c_float),
        )
        _declare(
            lib,
            "uio_kv_read",
            c_int32,
            c_void_p,
            POINTER(KVLayout),
            c_int32,
            c_int32,
            POINTER(c_int32),
            POINTER(c_float),
            POINTER(c_float),
        )
        _declare(lib, "uio_kv_parse", c_int32, POINTER(c_uint8), c_size_t, POINTER(KVLayout))
        _configured = lib
    return _configured


def _without_plugin(args: tuple) -> tuple:
    """Drops a leading plugin library from positional arguments (see the module docstring)."""
    if args and isinstance(args[0], ctypes.CDLL):
        if args[0] is not load_plugin():
            raise UIOError("a different native plugin library was passed than the one native.build loaded")
        return args[1:]
    return args


def _plugin_optional(function):
    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        return function(*_without_plugin(args), **kwargs)

    return wrapper


def last_error() -> str:
    return plugin().uio_last_error().decode(errors="replace")


def _check(code: int, what: str) -> int:
    if code < 0:
        raise UIOError(f"{what}: {last_error()}")
    return code


def _floats(array: np.ndarray):
    return array.ctypes.data_as(POINTER(c_float))


class Capture(Handle):
    """Captures attn_norm / Kcur / Vcur rows of every layer during one armed llama_decode.

    Give a context `callback` and `user_data` as cb_eval / cb_eval_user_data (or call
    set_capture_callback); the capture must outlive that context."""

    def __init__(self, *args):
        n_layer, n_embd, n_embd_k_gqa, n_embd_v_gqa, max_rows = _without_plugin(args)
        self.widths = (n_embd, n_embd_k_gqa, n_embd_v_gqa)
        self.n_layer = n_layer
        self.max_rows = max_rows
        self._lib = plugin()
        self.ptr = self._lib.uio_capture_new(n_layer, n_embd, n_embd_k_gqa, n_embd_v_gqa, max_rows)
        if not self.ptr:
            raise UIOError(f"cannot allocate a capture: {last_error()}")
        self.callback = eval_callback()

    @property
    def user_data(self) -> int:
        """The cb_eval_user_data to give the context: this capture's C pointer."""
        return self.ptr

    def arm(self, n_rows: int) -> None:
        if not 0 < n_rows <= self.max_rows:
            raise UIOError(f"capture of {n_rows} rows: must be in [1, {self.max_rows}]")
        self._lib.uio_capture_arm(self.ptr, n_rows)

    def disarm(self) -> None:
        self._lib.uio_capture_disarm(self.ptr)

    def status(self) -> int:
        return self._lib.uio_capture_status(self.ptr)

    def error_message(self) -> str:
        return self._lib.uio_capture_error_message(self.ptr).decode(errors="replace")

    def check(self) -> None:
        """Raises UIOError unless the last armed decode captured every layer."""
        if self.status() != 0:
            raise UIOError(f"activation capture failed: {self.error_message()}")

    def decode(self, ctx, batch, n_rows: int) -> None:
        """ctx.decode(batch) with the capture armed for its n_rows tokens; UIOError unless every layer was
        captured. The capture is disarmed again whatever happens."""
        self.arm(n_rows)
        try:
            ctx.decode(batch)
            self.check()
        finally:
            self.disarm()

    def layers(self, kind: int) -> np.ndarray:
        """The captured rows of every layer, (n_layer, n_rows, width), float32."""
        return np.stack([self.rows(kind, layer) for layer in range(self.n_layer)])

    @property
    def n_rows(self) -> int:
        return self._lib.uio_capture_n_rows(self.ptr)

    def rows(self, kind: int, layer: int) -> np.ndarray:
        """A float32 copy [n_rows, width] of one layer's captured rows."""
        if kind not in CaptureKind.__members__.values() or not 0 <= layer < self.n_layer:
            raise UIOError(f"no capture of kind {kind} at layer {layer}")
        pointer = self._lib.uio_capture_rows(self.ptr, kind, layer)
        return np.ctypeslib.as_array(pointer, shape=(self.n_rows, self.widths[kind])).copy()

    def close(self) -> None:
        if self.ptr:
            self._lib.uio_capture_free(self.ptr)
            self.ptr = None

    def __del__(self):
        self.close()


def eval_callback():
    """The plugin's C eval callback as a llama_cpp.ggml_backend_sched_eval_callback (no Python per node)."""
    import llama_cpp

    return ctypes.cast(plugin().uio_capture_eval_cb, llama_cpp.ggml_backend_sched_eval_callback)


def set_capture_callback(params, capture: Capture) -> None:
    """Points llama_context_params.cb_eval at the plugin with this capture as its user data.

    The capture must outlive every context created from these params."""
    params.cb_eval = capture.callback
    params.cb_eval_user_data = capture.user_data


@_plugin_optional
def probe(ctx, scratch_seq: int) -> KVLayout:
    """Learns and verifies the KV cache layout (decodes one token into the empty scratch sequence)."""
    layout = KVLayout()
    _check(plugin().uio_kv_probe(ctx, scratch_seq, ctypes.byref(layout)), "KV cache probe failed")
    return layout


@_plugin_optional
def kv_write(ctx, layout: KVLayout, seq_id: int, scratch_seq: int, positions, k, v) -> None:
    """Writes cells at `positions` into seq_id: k float32 (n_layer, n, n_embd_k_gqa) RoPE'd, v (n_layer, n, n_embd_v_gqa)."""
    positions = np.ascontiguousarray(positions, dtype=np.int32)
    n = positions.shape[0]
    k = np.ascontiguousarray(k, dtype=np.float32)
    v = np.ascontiguousarray(v, dtype=np.float32)
    if (
        positions.ndim != 1
        or k.shape != (layout.n_layer, n, layout.n_embd_k_gqa)
        or v.shape != (layout.n_layer, n, layout.n_embd_v_gqa)
    ):
        raise UIOError(f"kv_write: positions {positions.shape}, k {k.shape}, v {v.shape} do not fit {layout!r}")
    code = plugin().uio_kv_write(
        ctx,
        ctypes.byref(layout),
        seq_id,
        scratch_seq,
        positions.ctypes.data_as(POINTER(c_int32)),
        n,
        _floats(k),
        _floats(v),
    )
    _check(code, "writing memory into the KV cache failed")


@_plugin_optional
def kv_read(ctx, layout: KVLayout, seq_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every cell of seq_id as (positions int32 [n], k float32 (n_layer, n, dk), v float32 (n_layer, n, dv)), cache order."""
    lib = plugin()
    n = _check(lib.uio_kv_read(ctx, ctypes.byref(layout), seq_id, 0, None, None, None), "reading the KV cache failed")
    positions = np.zeros(n, dtype=np.int32)
    k = np.zeros((layout.n_layer, n, layout.n_embd_k_gqa), dtype=np.float32)
    v = np.zeros((layout.n_layer, n, layout.n_embd_v_gqa), dtype=np.float32)
    if n:
        got = lib.uio_kv_read(
            ctx, ctypes.byref(layout), seq_id, n, positions.ctypes.data_as(POINTER(c_int32)), _floats(k), _floats(v)
        )
        _check(got, "reading the KV cache failed")
    return positions, k, v


def parse_state(blob: bytes) -> tuple[KVLayout, int]:
    """Parses a llama_state_seq_get_data blob: (layout, number of cells)."""
    layout = KVLayout()
    buffer = (c_uint8 * max(len(blob), 1)).from_buffer_copy(blob or b"\0")
    n = _check(plugin().uio_kv_parse(buffer, len(blob), ctypes.byref(layout)), "cannot parse the sequence state")
    return layout, n
