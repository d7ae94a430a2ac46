"""One stage of a Qwen2 model: a run of decoder layers, with the embeddings and/or the head at the ends.

The stage reuses Hugging Face's own modules (``Qwen2DecoderLayer``, rotary embedding, RMSNorm) and the
same SDPA attention call, so its arithmetic is the arithmetic of ``Qwen2ForCausalLM``. Each sequence
has its own position and its own slot in the stage's KV cache tensors; a decode step runs every
active sequence through one batched forward: one matrix product per projection and one attention
call per layer for the whole batch (each row masked to its own length), which is also what a CUDA
graph captures on a GPU.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.pipeline.packing import mkldnn_bf16, pack_linears
from blazil_ai.pipeline.weights import StageSpec, load_config, load_stage_tensors

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PositionError(BlazilError):
    """A message's position for a sequence does not equal the stage's cache length for it."""


@dataclass(slots=True)
class SequenceCache:
    """Where one sequence's keys and values live: a slot of the stage's :class:`KVSlots`, and how many positions."""

    slot: int
    length: int = 0


class KVSlots:
    """Every sequence's keys and values, one tensor per layer and kind: ``[slots, kv_heads, capacity, head_dim]``.

    A sequence owns one slot (row); its position ``p`` is column ``p``. Decode steps write the new key
    and value of every sequence of a batch with one indexed store and attend with one batched call,
    and nothing is copied as sequences grow. Capacity and slot count double when needed (the tensors
    are then reallocated and :attr:`generation` changes, so CUDA graphs that captured the old ones are
    rebuilt); when the last sequence goes, tensors that grew are given back. Fresh memory is zeroed:
    columns past a sequence's length are masked out of attention, and a masked zero contributes
    exactly nothing, where uninitialised memory could hold NaN.
    """

    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device,
                 slots: int = 4, capacity: int = 256) -> None:
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.slots, self.capacity = 0, 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.generation = 0
        self._initial = (slots, capacity)

    @torch.inference_mode()
    def ensure(self, slots: int, length: int) -> None:
        """Make room for ``slots`` sequences of ``length`` positions (growing by doubling)."""
        if slots <= self.slots and length <= self.capacity:
            return
        new_slots = max(self.slots or self._initial[0], 1)
        while new_slots < slots:
            new_slots *= 2
        new_cap = max(self.capacity or self._initial[1], 1)
        while new_cap < length:
            new_cap *= 2
        shape = (new_slots, self.kv_heads, new_cap, self.head_dim)
        for store in (self.k, self.v):
            for i in range(self.layers):
                t = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    t[:self.slots, :, :self.capacity].copy_(store[i])
                    store[i] = t
                else:
                    store.append(t)
        self.slots, self.capacity = new_slots, new_cap
        self.generation += 1

    def release_if_grown(self) -> None:
        """With no sequence left, give back tensors that grew past the first size.

        The next :meth:`ensure` allocates the first size again. Caches that never grew are kept, so
        ordinary short requests never reallocate (nor, on a GPU, recapture their graphs).
        """
        if self.slots <= self._initial[0] and self.capacity <= self._initial[1]:
            return
        self.k, self.v = [], []
        self.slots, self.capacity = 0, 0
        self.generation += 1
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.inference_mode()
    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst``."""
        for store in (self.k, self.v):
            for t in store:
                t[dst, :, :length].copy_(t[src, :, :length])

    def nbytes(self) -> int:
        """Memory the caches take (from their shape: this is read after every step)."""
        return 2 * len(self.k) * self.slots * self.kv_heads * self.capacity * self.head_dim * self.dtype.itemsize


def resolve_dtype(name: str | None, config: Any) -> torch.dtype:
    """The torch dtype for ``--dtype`` (``auto`` = the checkpoint's ``torch_dtype``/``dtype``)."""
    if name in (None, "auto"):
        name = str(getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or "float32")
        name = name.replace("torch.", "")
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


class StageModel(nn.Module):
    """Layers ``[spec.start, spec.stop)`` of a Qwen2 model plus the embeddings/head where the stage holds them."""

    def __init__(self, config: Any, spec: StageSpec, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu") -> None:
        super().__init__()
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

        cfg = copy.deepcopy(config)
        cfg._attn_implementation = "sdpa"
        layer_types = list(getattr(cfg, "layer_types", None) or ["full_attention"] * cfg.num_hidden_layers)
        cfg.layer_types = layer_types[spec.start:spec.stop]
        cfg.num_hidden_layers = spec.stop - spec.start
        self.config = cfg
        self.spec = spec
        self.dtype_ = dtype
        self.device_ = torch.device(device)
        # Built on the meta device, then given the checkpoint's tensors: no random init, no double memory.
        with torch.device("meta"):
            self.layers = nn.ModuleList(Qwen2DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
            self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size) if spec.is_first else None
            self.norm = Qwen2RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps) if spec.is_last else None
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False) if spec.is_last else None
        self.rotary_emb = Qwen2RotaryEmbedding(cfg).to(self.device_)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.kv = KVSlots(len(self.layers), cfg.num_key_value_heads, head_dim, dtype, self.device_)
        self.caches: dict[str, SequenceCache] = {}
        self._slot_owner: list[str] = []  # the request in each slot; slots [0, len) are in use, none after
        self.graphs: Any = None  # a graphs.DecodeGraphs once enable_decode_graphs(model) ran
        self.packed_linears = 0
        self.eval()

    @classmethod
    def from_checkpoint(cls, model_dir: str | os.PathLike[str], spec: StageSpec, dtype: str | None = "auto",
                        device: str = "cpu") -> StageModel:
        """Build the stage and load only its tensors from the checkpoint in ``model_dir``."""
        config = load_config(model_dir)
        if spec.num_layers != config.num_hidden_layers:
            raise ConfigError(f"stage {spec.stage}: split assumes {spec.num_layers} layers, "
                              f"{model_dir}/config.json has {config.num_hidden_layers}")
        if spec.stop > config.num_hidden_layers:
            raise ConfigError(f"stage {spec.stage}: layers {spec.start}:{spec.stop} exceed the model's "
                              f"{config.num_hidden_layers} layers")
        tdtype = resolve_dtype(dtype, config)
        model = cls(config, spec, tdtype, device)
        tensors = load_stage_tensors(model_dir, spec, config, dtype=tdtype, device=str(device))
        model.load_state_dict(tensors, strict=True, assign=True)
        del tensors  # the modules hold them now; packing frees each plain weight as it goes
        if os.environ.get("BLAZIL_PACK_WEIGHTS", "1") != "0":
            model.pack_linears()
        return model

    def pack_linears(self) -> int:
        """On a CPU in bf16, give each layer's linears their weight in oneDNN's blocked layout, once.

        See :mod:`blazil_ai.pipeline.packing`: a packed kernel is used only for the shapes where it
        gives ``F.linear``'s bits. The LM head stays plain: packing copies a weight, and its copy
        (1 GB for a 7B model) would raise the stage's peak memory by as much. Returns the number of
        linears packed (0 on a GPU, in float32, or where the kernel differs).
        """
        if self.device_.type != "cpu" or self.dtype_ != torch.bfloat16 or not mkldnn_bf16():
            return 0
        self.packed_linears = pack_linears(self.layers, self.spec.stage)
        return self.packed_linears

    # -- caches ---------------------------------------------------------------------------------

    def cache_for(self, rid: str, position: int) -> SequenceCache:
        """The cache of ``rid``, checking that ``position`` equals its length (0 opens a new one)."""
        cache = self.caches.get(rid)
        if cache is None:
            if position != 0:
                raise PositionError(f"stage {self.spec.stage}: request {rid} arrives at position {position} "
                                    "but this stage holds no cache for it")
            cache = self.caches[rid] = SequenceCache(len(self._slot_owner))
            self._slot_owner.append(rid)
        elif cache.length != position:
            raise PositionError(f"stage {self.spec.stage}: request {rid} arrives at position {position}, "
                                f"its cache holds {cache.length} positions")
        return cache

    def drop(self, rid: str) -> bool:
        """Forget a sequence's cache; True if there was one.

        The sequence in the last used slot moves into the freed one, so the slots in use stay
        ``[0, n)`` and a batch of all live sequences reads one contiguous block.
        """
        cache = self.caches.pop(rid, None)
        if cache is None:
            return False
        last = len(self._slot_owner) - 1
        if cache.slot != last:
            moved = self._slot_owner[last]
            other = self.caches[moved]
            self.kv.move(last, cache.slot, other.length)
            other.slot = cache.slot
            self._slot_owner[cache.slot] = moved
        self._slot_owner.pop()
        if not self._slot_owner:  # idle: memory a long or crowded moment needed goes back
            self.kv.release_if_grown()
        return True

    def clear(self) -> None:
        """Forget every sequence."""
        self.caches.clear()
        self._slot_owner.clear()
        self.kv.release_if_grown()

    # -- forward --------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids ``[N]`` -> hidden states ``[N, H]`` (first stage only)."""
        assert self.embed_tokens is not None, "embeddings live in the first stage"
        return self.embed_tokens(ids.to(self.device_))

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Last-position hidden states ``[B, H]`` -> float32 logits ``[B, V]`` (last stage only)."""
        assert self.norm is not None and self.lm_head is not None, "the head lives in the last stage"
        return self.lm_head(self.norm(hidden)).to(torch.float32)

    @torch.inference_mode()
    def forward(self, hidden: torch.Tensor, rids: list[str], positions: list[int], lengths: list[int]) -> torch.Tensor:
        """Run this stage's layers on ragged hidden states ``[sum(lengths), H]``; return the same shape.

        Sequences with one new token each (decode) run as one batch, and so do prompts of one length
        (prefill); a lone prompt runs exactly as a single-sequence forward would.
        """
        caches = [self.cache_for(r, p) for r, p in zip(rids, positions)]
        for r, p, n in zip(rids, positions, lengths):
            if n > 1 and p != 0:
                # SDPA's causal flag aligns top-left; several tokens after a cache would need an explicit mask.
                raise PositionError(f"stage {self.spec.stage}: request {r}: {n} tokens at position {p}; "
                                    "several tokens are accepted only as the prompt (position 0)")
        self.kv.ensure(len(self._slot_owner), max(p + n for p, n in zip(positions, lengths)))
        hidden = hidden.to(self.device_, self.dtype_)
        if all(n == 1 for n in lengths):
            out = self._decode(hidden, caches, positions)
        else:
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            out = torch.empty_like(hidden)
            one = [i for i, n in enumerate(lengths) if n == 1]
            if one:
                rows = torch.tensor([offsets[i] for i in one], device=self.device_)
                out[rows] = self._decode(hidden[rows], [caches[i] for i in one], [positions[i] for i in one])
            prompts: dict[int, list[int]] = {}  # prompts of one length run as one batch
            for i, n in enumerate(lengths):
                if n > 1:
                    prompts.setdefault(n, []).append(i)
            for group in prompts.values():
                x = torch.stack([hidden[offsets[i]:offsets[i + 1]] for i in group])
                y = self._prefill(x, [caches[i] for i in group])
                for j, i in enumerate(group):
                    out[offsets[i]:offsets[i + 1]] = y[j]
        for cache, n in zip(caches, lengths):
            cache.length += n
        return out

    def _prefill(self, x: torch.Tensor, caches: list[SequenceCache]) -> torch.Tensor:
        """Prompts ``[b, n, H]`` at position 0: causal attention over their own keys, which then fill their slots."""
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        bsz, n = x.shape[:2]
        slots = [c.slot for c in caches]
        rows: slice | torch.Tensor = (slice(slots[0], slots[0] + bsz) if slots == list(range(slots[0], slots[0] + bsz))
                                      else torch.tensor(slots, device=self.device_))
        cos, sin = self.rotary_emb(x, torch.arange(n, device=self.device_)[None, :].expand(bsz, n))
        for i, layer in enumerate(self.layers):
            q, k, v = _qkv(layer, x, cos, sin)
            self.kv.k[i][rows, :, :n] = k
            self.kv.v[i][rows, :, :n] = v
            attn: Any = layer.self_attn
            o, _ = sdpa_attention_forward(attn, q, k, v, None, dropout=0.0, scaling=attn.scaling, sliding_window=None)
            x = _out(layer, x, o.reshape(bsz, n, -1).contiguous())
        return x

    def _decode(self, x: torch.Tensor, caches: list[SequenceCache], positions: list[int]) -> torch.Tensor:
        """One new token for each of ``B`` sequences, ``[B, H]`` -> ``[B, H]``."""
        x = x.unsqueeze(1)
        if self.graphs is not None:
            return self.graphs.run(x, caches, positions).squeeze(1)
        bsz, slots, first = len(caches), [c.slot for c in caches], caches[0].slot
        position_ids = torch.tensor(positions, device=self.device_)[:, None]
        cos, sin = self.rotary_emb(x, position_ids)
        attention: _Attention
        if positions.count(positions[0]) == bsz and slots == list(range(first, first + bsz)):
            attention = _Aligned(self.kv, first, bsz, positions[0])
        else:
            attention = _Masked(self.kv, torch.tensor(slots, device=self.device_), position_ids[:, 0],
                                max(positions) + 1)
        return _decode_layers(self, x, cos, sin, attention).squeeze(1)


class _Attention:
    """How a decode step stores each new key/value and attends over the cache (one call per layer)."""

    def __call__(self, index: int, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class _Aligned(_Attention):
    """Every sequence at the same position, in consecutive slots: attend over a view of the cache.

    This is Hugging Face's own decode call (same kernel, same arguments, no mask), so one sequence
    decodes bit for bit as ``Qwen2ForCausalLM`` does.
    """

    def __init__(self, kv: KVSlots, first: int, bsz: int, position: int) -> None:
        self.kv, self.rows, self.position = kv, slice(first, first + bsz), position

    def __call__(self, index: int, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa

        p = self.position
        kc, vc = self.kv.k[index], self.kv.v[index]
        kc[self.rows, :, p:p + 1] = k
        vc[self.rows, :, p:p + 1] = v
        kk, vv = kc[self.rows, :, :p + 1], vc[self.rows, :, :p + 1]
        attn = layer.self_attn
        bsz = q.shape[0]
        if attn.num_key_value_groups == 1 or use_gqa_in_sdpa(None, kk, vv):
            # transformers' SDPA wrapper reduces to this one call for one new token without a mask
            kw = {"enable_gqa": True} if attn.num_key_value_groups > 1 else {}
            o = torch.nn.functional.scaled_dot_product_attention(q, kk, vv, attn_mask=None, dropout_p=0.0,
                                                                 scale=attn.scaling, is_causal=False, **kw)
            o = o.transpose(1, 2)
        else:
            o, _ = sdpa_attention_forward(attn, q, kk, vv, None, dropout=0.0, scaling=attn.scaling,
                                          sliding_window=None)
        return o.reshape(bsz, 1, -1).contiguous()


class _Masked(_Attention):
    """Sequences at any positions in any slots: gather their cache rows, mask each row past its position.

    Grouped-query attention runs without repeating keys: the query heads that share a key/value
    head become that head's query rows, so the attention call is a plain masked one on every
    backend (and inside a CUDA graph). Used for batches of unequal positions and for graphs.
    """

    def __init__(self, kv: KVSlots, slots: torch.Tensor, positions: torch.Tensor, width: int,
                 columns: torch.Tensor | None = None) -> None:
        self.kv, self.slots, self.positions, self.width = kv, slots, positions, width
        if columns is None:
            columns = torch.arange(width, device=positions.device)
        valid = columns[None, :width] <= positions[:, None]
        self.mask = torch.zeros(valid.shape, dtype=kv.dtype, device=positions.device)
        self.mask.masked_fill_(~valid, float("-inf"))
        self.mask = self.mask[:, None, None, :]

    def __call__(self, index: int, layer: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        kc, vc = self.kv.k[index], self.kv.v[index]
        kc[self.slots, :, self.positions] = k[:, :, 0]
        vc[self.slots, :, self.positions] = v[:, :, 0]
        kk = kc[:, :, :self.width].index_select(0, self.slots)
        vv = vc[:, :, :self.width].index_select(0, self.slots)
        bsz, heads, _, hd = q.shape
        qg = q.reshape(bsz, kk.shape[1], heads // kk.shape[1], hd)
        o = torch.nn.functional.scaled_dot_product_attention(qg, kk, vv, attn_mask=self.mask, dropout_p=0.0,
                                                             scale=layer.self_attn.scaling, is_causal=False)
        return o.reshape(bsz, 1, heads * hd)


def _decode_layers(model: StageModel, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   attention: _Attention) -> torch.Tensor:
    """Every layer of the stage for one new token per sequence, ``[B, 1, H]``."""
    for i, layer in enumerate(model.layers):
        q, k, v = _qkv(layer, x, cos, sin)
        x = _out(layer, x, attention(i, layer, q, k, v))
    return x


def _qkv(layer: Any, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Input norm, q/k/v projections and rotary embedding: the part before attention."""
    from transformers.models.qwen2.modeling_qwen2 import apply_rotary_pos_emb

    attn = layer.self_attn
    h = layer.input_layernorm(x)
    shape = (h.shape[0], h.shape[1], -1, attn.head_dim)
    q = attn.q_proj(h).view(shape).transpose(1, 2)
    k = attn.k_proj(h).view(shape).transpose(1, 2)
    v = attn.v_proj(h).view(shape).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    return q, k, v


def _out(layer: Any, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Output projection, residual, post-attention norm, MLP, residual: the part after attention."""
    x = x + layer.self_attn.o_proj(o)
    return x + layer.mlp(layer.post_attention_layernorm(x))
