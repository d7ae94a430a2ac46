"""Whole decode steps of a stage replayed as CUDA graphs, one graph per (batch size, attention width).

A graph holds every layer of the stage: projections, the indexed store of each new key/value into
the stage's :class:`~blazil_ai.pipeline.model.KVSlots`, masked attention over the first ``width``
positions of the batch's slots, and the MLP. Its inputs (hidden states, and positions with slots
as one small tensor) are copied into static buffers before each replay; the rotary embedding is
computed inside the graph. Widths are powers of two from
:attr:`DecodeGraphs.MIN_WIDTH`, so a graph serves many steps and attention reads at most twice the
cache it needs. With ``use_graphs=False`` (CPU) the same step runs eagerly, which is how the
captured code is tested without a GPU.

Graphs are captured into one memory pool. When the KV tensors are reallocated, the graphs that
captured the old ones are dropped, and so is their pool: on torch 2.11 a pool whose graphs were all
released cannot be captured into again (``use_count > 0`` assertion in the caching allocator), so a
fresh pool handle is taken with the fresh graphs.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from blazil_ai import metrics
from blazil_ai.errors import BlazilError
from blazil_ai.pipeline.model import SequenceCache, StageModel, _decode_layers, _Masked

log = logging.getLogger(__name__)

_graphs_on = metrics.gauge("pipeline", "decode", "graphs",
                           "1 while the stage replays decode steps as CUDA graphs, 0 when it decodes eagerly",
                           ["stage"])
_captures = metrics.counter("pipeline", "graph_captures", "total", "CUDA graphs captured (decode steps)",
                            ["stage", "outcome"])


class GraphCaptureError(BlazilError):
    """CUDA graph decoding was asked for (``--decode-graphs on``) and a capture failed."""


class DecodeGraphs:
    """A stage's decode steps, through CUDA graphs where it can (see the module's docstring).

    ``strict=True`` (``--decode-graphs on``) turns a failed capture into :class:`GraphCaptureError`;
    otherwise a failed capture is logged as an ERROR naming the cause, the stage's
    ``blazil_pipeline_decode_graphs`` gauge drops to 0, and the stage decodes eagerly from then on.
    """

    MIN_WIDTH = 256

    def __init__(self, model: StageModel, use_graphs: bool, strict: bool = False) -> None:
        self.model = model
        self.use_graphs = use_graphs
        self.strict = strict
        self.failure: str | None = None  # why graphs were turned off, if they were
        self.pools_taken = 0
        self._graphs: dict[tuple[int, int], dict[str, Any]] = {}
        self._generation = -1
        self._columns: torch.Tensor | None = None
        self._pinned: dict[int, torch.Tensor] = {}
        self._pool: Any = self._new_pool() if use_graphs else None
        # One warm-up stream for every capture: each new stream would get its own cuBLAS workspace.
        self._warmup_stream: Any = torch.cuda.Stream() if use_graphs else None
        self._label = str(model.spec.stage)
        _graphs_on.labels(self._label).set(1 if use_graphs else 0)

    def _new_pool(self) -> Any:
        self.pools_taken += 1
        return torch.cuda.graph_pool_handle()

    def width_for(self, length: int) -> int:
        """The attention width a step needs when its longest sequence has ``length`` positions."""
        width = self.MIN_WIDTH
        while width < length:
            width *= 2
        return min(width, self.model.kv.capacity)

    def _drop_graphs(self) -> None:
        """Forget every graph (they captured KV tensors that are gone) and the pool they lived in."""
        had = bool(self._graphs)
        self._graphs.clear()
        if self.use_graphs and had:
            self._pool = self._new_pool()

    def run(self, x: torch.Tensor, caches: list[SequenceCache], positions: list[int]) -> torch.Tensor:
        """One decode step for ``x`` ``[B, 1, H]``; returns ``[B, 1, H]``."""
        m = self.model
        bsz = x.shape[0]
        width = self.width_for(max(positions) + 1)
        if m.kv.generation != self._generation:  # the caches were reallocated: graphs hold the old ones
            self._drop_graphs()
            self._generation = m.kv.generation
            self._columns = torch.arange(m.kv.capacity, device=m.device_)
        index = self._index(positions, [c.slot for c in caches])
        if not self.use_graphs:
            return self._step(x, index, width)
        g = self._graphs.get((bsz, width))
        if g is None:
            try:
                g = self._graphs[(bsz, width)] = self._capture({"x": x, "index": index}, width)
            except RuntimeError as e:  # a capture the GPU or this torch cannot do
                _captures.labels(self._label, "failed").inc()
                self._graphs.pop((bsz, width), None)
                cause = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                if self.strict:
                    raise GraphCaptureError(f"stage {m.spec.stage}: CUDA graph capture failed for batch {bsz}, "
                                            f"width {width}: {cause} (--decode-graphs on: not falling back)") from e
                self.failure = cause
                log.error("stage %d: CUDA graph capture failed for batch %d, width %d (%s); this stage now "
                          "decodes eagerly (slower), see blazil_pipeline_decode_graphs", m.spec.stage, bsz, width,
                          cause)
                self.use_graphs = False
                _graphs_on.labels(self._label).set(0)
                self._graphs.clear()
                return self.run(x, caches, positions)
            _captures.labels(self._label, "ok").inc()
            return g["out"].clone()  # capturing ran and replayed this very step
        g["x"].copy_(x)
        g["index"].copy_(index, non_blocking=True)
        g["graph"].replay()
        return g["out"].clone()

    def _index(self, positions: list[int], slots: list[int]) -> torch.Tensor:
        """Positions (row 0) and slots (row 1) of a step as one int64 tensor, so they cross to a GPU in one copy.

        On a GPU the tensor is a pinned host buffer kept per batch size (the copy from it is
        asynchronous; the buffer is rewritten only after the step's result was waited for).
        """
        rows = torch.tensor([positions, slots], dtype=torch.long)
        if not self.use_graphs:
            return rows.to(self.model.device_)
        host = self._pinned.get(len(slots))
        if host is None:
            host = self._pinned[len(slots)] = torch.empty_like(rows).pin_memory() if torch.cuda.is_available() else rows
        host.copy_(rows)
        return host

    def _step(self, x: torch.Tensor, index: torch.Tensor, width: int) -> torch.Tensor:
        """The decode step a graph captures: rotary embedding, every layer with masked attention."""
        m = self.model
        positions, slots = index[0], index[1]
        cos, sin = m.rotary_emb(x, positions[:, None])
        return _decode_layers(m, x, cos, sin, _Masked(m.kv, slots, positions, width, self._columns))

    def _capture(self, inputs: dict[str, torch.Tensor], width: int) -> dict[str, Any]:
        g: dict[str, Any] = {name: t.to(self.model.device_, copy=True) for name, t in inputs.items()}

        def step() -> torch.Tensor:
            return self._step(g["x"], g["index"], width)

        # The warm-up runs are this step for real (the same keys/values land in the same places each
        # time), so capturing never writes anything wrong into a live sequence's cache.
        stream = self._warmup_stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            g["out"] = step()
        g["graph"] = graph
        graph.replay()
        return g

    def check(self) -> None:
        """Capture and replay one decode step now, on a scratch sequence (raises what the capture raised).

        A stage started with ``--decode-graphs on`` calls this before it listens, so a GPU or torch
        that cannot capture fails the stage at start-up rather than a request later.
        """
        m = self.model
        rid = "\0graph-check"
        cache = m.cache_for(rid, 0)
        try:
            m.kv.ensure(len(m.caches), 1)
            self.run(torch.zeros(1, 1, m.config.hidden_size, dtype=m.dtype_, device=m.device_), [cache], [0])
        finally:
            m.drop(rid)


def enable_decode_graphs(model: StageModel, use_graphs: bool | None = None, strict: bool = False) -> DecodeGraphs:
    """Run ``model``'s decode steps through :class:`DecodeGraphs` (CUDA graphs on a GPU, eagerly on a CPU)."""
    if use_graphs is None:
        use_graphs = model.device_.type == "cuda"
    model.graphs = DecodeGraphs(model, use_graphs, strict=strict)
    return model.graphs
