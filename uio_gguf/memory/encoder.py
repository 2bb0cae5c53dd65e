"""The encoder pass in llama.cpp: segments -> per-layer memory rows, with the step-expansion mask.

llama.cpp has no custom attention mask, but its masks follow sequence membership (docs/design.md §4): a
row sees the cells that carry the row's FIRST sequence id at a position not later than its own. So,
for a segment of l tokens and k slots (r = l / k tokens per slot), in its own block of k sequences:
  - slot i sits alone in sequence i, at position (i+1)·r: it sees itself and the tokens that carry i;
  - token j carries every sequence i with j < (i+1)·r, the first being j // r, which every earlier
    token carries too: the tokens are causal among themselves and never see a slot.
A batch holds ids or embeddings, not both: one decode for the tokens, one for the slot embeddings;
the native plugin captures attn_norm, Kcur and Vcur of every layer at the slot rows in the second.
Segments are independent (positions restart at 0 per block), so several go into one batch.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

import llama_cpp
import numpy as np

from uio_gguf.handles import Handle
from uio_gguf.llamacpp.api import Batch, Context, ContextSettings, LoraAdapter, Model
from uio_gguf.memory.transfer import TransferHead

LLAMA_MAX_SEQ = 256  # llama.cpp's bound on sequence ids, hence on k × segments per batch


@dataclass
class SegmentMemory:
    """The memory of N segments: K (before RoPE) and V rows per layer, and optionally the h_mem rows."""

    k: np.ndarray  # (N, n_layer, slots, n_embd_k_gqa) float32
    v: np.ndarray  # (N, n_layer, slots, n_embd_v_gqa) float32
    h: np.ndarray | None = None  # (N, n_layer, slots, n_embd)


def step_expansion_layout(
    segment: int, slots: int, first_seq: int
) -> tuple[list[list[int]], np.ndarray, list[list[int]]]:
    """(token sequence lists, slot positions, slot sequence lists) of one segment whose block of
    sequences starts at first_seq."""
    per_slot = segment // slots
    token_seqs = [list(range(first_seq + j // per_slot, first_seq + slots)) for j in range(segment)]
    slot_positions = (np.arange(slots) + 1) * per_slot
    slot_seqs = [[first_seq + i] for i in range(slots)]
    return token_seqs, slot_positions, slot_seqs


class Encoder(Handle):
    def __init__(
        self,
        model: Model,
        bundle,
        plugin,
        segments_per_batch: int = 0,
        flash_attn: bool = False,
        n_threads: int = 0,
        kv_type: int = llama_cpp.GGML_TYPE_F16,
    ):
        from uio_gguf.native.bindings import Capture

        self.model, self.bundle = model, bundle
        self.segment, self.slots = bundle.segment, bundle.slots
        most = max(1, LLAMA_MAX_SEQ // self.slots)
        self.per_batch = min(most, segments_per_batch or 4)
        # Memory is made in what the KV cache holds, and memory files store it as made (transfer.py).
        self.head = TransferHead(bundle, np.float32 if kv_type == llama_cpp.GGML_TYPE_F32 else np.float16)
        self.dk = model.n_head_kv * model.head_dim
        self.dv = self.dk
        rows = self.per_batch * self.slots
        self.capture = Capture(plugin, model.n_layer, model.n_embd, self.dk, self.dv, rows)
        cells = self.per_batch * (self.segment + self.slots)
        settings = ContextSettings(
            n_ctx=-(-cells // 256) * 256,
            n_batch=self.per_batch * self.segment,
            n_ubatch=max(rows, min(self.per_batch * self.segment, 512)),
            n_seq_max=self.per_batch * self.slots,
            flash_attn=flash_attn,
            type_k=kv_type,
            type_v=kv_type,
            n_threads=n_threads,
            cb_eval=self.capture.callback,
            cb_eval_user_data=self.capture.user_data,
        )
        self.ctx = Context(model, settings)
        self.adapter = LoraAdapter(model, bundle.encoder_path)
        self.ctx.set_adapters([self.adapter])
        embedding = np.asarray(bundle.memory_embedding, dtype=np.float32)
        self.slot_embeddings = (
            np.broadcast_to(embedding, (self.slots, embedding.shape[1])) if len(embedding) == 1 else embedding
        )
        self.token_batch = Batch(self.per_batch * self.segment, 0, self.slots)
        self.slot_batch = Batch(rows, model.n_embd, 1)
        # One context, capture and pair of batches: compressions from several threads (the server's
        # conversations, each raw window that fills) take turns.
        self._lock = threading.Lock()

    def close(self) -> None:
        # The context first: its eval callback points into the capture.
        for owned in ("ctx", "token_batch", "slot_batch", "capture"):
            if hasattr(self, owned):
                getattr(self, owned).close()

    def compress(self, segments: np.ndarray, keep_states: bool = False, progress=None) -> SegmentMemory:
        """segments: (N, l) token ids -> their memory. `progress(n_segments_done)` is called per batch."""
        segments = np.asarray(segments, dtype=np.int32).reshape(-1, self.segment)
        parts = []
        with self._lock:
            for start in range(0, len(segments), self.per_batch):
                parts.append(self._compress_batch(segments[start : start + self.per_batch], keep_states))
                if progress is not None:
                    progress(len(parts[-1].k))
        if not parts:
            n = self.model.n_layer
            empty = np.zeros((0, n, self.slots, self.dk), np.float32)
            return SegmentMemory(
                empty,
                empty.copy(),
                np.zeros((0, n, self.slots, self.model.n_embd), np.float32) if keep_states else None,
            )
        return SegmentMemory(
            np.concatenate([p.k for p in parts]),
            np.concatenate([p.v for p in parts]),
            np.concatenate([p.h for p in parts]) if keep_states else None,
        )

    def _compress_batch(self, segments: np.ndarray, keep_states: bool) -> SegmentMemory:
        n_seg, l, k = len(segments), self.segment, self.slots
        token_seqs, token_pos, slot_seqs, slot_pos = [], [], [], []
        for b in range(n_seg):
            t_seqs, s_pos, s_seqs = step_expansion_layout(l, k, b * k)
            token_seqs += t_seqs
            token_pos.append(np.arange(l))
            slot_seqs += s_seqs
            slot_pos.append(s_pos)
        n_tok, n_slot = n_seg * l, n_seg * k
        self.ctx.clear()
        self.capture.disarm()
        self.token_batch.fill(
            np.concatenate(token_pos), token_seqs, [i == n_tok - 1 for i in range(n_tok)], tokens=segments.reshape(-1)
        )
        self.ctx.decode(self.token_batch)
        embeddings = np.tile(self.slot_embeddings, (n_seg, 1))
        self.slot_batch.fill(
            np.concatenate(slot_pos), slot_seqs, [i == n_slot - 1 for i in range(n_slot)], embeddings=embeddings
        )
        self.capture.decode(self.ctx, self.slot_batch, n_slot)
        n_layer = self.model.n_layer
        from uio_gguf.native.bindings import CaptureKind

        rows = self.capture.layers  # (n_layer, n_slot, w)
        h, kcur, vcur = rows(CaptureKind.ATTN_NORM), rows(CaptureKind.KCUR), rows(CaptureKind.VCUR)
        kmem, vmem = self.head.apply(h, kcur, vcur)

        def per_segment(x):  # (n_layer, n_seg·k, w) -> (n_seg, n_layer, k, w)
            return x.reshape(n_layer, n_seg, k, -1).transpose(1, 0, 2, 3).copy()

        return SegmentMemory(per_segment(kmem), per_segment(vmem), per_segment(h) if keep_states else None)
