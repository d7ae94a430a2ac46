"""Inference speed of blazil_ai.models, each figure next to its anchor measured in the same run.

Cases (one JSON line each, medians of interleaved rounds):

- ``wrapper``: ``Session.run`` (input checks + engine) vs raw ``onnxruntime.InferenceSession.run`` on the
  same model and settings, at batch 1 and at larger batches; goal: overhead <= 10 us per call at
  batch 1 and <= 5% at batch >= 64.
- ``threads``: onnxruntime with 1 vs 2 intra-op threads (how the default thread count was chosen).
- ``batcher_async`` (run with ``batcher``): 64 asyncio tasks through the AsyncBatcher vs the same tasks each
  calling ``Session.run`` itself; same goal.
- ``batcher``: 64 concurrent single-item callers through the DynamicBatcher vs the same 64 callers
  each calling ``Session.run`` unbatched; goal: >= 10x throughput.
- ``engines``: onnxruntime vs tract rows/s on each model.

Models are built into a temporary directory from the small sample sets (or read from --models).

    .venv/bin/python benchmarks/inference.py [--quick] [--models DIR] [--cases wrapper,threads,batcher,engines]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from blazil_ai.models.batcher import AsyncBatcher, DynamicBatcher  # noqa: E402
from blazil_ai.models.session import Session, default_threads  # noqa: E402


def timed(fn: Callable[[], Any], seconds: float) -> float:
    """Seconds per call of ``fn``, run repeatedly for about ``seconds``."""
    fn()
    n, t0 = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        el = time.perf_counter() - t0
        if el >= seconds:
            return el / n


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, seconds: float) -> dict[str, float]:
    """Median seconds per call of each function, alternating between them round by round."""
    res: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            res[k].append(timed(fn, seconds))
    return {k: statistics.median(v) for k, v in res.items()}


def emit(case: dict[str, Any]) -> None:
    print(json.dumps(case, sort_keys=True), flush=True)


def build_models(out: Path) -> dict[str, Path]:
    """Build every model type on the small samples (speed does not depend on training quality)."""
    from blazil_ai.datasets.samples import make_samples
    from blazil_ai.models.audio import train_audio_model
    from blazil_ai.models.detection import constructed_yolo_model
    from blazil_ai.models.fraud import train_fraud_model
    from blazil_ai.models.graphs import mlp_model
    from blazil_ai.models.text import build_text_model
    from blazil_ai.models.timeseries import train_forecaster

    s = make_samples(out / "samples", seed=0, small=True)
    m = out / "models"
    return {
        "fraud": train_fraud_model(s["features"], m),
        "timeseries": train_forecaster(s["timeseries"], m),
        "audio": train_audio_model(s["audio"], m),
        "text": build_text_model(m, check_parity=False),
        "detection": constructed_yolo_model(m / "detection.onnx", [(320, 320, 100, 100, 0, 0.9)], 80),
        "mlp": mlp_model(m / "mlp.onnx", 256, [1024, 1024], 16),
        # ~21 MB of weights: a call at batch 1 is bound by reading them, as in larger production models.
        "mlp_large": mlp_model(m / "mlp_large.onnx", 512, [2048, 2048], 16),
    }


def fraud_rows(path: Path, n: int) -> np.ndarray:
    """Feature rows of simulated transactions through the model's own normalisation file.

    Realistic inputs matter here: onnxruntime's fused Gemm+Sigmoid is ~14x slower when random inputs
    drive the logits far out of range (measured: 2.0 ms vs 0.15 ms per 1024 rows), tract is not.
    """
    from blazil_ai.datasets import simulate_transactions
    from blazil_ai.models.fraud import FraudScorer

    return FraudScorer.load(path).features(simulate_transactions(max(n, 1000), seed=7))[:n]


def inputs_for(name: str, session: Session, batch: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Feeds of ``batch`` rows for a model: simulated transactions for fraud, random values otherwise."""
    if name == "fraud":
        return {"features": fraud_rows(session.path, batch)}
    if name == "text":
        ids = rng.integers(1000, 20000, (batch, 16)).astype(np.int64)
        return {"input_ids": ids, "attention_mask": np.ones_like(ids), "token_type_ids": np.zeros_like(ids)}
    feeds = {}
    for spec in session.inputs:
        shape = [batch if not isinstance(d, int) else d for d in spec.shape]
        feeds[spec.name] = rng.normal(size=shape).astype(spec.dtype)
    return feeds


def raw_ort(path: Path, threads: int) -> Any:
    """A plain onnxruntime session with the same settings the wrapper uses (the anchor)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def case_wrapper(models: dict[str, Path], rounds: int, secs: float) -> None:
    rng = np.random.default_rng(0)
    for name, batches in (("fraud", (1, 64, 1024)), ("mlp", (1, 64, 256)), ("timeseries", (1, 64)),
                          ("text", (1, 64))):
        th = default_threads()
        sess, raw = Session(models[name], threads=th), raw_ort(models[name], th)
        for b in batches:
            feeds = inputs_for(name, sess, b, rng)
            r = interleaved({"raw": partial(raw.run, None, feeds), "wrapper": partial(sess.run, feeds)}, rounds, secs)
            emit({"case": "wrapper", "model": name, "batch": b, "threads": th,
                  "raw_ort_us": round(r["raw"] * 1e6, 2), "wrapper_us": round(r["wrapper"] * 1e6, 2),
                  "overhead_us": round((r["wrapper"] - r["raw"]) * 1e6, 2),
                  "ratio": round(r["wrapper"] / r["raw"], 4)})


def case_threads(models: dict[str, Path], rounds: int, secs: float) -> None:
    rng = np.random.default_rng(1)
    for name, b in (("fraud", 4096), ("mlp", 64), ("timeseries", 1024), ("audio", 16), ("text", 32)):
        s1, s2 = Session(models[name], threads=1), Session(models[name], threads=2)
        feeds = inputs_for(name, s1, b, rng)
        r = interleaved({"t1": partial(s1.run, feeds), "t2": partial(s2.run, feeds)}, rounds, secs)
        emit({"case": "threads", "model": name, "batch": b, "rows_per_s_1_thread": round(b / r["t1"], 1),
              "rows_per_s_2_threads": round(b / r["t2"], 1), "ratio_2_over_1": round(r["t1"] / r["t2"], 3),
              "cpus": os.cpu_count()})


def _callers(n_callers: int, per_caller: int, call: Callable[[np.ndarray], Any], rows: np.ndarray) -> float:
    """Items per second when ``n_callers`` threads each make ``per_caller`` single-item calls."""
    start = threading.Barrier(n_callers + 1)
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        start.wait()
        try:
            for i in range(per_caller):
                call(rows[(k * per_caller + i) % len(rows)])
        except BaseException as e:  # surfaced below: a benchmark must not hide failures
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(n_callers)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    el = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return n_callers * per_caller / el


def case_batcher(models: dict[str, Path], rounds: int, per_caller: int, workers: int) -> None:
    rng = np.random.default_rng(2)
    for name in ("mlp_large", "mlp", "fraud", "text"):
        sess = Session(models[name])
        if name == "text":
            ids = rng.integers(1000, 20000, (256, 16)).astype(np.int64)
            rows_all = [{"input_ids": i, "attention_mask": np.ones_like(i), "token_type_ids": np.zeros_like(i)}
                        for i in ids]
        else:
            spec = sess.inputs[0]
            x = inputs_for(name, sess, 256, rng)[spec.name]
            rows_all = [{spec.name: r} for r in x]
        rows = np.array(rows_all, dtype=object)
        n = per_caller if name in ("fraud", "mlp") else max(2, per_caller // 10)
        batcher = DynamicBatcher(sess.run, max_batch=64, max_delay=0.002, name=f"bench_{name}", workers=workers)

        def unbatched(item: dict[str, np.ndarray], sess: Session = sess) -> Any:
            return sess.run({k: v[None] for k, v in item.items()})

        def batched(item: dict[str, np.ndarray], batcher: DynamicBatcher = batcher) -> Any:
            return batcher.infer(item)

        res: dict[str, list[float]] = {"unbatched": [], "batched": []}
        for _ in range(rounds):
            res["unbatched"].append(_callers(64, n, unbatched, rows))
            res["batched"].append(_callers(64, n, batched, rows))
        batcher.close()
        u, b = statistics.median(res["unbatched"]), statistics.median(res["batched"])
        emit({"case": "batcher", "model": name, "callers": 64, "max_batch": 64, "max_delay_ms": 2, "workers": workers,
              "unbatched_items_per_s": round(u, 1), "batched_items_per_s": round(b, 1), "ratio": round(b / u, 2)})


async def _async_callers(n_callers: int, per_caller: int, call: Callable[[Any], Any], rows: np.ndarray) -> float:
    """Items per second when ``n_callers`` coroutines each make ``per_caller`` single-item calls."""

    async def caller(k: int) -> None:
        for i in range(per_caller):
            await call(rows[(k * per_caller + i) % len(rows)])

    t0 = time.perf_counter()
    await asyncio.gather(*(caller(k) for k in range(n_callers)))
    return n_callers * per_caller / (time.perf_counter() - t0)


async def _measure_async(sess: Session, name: str, rounds: int, n: int, rows: np.ndarray) -> dict[str, list[float]]:
    async def unbatched(item: dict[str, np.ndarray]) -> Any:
        return sess.run({k: v[None] for k, v in item.items()})

    res: dict[str, list[float]] = {"unbatched": [], "batched": []}
    async with AsyncBatcher(sess.run, max_batch=64, max_delay=0.002, name=f"bench_async_{name}", offload=False) as b:
        for _ in range(rounds):
            res["unbatched"].append(await _async_callers(64, n, unbatched, rows))
            res["batched"].append(await _async_callers(64, n, b.infer, rows))
    return res


def case_batcher_async(models: dict[str, Path], rounds: int, per_caller: int) -> None:
    """64 asyncio callers: through AsyncBatcher vs each caller running the session itself (no batching)."""
    rng = np.random.default_rng(2)
    for name in ("mlp_large", "mlp", "fraud"):
        sess = Session(models[name])
        spec = sess.inputs[0]
        x = inputs_for(name, sess, 256, rng)[spec.name]
        rows = np.array([{spec.name: r} for r in x], dtype=object)
        n = per_caller if name in ("fraud", "mlp") else max(2, per_caller // 10)

        res = asyncio.run(_measure_async(sess, name, rounds, n, rows))
        u, b = statistics.median(res["unbatched"]), statistics.median(res["batched"])
        emit({"case": "batcher_async", "model": name, "callers": "64 asyncio tasks", "max_batch": 64,
              "max_delay_ms": 2, "offload": False, "anchor": "each task calls Session.run itself",
              "unbatched_items_per_s": round(u, 1), "batched_items_per_s": round(b, 1), "ratio": round(b / u, 2)})


def case_engines(models: dict[str, Path], rounds: int, secs: float) -> None:
    rng = np.random.default_rng(3)
    for name, b in (("fraud", 1024), ("timeseries", 256), ("audio", 16), ("text", 16), ("mlp", 64),
                    ("detection", 1)):
        ort_s = Session(models[name])
        try:
            tract_s = Session(models[name], backend="tract")
        except Exception as e:  # an operator tract lacks: report it instead of a number
            emit({"case": "engines", "model": name, "batch": b, "tract_error": str(e)[:200]})
            continue
        feeds = inputs_for(name, ort_s, b, rng)
        r = interleaved({"ort": partial(ort_s.run, feeds), "tract": partial(tract_s.run, feeds)}, rounds, secs)
        emit({"case": "engines", "model": name, "batch": b, "onnxruntime_rows_per_s": round(b / r["ort"], 1),
              "tract_rows_per_s": round(b / r["tract"], 1), "ratio_tract_over_ort": round(r["ort"] / r["tract"], 3)})


def main() -> int:
    """Run the chosen cases and print one JSON line per case."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", help="directory with built models (default: build into a temp dir)")
    p.add_argument("--cases", default="wrapper,threads,batcher,engines")
    p.add_argument("--quick", action="store_true", help="shorter measurements (noisier)")
    args = p.parse_args()
    rounds, secs, per_caller = (3, 0.15, 20) if args.quick else (5, 0.4, 60)
    with tempfile.TemporaryDirectory() as tmp:
        if args.models:
            d = Path(args.models)
            names = ("fraud", "timeseries", "audio", "text", "detection", "mlp", "mlp_large")
            models = {k: d / f"{k}.onnx" for k in names}
            missing = [k for k, v in models.items() if not v.exists()]
            if missing:
                built = build_models(Path(tmp))
                models.update({k: built[k] for k in missing})
        else:
            models = build_models(Path(tmp))
        emit({"case": "host", "cpus": os.cpu_count(), "default_threads": default_threads(),
              "load_1m": round(os.getloadavg()[0], 2), "rounds": rounds, "seconds_per_measure": secs})
        cases = args.cases.split(",")
        if "wrapper" in cases:
            case_wrapper(models, rounds, secs)
        if "threads" in cases:
            case_threads(models, rounds, secs)
        if "batcher" in cases:
            for workers in sorted({1, min(2, os.cpu_count() or 1)}):
                case_batcher(models, rounds, per_caller, workers)
        if "batcher" in cases:
            case_batcher_async(models, rounds, per_caller)
        if "engines" in cases:
            case_engines(models, rounds, secs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
