"""UIORuntime: the friendly entry point for programs built on llama-cpp-python.

    rt = UIORuntime("bundle_dir")                     # model.gguf + encoder.lora.gguf + uio.gguf
    session = rt.start(book_text)                     # compresses the book (or loads its memory file)
    session.feed(rt.model.tokenize("Question? ...")) ; for piece in session.generate(SamplingParams()): ...

It owns the llama.cpp model, the encoder context (with the encoder LoRA and the capture plugin), the
transfer head and the RoPE settings; each Session owns one decoder context.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from llama_cpp import GGML_TYPE_F16, GGML_TYPE_F32

from uio_gguf.errors import ContextLengthError, UIOError
from uio_gguf.handles import Handle
from uio_gguf.llamacpp.api import Model
from uio_gguf.memory.encoder import Encoder, SegmentMemory
from uio_gguf.memory.recall_states import RecallStates
from uio_gguf.memory.rope import Rope
from uio_gguf.memory.session import Session

ANSWER_RESERVE = 1024  # cells kept free in the decoder for the remainder, the question and the answer


def max_book_tokens(n_ctx: int, segment: int, slots: int) -> int:
    """How many tokens of text fit: memory of full segments + one raw window + the answer reserve must
    stay inside an n_ctx-cell decoder window."""
    free = n_ctx - segment - ANSWER_RESERVE
    return max(0, free // slots) * segment + segment


class UIORuntime(Handle):
    def __init__(
        self,
        bundle=None,
        n_gpu_layers: int = 0,
        flash_attn: bool = False,
        kv_type: str = "f16",
        segments_per_batch: int = 0,
        n_threads: int = 0,
        verbose: bool = False,
        encoder_format: str = "auto",
    ):
        """encoder_format: the weights the encoder pass and the recall's prefill run on
        (uio_gguf/format/derived.py): "auto" (F16 derived from a quantized model: llama.cpp's fast batched
        CPU kernels, within fp16 rounding of the weights the heads were trained on; a float model as it is),
        "model" (the bundle's model file as it is), or a file type, "f16", "f32", "q8_0", "q4_0", "q4_1"
        (the model itself when it already is that type). The decoder's token-by-token steps always run on
        the model file as it is."""
        from uio_gguf.format import derived
        from uio_gguf.format.bundle import Bundle
        from uio_gguf.native.build import load_plugin

        if bundle is None:
            from uio_gguf.format.shipped import default_bundle_path

            bundle = default_bundle_path()
        self.bundle = bundle if not isinstance(bundle, (str, Path)) else Bundle.open(bundle)
        self.plugin = load_plugin()
        self.model = Model(self.bundle.model_path, n_gpu_layers=n_gpu_layers, verbose=verbose)
        # MODEL, or the derived format the encoder runs on (memory made on it is another memory: memory_file.locate)
        self.encoder_format = derived.resolve(self.bundle.model_path, encoder_format)
        self.encoder_weights = derived.label(self.bundle.model_path, encoder_format)  # "q4_1", "f16", ... for reports
        # The model of many-token prompts without the decoder's cache (the encoder's segments, a recall's
        # passages): the decoder's own, or a second copy of the weights in the encoder format.
        self.prefill_model = self.model
        if self.encoder_format != derived.MODEL:
            path = derived.weights_path(self.bundle.model_path, encoder_format, self.bundle.model_digest)
            self.prefill_model = Model(path, n_gpu_layers=n_gpu_layers, verbose=verbose)
        if self.model.n_layer != self.bundle.n_layer:
            raise UIOError(
                f"the UIO head has {self.bundle.n_layer} layers, the model {self.model.n_layer}: not made for each other"
            )
        self.rope = Rope.from_model(self.model, self.bundle.rope_type)
        self.flash_attn, self.n_threads = flash_attn, n_threads
        if kv_type not in ("f16", "f32"):
            raise UIOError(f"--kv-type must be f16 or f32, not {kv_type}")
        self.kv_type = GGML_TYPE_F32 if kv_type == "f32" else GGML_TYPE_F16
        # Segments of one batch attend over each other's cells (masked), so batching multiplies the
        # attention work: it pays on a GPU (parallelism), not on a CPU.
        segments_per_batch = segments_per_batch or (4 if n_gpu_layers else 1)
        self.encoder = Encoder(
            self.prefill_model,
            self.bundle,
            self.plugin,
            segments_per_batch,
            flash_attn,
            n_threads,
            kv_type=self.kv_type,
        )
        self._query_projection = None  # read at the first recall ranked by attention
        self.recall_states = RecallStates()  # recalls its sessions decoded, reused by later questions

    @property
    def segment(self) -> int:
        return self.bundle.segment

    @property
    def slots(self) -> int:
        return self.bundle.slots

    @property
    def kv_cell_bytes(self) -> int:
        """Bytes one cell of a decoder cache holds: K and V of every layer, in the cache's type."""
        m = self.model
        return m.n_layer * 2 * m.n_head_kv * m.head_dim * (4 if self.kv_type == GGML_TYPE_F32 else 2)

    def max_tokens(self, n_ctx: int | None = None) -> int:
        """How many tokens of text fit: memory of full segments + one raw window + the answer reserve
        must stay inside the decoder window (the model's trained context unless n_ctx says otherwise)."""
        return max_book_tokens(n_ctx or self.model.n_ctx_train, self.segment, self.slots)

    def check_length(self, n_tokens: int, n_ctx: int | None = None, hint: str = "") -> None:
        """Raises, naming the longest text that fits and what to do, when n_tokens do not fit.
        hint: a better way out than cutting the text, when the caller knows one (e.g. another bundle)."""
        limit = self.max_tokens(n_ctx)
        if n_tokens > limit:
            raise ContextLengthError(
                f"the text has {n_tokens} tokens; at segment {self.segment} and ratio {self.bundle.ratio} this "
                f"model's {n_ctx or self.model.n_ctx_train}-token window holds at most {limit}: "
                + (hint or f"cut the text to {limit} tokens or less, or split it into parts")
            )

    def compress(self, tokens, progress=None) -> SegmentMemory:
        """The memory of the full segments of `tokens` (the remainder is left out)."""
        tokens = np.asarray(tokens, dtype=np.int32)
        n_full = len(tokens) // self.segment
        return self.encoder.compress(tokens[: n_full * self.segment].reshape(n_full, self.segment), progress=progress)

    def new_session(self, n_ctx: int | None = None, query_rows: int = 0) -> Session:
        """query_rows: see Session (recall ranked by the question's attention over the memory)."""
        n_ctx = n_ctx or self.model.n_ctx_train
        return Session(
            self,
            n_ctx=n_ctx,
            flash_attn=self.flash_attn,
            type_k=self.kv_type,
            type_v=self.kv_type,
            n_threads=self.n_threads,
            query_rows=query_rows,
        )

    def query_projection(self):
        """The decoder's W_q and RoPE (uio_gguf.memory.attention_rank), read from the model file once."""
        if self._query_projection is None:
            from uio_gguf.memory.attention_rank import Projection

            self._query_projection = Projection(self.bundle.model_path, self.model.n_layer, self.rope)
        return self._query_projection

    def close(self) -> None:
        """Frees the encoder and the model; sessions made by this runtime must be closed first."""
        if hasattr(self, "encoder"):
            self.encoder.close()
        if getattr(self, "prefill_model", None) is not None and self.prefill_model is not getattr(self, "model", None):
            self.prefill_model.close()
        if hasattr(self, "model"):
            self.model.close()
