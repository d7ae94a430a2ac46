"""CUDA graph bookkeeping without a GPU: the capture path driven through stand-ins for torch's graph objects.

The stand-ins behave as torch 2.11's do where it matters: a graph keeps its memory pool in use, and a
pool whose graphs were all released cannot be captured into again (the caching allocator's
``use_count > 0`` assertion, seen on an H200). The step itself runs eagerly on the CPU inside the
"capture", so outputs are real; ``replay`` recomputes nothing, so these tests check bookkeeping (which
pool, which graph, on or off), and ``test_pipeline_cuda.py`` checks the numbers on a GPU.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import pytest
import torch

from blazil_ai import metrics
from blazil_ai.pipeline.graphs import GraphCaptureError, enable_decode_graphs
from blazil_ai.pipeline.model import KVSlots, StageModel
from blazil_ai.pipeline.weights import StageSpec, load_config


class FakePool:
    def __init__(self) -> None:
        self.graphs = 0
        self.used = False


class FakeGraph:
    def __init__(self) -> None:
        self.pool: FakePool | None = None
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1

    def __del__(self) -> None:
        if self.pool is not None:
            self.pool.graphs -= 1


class FakeStream:
    def wait_stream(self, other: Any) -> None:
        pass


class Torch211Graphs:
    """``torch.cuda``'s graph API as torch 2.11 behaves on a GPU, minus the GPU."""

    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.pools: list[FakePool] = []
        self.captures = 0

    def graph_pool_handle(self) -> FakePool:
        self.pools.append(FakePool())
        return self.pools[-1]

    @contextlib.contextmanager
    def graph(self, graph: FakeGraph, pool: FakePool | None = None):
        assert pool is not None
        if self.fail:
            raise RuntimeError("CUDA error: operation not permitted when stream is capturing")
        if pool.used and pool.graphs == 0:
            raise RuntimeError('it->second->use_count > 0 INTERNAL ASSERT FAILED at '
                               '"/pytorch/c10/cuda/CUDACachingAllocator.cpp":2799')
        graph.pool, pool.used = pool, True
        pool.graphs += 1
        self.captures += 1
        yield

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(torch.cuda, "graph_pool_handle", self.graph_pool_handle)
        monkeypatch.setattr(torch.cuda, "graph", self.graph)
        monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
        monkeypatch.setattr(torch.cuda, "Stream", FakeStream)
        monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
        monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: FakeStream())


@pytest.fixture
def stage(tiny) -> StageModel:
    n = load_config(tiny).num_hidden_layers
    model = StageModel.from_checkpoint(tiny, StageSpec(2, 2, 4, n))
    kv = model.kv  # a small first size, so a second sequence reallocates the caches
    model.kv = KVSlots(kv.layers, kv.kv_heads, kv.head_dim, kv.dtype, kv.device, slots=1, capacity=4)
    return model


def step(model: StageModel, rids: list[str], positions: list[int]) -> torch.Tensor:
    x = torch.randn(len(rids), model.config.hidden_size, generator=torch.Generator().manual_seed(len(rids)))
    return model.forward(x, rids, positions, [1] * len(rids))


def gauge(stage: int) -> float:
    value = metrics.REGISTRY.get_sample_value("blazil_pipeline_decode_graphs", {"stage": str(stage)})
    assert value is not None
    return value


def test_graphs_stay_on_when_the_caches_move(stage, monkeypatch):
    """Regression: dropping every graph after the KV tensors were reallocated left an empty pool that
    torch 2.11 will not capture into; the stage then fell back to eager decoding for good."""
    fake = Torch211Graphs()
    fake.install(monkeypatch)
    graphs = enable_decode_graphs(stage, use_graphs=True)
    assert gauge(2) == 1
    step(stage, ["a"], [0])  # first capture, into the first pool
    step(stage, ["a"], [1])  # replayed
    generation = stage.kv.generation
    step(stage, ["a", "b"], [2, 0])  # a second slot: the caches are reallocated, old graphs dropped
    assert stage.kv.generation != generation
    step(stage, ["a", "b"], [3, 1])
    for _ in range(3):  # past the first capacity of 4 positions: reallocated again
        step(stage, ["a", "b"], [stage.caches["a"].length, stage.caches["b"].length])
    assert graphs.use_graphs and graphs.failure is None, graphs.failure
    assert fake.captures >= 3 and graphs.pools_taken == len(fake.pools) >= 3
    assert all(p.graphs == 0 for p in fake.pools[:-1]) and fake.pools[-1].graphs == len(graphs._graphs)
    assert any(g["graph"].replays > 1 for g in graphs._graphs.values())  # a step was replayed, not recaptured
    assert gauge(2) == 1


def test_failed_capture_is_loud_and_falls_back(stage, monkeypatch, caplog):
    Torch211Graphs(fail=True).install(monkeypatch)
    graphs = enable_decode_graphs(stage, use_graphs=True)
    with caplog.at_level(logging.ERROR, logger="blazil_ai.pipeline.graphs"):
        out = step(stage, ["a"], [0])
    assert out.shape == (1, stage.config.hidden_size) and torch.isfinite(out).all()
    assert not graphs.use_graphs and "operation not permitted" in (graphs.failure or "")
    assert any(r.levelno == logging.ERROR and "decodes eagerly" in r.getMessage() for r in caplog.records)
    assert gauge(2) == 0


def test_failed_capture_with_graphs_on_fails_instead_of_falling_back(stage, monkeypatch):
    Torch211Graphs(fail=True).install(monkeypatch)
    graphs = enable_decode_graphs(stage, use_graphs=True, strict=True)
    with pytest.raises(GraphCaptureError, match="stage 2: CUDA graph capture failed .*not falling back"):
        graphs.check()
    assert graphs.use_graphs and not stage.caches  # nothing fell back, the scratch sequence is gone
