"""One stage of a Qwen2 model: a run of decoder layers, with the embeddings and/or the head at the ends.

The stage reuses Hugging Face's own modules (``Qwen2DecoderLayer``, rotary embedding, RMSNorm) and the
same SDPA attention call, so its arithmetic is the arithmetic of ``Qwen2ForCausalLM``. Each sequence
has its own KV cache and position; a decode step runs every active sequence through one batched
forward (one matrix product per projection for the whole batch), and only attention, which reads
each sequence's own cache, runs per sequence.
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from blazil_ai.errors import BlazilError, ConfigError
from blazil_ai.pipeline.weights import StageSpec, load_config, load_stage_tensors

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class PositionError(BlazilError):
    """A message's position for a sequence does not equal the stage's cache length for it."""


@dataclass(slots=True)
class SequenceCache:
    """The keys and values one sequence has seen, one (key, value) pair per local layer."""

    keys: list[torch.Tensor | None]
    values: list[torch.Tensor | None]
    length: int = 0
    meta: dict[str, Any] = field(default_factory=dict)


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
        self.caches: dict[str, SequenceCache] = {}
        self.graphs: DecodeGraphs | None = None
        self.eval()

    def enable_decode_graphs(self, use_graphs: bool | None = None) -> None:
        """Run decode steps through :class:`DecodeGraphs` (CUDA graphs on a GPU; the same pieces eagerly on CPU)."""
        if use_graphs is None:
            use_graphs = self.device_.type == "cuda"
        self.graphs = DecodeGraphs(self, use_graphs)

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
        return model

    # -- caches ---------------------------------------------------------------------------------

    def cache_for(self, rid: str, position: int) -> SequenceCache:
        """The cache of ``rid``, checking that ``position`` equals its length (0 opens a new one)."""
        cache = self.caches.get(rid)
        if cache is None:
            if position != 0:
                raise PositionError(f"stage {self.spec.stage}: request {rid} arrives at position {position} "
                                    "but this stage holds no cache for it")
            n = len(self.layers)
            cache = self.caches[rid] = SequenceCache([None] * n, [None] * n)
        elif cache.length != position:
            raise PositionError(f"stage {self.spec.stage}: request {rid} arrives at position {position}, "
                                f"its cache holds {cache.length} positions")
        return cache

    def drop(self, rid: str) -> bool:
        """Forget a sequence's cache; True if there was one."""
        return self.caches.pop(rid, None) is not None

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

        Sequences with one new token each (decode) run as one batch; a sequence with several tokens
        (prefill) runs on its own, exactly as a single-sequence forward would.
        """
        caches = [self.cache_for(r, p) for r, p in zip(rids, positions)]
        for r, p, n in zip(rids, positions, lengths):
            if n > 1 and p != 0:
                # SDPA's causal flag aligns top-left; several tokens after a cache would need an explicit mask.
                raise PositionError(f"stage {self.spec.stage}: request {r}: {n} tokens at position {p}; "
                                    "several tokens are accepted only as the prompt (position 0)")
        hidden = hidden.to(self.device_, self.dtype_)
        if all(n == 1 for n in lengths):
            if self.graphs is not None:
                out = self.graphs.run(hidden.unsqueeze(1), caches, positions).squeeze(1)
            else:
                out = self._run(hidden.unsqueeze(1), caches, positions).squeeze(1)
        else:
            offsets = [0]
            for n in lengths:
                offsets.append(offsets[-1] + n)
            out = torch.empty_like(hidden)
            one = [i for i, n in enumerate(lengths) if n == 1]
            if one:
                rows = torch.tensor([offsets[i] for i in one], device=self.device_)
                step = self.graphs.run if self.graphs is not None else self._run
                out[rows] = step(hidden[rows].unsqueeze(1), [caches[i] for i in one],
                                      [positions[i] for i in one]).squeeze(1)
            for i, n in enumerate(lengths):
                if n > 1:
                    a, b = offsets[i], offsets[i + 1]
                    out[a:b] = self._run(hidden[a:b].unsqueeze(0), [caches[i]], [positions[i]]).squeeze(0)
        for cache, n in zip(caches, lengths):
            cache.length += n
        return out

    def _run(self, x: torch.Tensor, caches: list[SequenceCache], positions: list[int]) -> torch.Tensor:
        bsz, seq = x.shape[:2]
        position_ids = (torch.tensor(positions, device=self.device_)[:, None]
                        + torch.arange(seq, device=self.device_)[None, :])
        cos, sin = self.rotary_emb(x, position_ids)
        for i, layer in enumerate(self.layers):
            x = _decoder_layer(layer, i, x, cos, sin, caches)
        return x


def _decoder_layer(layer: Any, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   caches: list[SequenceCache]) -> torch.Tensor:
    """``Qwen2DecoderLayer.forward`` with one KV cache per batch row (same operations, same order)."""
    q, k, v = _qkv(layer, x, cos, sin)
    return _out(layer, x, _attend(layer, index, q, k, v, caches))


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


def _attend(layer: Any, index: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            caches: list[SequenceCache]) -> torch.Tensor:
    """Append k/v to each sequence's cache and attend over it; returns ``[B, T, heads * head_dim]``."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward, use_gqa_in_sdpa

    attn = layer.self_attn
    bsz, seq = q.shape[0], q.shape[2]
    groups = attn.num_key_value_groups
    # One new token, no mask: transformers' SDPA wrapper reduces to this one call (same kernel, same
    # arguments); calling it directly saves the wrapper's Python per sequence and layer in decode steps.
    direct = seq == 1 and (groups == 1 or use_gqa_in_sdpa(None, k, v))
    sdpa_kw = {"enable_gqa": True} if groups > 1 else {}
    outs = []
    for b, cache in enumerate(caches):
        kb, vb = (k, v) if bsz == 1 else (k[b:b + 1], v[b:b + 1])
        past_k, past_v = cache.keys[index], cache.values[index]
        if past_k is not None and past_v is not None:
            kb = torch.cat([past_k, kb], dim=-2)
            vb = torch.cat([past_v, vb], dim=-2)
        else:
            # The cache must own its memory: k/v may be a CUDA graph's output buffer, rewritten next step.
            kb, vb = kb.clone(), vb.clone()
        cache.keys[index], cache.values[index] = kb, vb
        qb = q if bsz == 1 else q[b:b + 1]
        if direct:
            o = torch.nn.functional.scaled_dot_product_attention(qb, kb, vb, attn_mask=None, dropout_p=0.0,
                                                                 scale=attn.scaling, is_causal=False, **sdpa_kw)
            o = o.transpose(1, 2).contiguous()
        else:
            o, _ = sdpa_attention_forward(attn, qb, kb, vb, None, dropout=0.0, scaling=attn.scaling,
                                          sliding_window=None)
        outs.append(o)
    o = outs[0] if bsz == 1 else torch.cat(outs)
    return o.reshape(bsz, seq, -1).contiguous()


def _out(layer: Any, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
    """Output projection, residual, post-attention norm, MLP, residual: the part after attention."""
    x = x + layer.self_attn.o_proj(o)
    return x + layer.mlp(layer.post_attention_layernorm(x))


class DecodeGraphs:
    """Decode steps with the dense parts of each layer replayed as CUDA graphs.

    Per batch size, each layer's part before attention and part after it are captured once (the
    output of one is the input of the next, so no copies); attention, which reads each sequence's own
    growing cache, runs between the replays as usual. The same kernels run as in the eager forward,
    so the numbers are the same; only the launch and Python overhead goes. With ``use_graphs=False``
    (CPU) the same pieces run eagerly, which is how the decomposition is tested without a GPU.
    """

    def __init__(self, model: StageModel, use_graphs: bool) -> None:
        self.model = model
        self.use_graphs = use_graphs
        self._sets: dict[int, dict[str, Any]] = {}
        self._pool: Any = torch.cuda.graph_pool_handle() if use_graphs else None
        # One warm-up stream for every capture: each new stream would get its own cuBLAS workspace.
        self._warmup_stream: Any = torch.cuda.Stream() if use_graphs else None

    def _build(self, bsz: int) -> dict[str, Any]:
        m = self.model
        cfg = m.config
        hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        dev, dt = m.device_, m.dtype_
        x0 = torch.zeros(bsz, 1, cfg.hidden_size, device=dev, dtype=dt)
        cos = torch.zeros(bsz, 1, hd, device=dev, dtype=dt)
        sin = torch.zeros(bsz, 1, hd, device=dev, dtype=dt)
        attn_in = [torch.zeros(bsz, 1, cfg.num_attention_heads * hd, device=dev, dtype=dt) for _ in m.layers]
        entry: dict[str, Any] = {"x": x0, "cos": cos, "sin": sin, "attn": attn_in, "a": [], "b": [], "qkv": [],
                                 "outs": []}
        x = x0
        for i, layer in enumerate(m.layers):
            if self.use_graphs:
                qkv = self._capture(lambda layer=layer, x=x: _qkv(layer, x, cos, sin), entry["a"])
                x_next = self._capture(lambda layer=layer, x=x, i=i: _out(layer, x, attn_in[i]), entry["b"])
            else:
                qkv, x_next = None, None
            entry["qkv"].append(qkv)
            entry["outs"].append(x_next)
            x = x_next if x_next is not None else x
        return entry

    def _capture(self, fn: Any, graphs: list[Any]) -> Any:
        stream = self._warmup_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, pool=self._pool):
            out = fn()
        graphs.append(g)
        return out

    def run(self, x: torch.Tensor, caches: list[SequenceCache], positions: list[int]) -> torch.Tensor:
        """One decode step for ``x`` ``[B, 1, H]``; returns ``[B, 1, H]``."""
        m = self.model
        bsz = x.shape[0]
        entry = self._sets.get(bsz)
        if entry is None:
            try:
                entry = self._sets[bsz] = self._build(bsz)
            except RuntimeError as e:  # a capture the GPU or this torch cannot do: stay correct, run eagerly
                log.warning("stage %d: CUDA graph capture failed (%s); decoding eagerly", m.spec.stage, e)
                self.use_graphs = False
                entry = self._sets[bsz] = {}
        position_ids = torch.tensor(positions, device=m.device_)[:, None]
        cos, sin = m.rotary_emb(x, position_ids)
        if not self.use_graphs:
            for i, layer in enumerate(m.layers):
                q, k, v = _qkv(layer, x, cos, sin)
                x = _out(layer, x, _attend(layer, i, q, k, v, caches))
            return x
        entry["x"].copy_(x)
        entry["cos"].copy_(cos)
        entry["sin"].copy_(sin)
        for i, layer in enumerate(m.layers):
            entry["a"][i].replay()
            q, k, v = entry["qkv"][i]
            entry["attn"][i].copy_(_attend(layer, i, q, k, v, caches))
            entry["b"][i].replay()
        return entry["outs"][-1].clone()
