"""The UIO-LLMs model (docs/design.md §1) over a frozen Hugging Face LLaMA-family causal LM.

encoder : F + LoRA(q, v), input [segment ; k memory slots], step-expansion mask
          -> h_mem[L] = input RMSNorm output at the slot rows, for every layer L
transfer: K_mem = h_mem · (W_K + ΔW_K),  V_mem = h_mem · (W_V + ΔW_V), RoPE at the memory positions
decoder : F unchanged, the memory written in front of the raw window as a KV-cache prefix, optionally
          behind the text's first tokens kept raw at positions 0.. (sinks, llama.cpp's --keep)
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass

import torch
from torch import nn

from uio_gguf.errors import UIOError
from uio_gguf.train.lora import LoRALinear

IGNORE = -100  # a target that scores nothing (cross_entropy's ignore_index), e.g. in train.chat_recall's crops
ENCODER = "encoder"
TRANSFER = "transfer"


@dataclass
class UIOConfig:
    segment: int = 1024  # l: tokens per segment
    ratio: int = 32  # r: compression ratio, k = l / r slots per segment
    rank: int = 32  # LoRA rank of both adapters
    alpha: float = 128.0  # LoRA alpha (scale alpha / rank, 4 as in the paper's 512 / 128)
    distinct_slots: bool = False  # k learned slot embeddings instead of one shared e_mem

    def __post_init__(self):
        if self.segment <= 0 or self.ratio <= 0 or self.segment % self.ratio:
            raise UIOError(f"segment length {self.segment} is not a multiple of the ratio {self.ratio}")

    @property
    def slots(self) -> int:
        return self.segment // self.ratio

    def to_dict(self) -> dict:
        return asdict(self)


def step_expansion_mask(segment: int, ratio: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (l+k, l+k): ordinary tokens causal and blind to the slots; slot i sees the tokens
    j < (i+1)·r and itself, no other slot."""
    slots = segment // ratio
    n = segment + slots
    allowed = torch.zeros(n, n, dtype=torch.bool)
    allowed[:segment, :segment] = torch.ones(segment, segment, dtype=torch.bool).tril()
    for i in range(slots):
        allowed[segment + i, : (i + 1) * ratio] = True
        allowed[segment + i, segment + i] = True
    return _additive(allowed, dtype)


def memory_prefix_mask(n_memory: int, n_raw: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask (n_raw, n_memory + n_raw): all memory visible, raw tokens causal."""
    allowed = torch.ones(n_raw, n_memory + n_raw, dtype=torch.bool)
    allowed[:, n_memory:] = torch.ones(n_raw, n_raw, dtype=torch.bool).tril()
    return _additive(allowed, dtype)


def padded_memory_mask(
    memory_lengths: torch.Tensor, n_memory: int, n_raw: int, dtype: torch.dtype, n_sinks: int = 0
) -> torch.Tensor:
    """Additive mask (B, 1, n_raw, n_sinks + n_memory + n_raw), on memory_lengths' device: row b sees the
    sinks, its first memory_lengths[b] memory rows (the rest is padding) and its raw tokens causally."""
    device = memory_lengths.device
    visible = torch.arange(n_memory, device=device)[None, :] < memory_lengths[:, None]  # (B, n_memory)
    sinks = torch.ones(len(memory_lengths), n_sinks, dtype=torch.bool, device=device)
    visible = torch.cat([sinks, visible], dim=1)  # (B, n_sinks + n_memory)
    causal = torch.ones(n_raw, n_raw, dtype=torch.bool, device=device).tril()
    allowed = torch.cat([visible[:, None, :].expand(-1, n_raw, -1), causal.expand(len(memory_lengths), -1, -1)], dim=2)
    return _additive(allowed, dtype)


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q, kv) -> (1, 1, q, kv), broadcast over batch and heads; (B, q, kv) -> (B, 1, q, kv)."""
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    return mask[None, None] if allowed.dim() == 2 else mask[:, None]


def slot_positions(segment: int, ratio: int) -> torch.Tensor:
    """Position of memory slot i inside its segment's encoder pass: (i+1)·l/k."""
    return torch.arange(1, segment // ratio + 1) * ratio


class UIOModel(nn.Module):
    def __init__(self, base, config: UIOConfig):
        super().__init__()
        from uio_gguf.train.base import check_architecture

        check_architecture(base.config)
        self.base = base
        self.config = config
        base.requires_grad_(False)
        hidden = base.config.hidden_size
        eos = base.config.eos_token_id
        eos = eos[0] if isinstance(eos, (list, tuple)) else eos
        # float32 whatever the base dtype (bf16 on CUDA): AdamW on bf16 weights loses small updates.
        init = base.get_input_embeddings().weight[eos if eos is not None else 0].detach().float()
        n_embeddings = config.slots if config.distinct_slots else 1
        self.memory_embedding = nn.Parameter(init.expand(n_embeddings, hidden).clone())
        for layer in self.layers:
            attn = layer.self_attn
            for name in ("q_proj", "k_proj", "v_proj"):
                setattr(attn, name, LoRALinear(getattr(attn, name)))
            attn.q_proj.add_adapter(ENCODER, config.rank, config.alpha)
            attn.v_proj.add_adapter(ENCODER, config.rank, config.alpha)
            attn.k_proj.add_adapter(TRANSFER, config.rank, config.alpha)
            attn.v_proj.add_adapter(TRANSFER, config.rank, config.alpha)
        # apply_rotary_pos_emb of the model's own modeling module: the exact RoPE the decoder uses.
        self._apply_rope = sys.modules[type(self.layers[0].self_attn).__module__].apply_rotary_pos_emb

    # ----- structure -------------------------------------------------------------------------
    @property
    def layers(self):
        return self.base.model.layers

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_trainable_parameters()]

    def named_trainable_parameters(self):
        yield "memory_embedding", self.memory_embedding
        for name, param in self.base.named_parameters():
            if ".lora_" in name:
                yield name, param

    def _set_encoder_adapter(self, on: bool) -> None:
        for layer in self.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.v_proj):
                if on:
                    proj.active.add(ENCODER)
                else:
                    proj.active.discard(ENCODER)

    # ----- encoder ---------------------------------------------------------------------------
    def encoder_states(self, tokens: torch.Tensor) -> torch.Tensor:
        """Every layer's input-RMSNorm output for [segment ; slots]: (B, n_layers, l + k, d)."""
        cfg = self.config
        batch, length = tokens.shape
        if length != cfg.segment:
            raise ValueError(f"encoder input has {length} tokens, expected the segment length {cfg.segment}")
        embeds = self.base.get_input_embeddings()(tokens)
        slots = self.memory_embedding.to(embeds.dtype).expand(cfg.slots, -1)
        embeds = torch.cat([embeds, slots.unsqueeze(0).expand(batch, -1, -1)], dim=1)
        positions = torch.cat([torch.arange(cfg.segment), slot_positions(cfg.segment, cfg.ratio)])
        positions = positions.to(tokens.device).unsqueeze(0).expand(batch, -1)
        mask = step_expansion_mask(cfg.segment, cfg.ratio, embeds.dtype).to(tokens.device)

        captured: list[torch.Tensor] = []
        hooks = [
            layer.input_layernorm.register_forward_hook(lambda _m, _i, out: captured.append(out))
            for layer in self.layers
        ]
        self._set_encoder_adapter(True)
        try:
            self.base.model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, use_cache=False)
        finally:
            self._set_encoder_adapter(False)
            for hook in hooks:
                hook.remove()
        return torch.stack(captured, dim=1)

    def encode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Memory of each segment in the batch: h_mem, shape (B, n_layers, k, d)."""
        return self.encoder_states(tokens)[:, :, self.config.segment :]

    # ----- transfer head -----------------------------------------------------------------------
    def memory_kv(self, memory: torch.Tensor, first_position: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer (K, V) of the memory rows, K rotated at first_position + 0, 1, ...

        memory: (B, n_layers, M, d). Returns tensors shaped like the cache: (B, n_kv_heads, M, head_dim).
        """
        batch, _, n_mem, _ = memory.shape
        positions = torch.arange(first_position, first_position + n_mem, device=memory.device)
        positions = positions.unsqueeze(0).expand(batch, -1)
        cos, sin = self.base.model.rotary_emb(memory, positions)
        out = []
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            h = memory[:, index]
            k = attn.k_proj.base_layer(h) + attn.k_proj.delta(h, TRANSFER)
            v = attn.v_proj.base_layer(h) + attn.v_proj.delta(h, TRANSFER)
            k = k.view(batch, n_mem, -1, attn.head_dim).transpose(1, 2)
            v = v.view(batch, n_mem, -1, attn.head_dim).transpose(1, 2)
            _, k = self._apply_rope(k, k, cos.to(k.dtype), sin.to(k.dtype))
            out.append((k, v))
        return out

    # ----- decoder -----------------------------------------------------------------------------
    def prefix_cache(self, sinks: torch.Tensor | None, memory_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        """The decoder's cache in front of the raw window, [sinks ; memory]: the sink tokens (B, N)
        decoded by the base model at positions 0..N-1 (no adapter: the decoder is the unchanged model),
        then each layer's memory K/V (memory_kv, rotated at N..) appended after them."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.base.config)
        if sinks is not None and sinks.shape[1]:
            positions = torch.arange(sinks.shape[1], device=sinks.device).expand(sinks.shape[0], -1)
            with torch.no_grad():  # frozen weights over token ids: nothing here has a gradient
                self.base.model(input_ids=sinks, position_ids=positions, cache=cache, use_cache=True)
        for index, (k, v) in enumerate(memory_kv):
            cache.update(k, v, index)
        return cache

    def decode(
        self,
        tokens: torch.Tensor,
        memory: torch.Tensor | None = None,
        memory_lengths: list[int] | None = None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of the raw window `tokens` (B, n) after [sinks ; memory], memory (B, n_layers, M, d).

        sinks: (B, N) the text's first tokens kept raw at positions 0..N-1 in front of the memory
        (llama.cpp's --keep, Session(keep=N)); the memory then sits at N.., the raw window after it.
        memory_lengths: per row, how many of the M memory rows are its memory (the rest is padding it
        does not see; its raw tokens start at that position), so windows with memories of different
        lengths can share one call. Default: all M."""
        n_raw = tokens.shape[1]
        n_sink = 0 if sinks is None else sinks.shape[1]
        n_mem = 0 if memory is None else memory.shape[2]
        cache = self.prefix_cache(sinks, self.memory_kv(memory, first_position=n_sink) if n_mem else [])
        dtype = self.base.get_input_embeddings().weight.dtype
        if memory_lengths is None:
            mask = memory_prefix_mask(n_sink + n_mem, n_raw, dtype).to(tokens.device)
            first = torch.tensor([n_sink + n_mem], device=tokens.device).expand(tokens.shape[0])
        else:
            lengths = torch.as_tensor(memory_lengths, device=tokens.device)
            mask = padded_memory_mask(lengths, n_mem, n_raw, dtype, n_sinks=n_sink)
            first = n_sink + lengths
        positions = first[:, None] + torch.arange(n_raw, device=tokens.device)[None, :]  # (B, n_raw)
        out = self.base(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True)
        return out.logits

    def window_loss(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor,
        memory: torch.Tensor | None,
        sinks: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """J_t: mean next-token loss of a raw window given [sinks ; memory] before it (IGNORE targets,
        e.g. those of a raw window's earlier segments, score nothing)."""
        logits = self.decode(tokens, memory, sinks=sinks)
        return nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE)
