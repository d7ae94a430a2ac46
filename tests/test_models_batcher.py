"""The dynamic batcher: concurrent single-item callers, merged batches, per-caller results and errors."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from blazil_ai import metrics
from blazil_ai.errors import ConfigError, DataError
from blazil_ai.models.batcher import AsyncBatcher, BatcherClosed, DynamicBatcher, session_batcher
from blazil_ai.models.graphs import mlp_model
from blazil_ai.models.session import Session


@pytest.fixture(scope="module")
def session(tmp_path_factory):
    return Session(mlp_model(tmp_path_factory.mktemp("m") / "mlp.onnx", 8, [16], 3, seed=2))


@pytest.mark.parametrize("workers", [1, 2])
def test_concurrent_callers_get_their_own_rows(session, workers):
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(64, 8)).astype(np.float32)
    expected = session.run(xs)[0]
    results: dict[int, np.ndarray] = {}
    with session_batcher(session, max_batch=16, max_delay=0.05, workers=workers) as b:
        start = threading.Barrier(64)

        def call(i: int) -> None:
            start.wait()
            results[i] = b.infer({"x": xs[i]}, timeout=30)[0]

        threads = [threading.Thread(target=call, args=(i,)) for i in range(64)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(results) == 64
    for i in range(64):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-6)


def test_batches_respect_max_batch_and_merge(session):
    sizes: list[int] = []

    def fn(feeds):
        sizes.append(len(feeds["x"]))
        return session.run(feeds)

    with DynamicBatcher(fn, max_batch=8, max_delay=0.2, name="merge_test") as b:
        futs = [b.submit({"x": np.full(8, i, np.float32)}) for i in range(20)]
        outs = [f.result(timeout=30) for f in futs]
    assert sum(sizes) == 20 and max(sizes) <= 8
    assert len(sizes) < 20  # merged: 20 items took fewer runs than items
    np.testing.assert_allclose(outs[13][0], session.run(np.full((1, 8), 13, np.float32))[0][0], atol=1e-6)


def test_max_delay_bounds_the_wait_of_a_lone_item(session):
    with session_batcher(session, max_batch=64, max_delay=0.01) as b:
        t0 = time.perf_counter()
        b.infer({"x": np.zeros(8, np.float32)}, timeout=30)
        # Generous bound (shared host): the lone item did not wait for 63 more.
        assert time.perf_counter() - t0 < 5.0


def test_a_bad_item_fails_alone(session):
    with session_batcher(session, max_batch=32, max_delay=0.1) as b:
        good = [b.submit({"x": np.ones(8, np.float32)}) for _ in range(5)]
        bad_dtype = b.submit({"x": np.ones(8, np.float64)})
        bad_shape = b.submit({"x": np.ones(5, np.float32)})
        bad_kind = b.submit({"x": [1.0] * 8})  # type: ignore[dict-item]
        more = [b.submit({"x": np.ones(8, np.float32)}) for _ in range(5)]
        for f in good + more:
            assert f.result(timeout=30)[0].shape == (3,)
        with pytest.raises(DataError, match="expected dtype float32, got float64"):
            bad_dtype.result(timeout=30)
        with pytest.raises(DataError, match="axis 1 must be 8"):
            bad_shape.result(timeout=30)
        with pytest.raises(Exception, match="numpy arrays"):
            bad_kind.result(timeout=30)


def test_a_failing_model_function_reaches_every_caller():
    def broken(feeds):
        raise RuntimeError("engine fell over")

    with DynamicBatcher(broken, max_batch=4, max_delay=0.01, name="broken_test") as b:
        futs = [b.submit({"x": np.zeros(2, np.float32)}) for _ in range(6)]
        for f in futs:
            with pytest.raises(RuntimeError, match="engine fell over"):
                f.result(timeout=30)


def test_close_drains_then_refuses(session):
    b = session_batcher(session, max_batch=4, max_delay=1.0, name="close_test")
    futs = [b.submit({"x": np.zeros(8, np.float32)}) for _ in range(3)]
    b.close()
    assert all(f.result(timeout=1)[0].shape == (3,) for f in futs)
    with pytest.raises(BatcherClosed, match="close_test"):
        b.submit({"x": np.zeros(8, np.float32)})


def test_metrics_count_items_and_batch_sizes(session):
    with session_batcher(session, max_batch=4, max_delay=0.05, name="metrics_test") as b:
        for f in [b.submit({"x": np.zeros(8, np.float32)}) for _ in range(10)]:
            f.result(timeout=30)
    text = metrics.render().decode()
    assert 'blazil_models_batcher_items_total{model="metrics_test"} 10.0' in text
    assert 'blazil_models_batch_size_items_count{model="metrics_test"}' in text
    assert 'blazil_models_batcher_queue_items{model="metrics_test"} 0.0' in text


def test_bad_settings():
    with pytest.raises(ConfigError, match="max_batch must be >= 1"):
        DynamicBatcher(lambda f: [], max_batch=0)
    with pytest.raises(ConfigError, match="max_delay must be >= 0"):
        DynamicBatcher(lambda f: [], max_delay=-1)
    with pytest.raises(ConfigError, match="workers must be >= 1"):
        DynamicBatcher(lambda f: [], workers=0)


@pytest.mark.parametrize("offload", [True, False])
def test_async_callers_get_their_own_rows_in_merged_batches(session, offload):
    rng = np.random.default_rng(1)
    xs = rng.normal(size=(100, 8)).astype(np.float32)
    expected = session.run(xs)[0]
    sizes: list[int] = []

    def fn(feeds):
        sizes.append(len(feeds["x"]))
        return session.run(feeds)

    async def main() -> list[np.ndarray]:
        async with AsyncBatcher(fn, max_batch=32, max_delay=0.05, name="async_test", offload=offload) as b:
            outs = await asyncio.gather(*(b.infer({"x": x}) for x in xs))
        return [o[0] for o in outs]

    results = asyncio.run(main())
    for i in range(100):
        np.testing.assert_allclose(results[i], expected[i], atol=1e-6)
    assert sum(sizes) == 100 and max(sizes) <= 32 and len(sizes) < 100


def test_async_bad_item_fails_alone_and_closed_batcher_refuses(session):
    async def main() -> None:
        b = AsyncBatcher(session.run, max_batch=8, max_delay=0.01, name="async_bad")
        good = [b.infer({"x": np.ones(8, np.float32)}) for _ in range(4)]
        bad = b.infer({"x": np.ones(8, np.float64)})
        outs = await asyncio.gather(*good, bad, return_exceptions=True)
        assert all(isinstance(o, list) and o[0].shape == (3,) for o in outs[:4])
        assert isinstance(outs[4], DataError) and "expected dtype float32" in str(outs[4])
        await b.aclose()
        with pytest.raises(BatcherClosed):
            await b.infer({"x": np.ones(8, np.float32)})

    asyncio.run(main())
