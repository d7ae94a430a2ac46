"""One ONNX session over two engines: onnxruntime (default) and tract, giving the same outputs.

Inputs are checked by name, dtype and shape before they reach the engine, so a wrong feed fails with
an error naming the model file and the input instead of an engine backtrace.

>>> sess = Session("model.onnx")                      # doctest: +SKIP
>>> (probs,) = sess.run({"features": x})              # doctest: +SKIP
>>> sess_t = Session("model.onnx", backend="tract")   # same outputs within float rounding  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from blazil_ai.errors import ConfigError, DataError

log = logging.getLogger(__name__)

BACKENDS = ("onnxruntime", "tract")

# ONNX TensorProto element types -> numpy dtypes (the ones models here use).
_ONNX_DTYPES: dict[int, np.dtype] = {
    1: np.dtype(np.float32), 2: np.dtype(np.uint8), 3: np.dtype(np.int8), 5: np.dtype(np.int16),
    6: np.dtype(np.int32), 7: np.dtype(np.int64), 9: np.dtype(np.bool_), 10: np.dtype(np.float16),
    11: np.dtype(np.float64), 12: np.dtype(np.uint32), 13: np.dtype(np.uint64),
}
# numpy dtype -> tract fact mnemonic.
_TRACT_TYPES = {"float32": "f32", "float64": "f64", "float16": "f16", "int64": "i64", "int32": "i32",
                "int16": "i16", "int8": "i8", "uint8": "u8", "uint32": "u32", "uint64": "u64", "bool": "bool"}


@dataclass(slots=True, frozen=True)
class TensorSpec:
    """A model input or output: its name, dtype, and shape (an int per fixed axis, a name or None otherwise)."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]

    def describe(self) -> str:
        """Shape and dtype as text, e.g. ``[batch, 16] float32``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"[{dims}] {self.dtype}"


def default_threads() -> int:
    """Intra-op threads for onnxruntime on this host: ``BLAZIL_INTRA_OP_THREADS`` or a measured rule.

    benchmarks/inference.py measures 1 vs 2 threads; on small hosts (<= 2 cores, shared) one thread
    was as fast or faster for the project's models, so small hosts get 1 and larger hosts 1/2 of the
    cores (at most 8): more threads than that only contend with the loader and the other workers.
    """
    env = os.environ.get("BLAZIL_INTRA_OP_THREADS")
    if env:
        try:
            n = int(env)
        except ValueError:
            raise ConfigError(f"BLAZIL_INTRA_OP_THREADS must be an integer, got {env!r}") from None
        if n < 1:
            raise ConfigError(f"BLAZIL_INTRA_OP_THREADS must be >= 1, got {n}")
        return n
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if cores <= 2 else min(8, cores // 2)


def _specs_from_onnx(path: Path) -> tuple[list[TensorSpec], list[TensorSpec], dict[str, str]]:
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, OSError... depending on the fault
        raise DataError(f"not a readable ONNX model: {e}", path=str(path)) from e
    inits = {t.name for t in model.graph.initializer}

    def spec(v: Any) -> TensorSpec:
        t = v.type.tensor_type
        dtype = _ONNX_DTYPES.get(t.elem_type)
        if dtype is None:
            raise DataError(f"input/output {v.name!r} has unsupported element type {t.elem_type}", path=str(path))
        dims: list[int | str | None] = []
        for d in t.shape.dim:
            if d.HasField("dim_value"):
                dims.append(int(d.dim_value))
            elif d.HasField("dim_param"):
                dims.append(d.dim_param)
            else:
                dims.append(None)
        return TensorSpec(v.name, dtype, tuple(dims))

    inputs = [spec(v) for v in model.graph.input if v.name not in inits]
    outputs = [spec(v) for v in model.graph.output]
    meta = {p.key: p.value for p in model.metadata_props}
    return inputs, outputs, meta


@contextmanager
def engine_errors(path: Path, doing: str, kinds: type[BaseException] | tuple[type[BaseException], ...] = Exception
                  ) -> Iterator[None]:
    """The one funnel for engine failures: ``kinds`` raised inside become a one-line DataError naming the model
    file and what was being done (as tract's ``check()`` turns every native error into one exception type)."""
    try:
        yield
    except kinds as e:
        raise DataError(f"{doing}: {tract_message(e)}", path=str(path)) from e


class _OrtEngine:
    def __init__(self, path: Path, threads: int) -> None:
        import onnxruntime as ort

        self.path = path
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        # Spinning worker threads burn a core while idle; on a shared host that steals from the loader.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        with engine_errors(path, "onnxruntime cannot load the model"):
            self.sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.sess.get_outputs()]
        # The private native session on purpose: InferenceSession.run re-validates the names and rebuilds the
        # output list on every call, which the Session's own checks make redundant. Measured with onnxruntime
        # 1.32 (benchmarks/onnxruntime_native.py, five runs on a shared 2-core host): the public run takes 1.16x
        # the native call at batch 1 and at batch 64 (median of the runs' ratios), the same at batch 8189.
        # Where an onnxruntime lacks ``_sess``, the public run.
        native = getattr(self.sess, "_sess", None)
        self._run = (native.run if native is not None and hasattr(native, "run")
                     else lambda names, feeds, options: self.sess.run(names, feeds, options))

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        with engine_errors(self.path, "onnxruntime run failed"):
            return self._run(self.output_names, feeds, None)  # type: ignore[no-any-return]


class _TractEngine:
    """tract needs concrete input facts to optimise; one runnable (and one reused state) per input shape."""

    def __init__(self, path: Path, inputs: list[TensorSpec], cache_size: int) -> None:
        import tract

        self._tract = tract
        self.path = path
        self.inputs = inputs
        self.cache_size = cache_size
        self._cache: OrderedDict[tuple[tuple[int, ...], ...], Any] = OrderedDict()
        self._lock = threading.Lock()
        # Build once with the declared shape (symbolic axes set to 1) so unsupported operators fail at open.
        self._state_for(tuple(tuple(d if isinstance(d, int) else 1 for d in s.shape) for s in inputs))

    def _build(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        with engine_errors(self.path, "tract cannot run this model", self._tract.TractError):
            model = self._tract.onnx().load(str(self.path))
            for i, (spec, shape) in enumerate(zip(self.inputs, shapes)):
                model.set_input_fact(i, ",".join([*map(str, shape), _TRACT_TYPES[spec.dtype.name]]))
            return model.into_model().into_runnable().spawn_state()

    def _state_for(self, shapes: tuple[tuple[int, ...], ...]) -> Any:
        state = self._cache.get(shapes)
        if state is None:
            state = self._build(shapes)
            self._cache[shapes] = state
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(shapes)
        return state

    @property
    def cached_shapes(self) -> list[tuple[tuple[int, ...], ...]]:
        return list(self._cache)

    def run(self, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        arrays = [feeds[n] for n in names]
        shapes = tuple(a.shape for a in arrays)
        # A tract state is mutable: one run at a time per session (several batcher workers take turns).
        with self._lock:
            state = self._state_for(shapes)
            with engine_errors(self.path, "tract run failed", self._tract.TractError):
                return [t.to_numpy() for t in state.run(arrays)]


def tract_message(e: BaseException) -> str:
    """An engine's error text on one line, without tract's native stack backtrace."""
    text = str(e).split("Stack backtrace:")[0]
    return " ".join(line.strip() for line in text.strip().splitlines() if line.strip())


class Session:
    """An ONNX model ready to run on ``backend`` ("onnxruntime" or "tract"), with checked inputs."""

    def __init__(self, path: str | Path, backend: str = "onnxruntime", *, threads: int | None = None,
                 tract_cache_size: int = 16) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ConfigError(f"model file not found: {self.path}")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
        self.backend = backend
        self.inputs, self.outputs, self.metadata = _specs_from_onnx(self.path)
        self.input_names = [s.name for s in self.inputs]
        self.output_names = [s.name for s in self.outputs]
        self._by_name = {s.name: s for s in self.inputs}
        self._n_inputs = len(self.inputs)
        self._plan = [(spec.name, spec.dtype, len(spec.shape),
                       tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)),
                       tuple((i, d) for i, d in enumerate(spec.shape) if isinstance(d, str)))
                      for spec in self.inputs]
        counts: dict[str, int] = {}
        for *_, syms in self._plan:
            for _, sym in syms:
                counts[sym] = counts.get(sym, 0) + 1
        self._shared_symbols = any(c > 1 for c in counts.values())
        self.threads = threads if threads is not None else default_threads()
        self._engine: _OrtEngine | _TractEngine
        if backend == "onnxruntime":
            self._engine = _OrtEngine(self.path, self.threads)
        else:
            self._engine = _TractEngine(self.path, self.inputs, tract_cache_size)
        log.debug("opened %s with %s (%d intra-op threads)", self.path, backend, self.threads)

    @property
    def info(self) -> dict[str, Any]:
        """The project's metadata stored in the model (``blazil`` JSON property), or {}."""
        raw = self.metadata.get("blazil")
        return json.loads(raw) if raw else {}

    def _fault(self, feeds: Mapping[str, Any]) -> DataError | None:
        """The one validator: the first way ``feeds`` does not fit the model's inputs, as the error to raise
        (naming the model and the input), or None. The per-call path is a few compares per input and no
        allocation; words are put together only for a fault."""
        if len(feeds) != self._n_inputs:
            return self._names_fault(feeds)
        symbols: dict[str, tuple[int, str]] | None = {} if self._shared_symbols else None
        for spec, (name, dtype, rank, fixed, syms) in zip(self.inputs, self._plan):
            a = feeds.get(name)
            if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != rank:
                return self._input_fault(spec, a) if name in feeds else self._names_fault(feeds)
            shape = a.shape
            for axis, size in fixed:
                if shape[axis] != size:
                    return self._error(spec, f"axis {axis} must be {size} {spec.describe()}, got shape {list(shape)}")
            if symbols is not None:
                for axis, sym in syms:
                    seen = symbols.setdefault(sym, (shape[axis], name))
                    if seen[0] != shape[axis]:
                        return self._error(spec, f"axis {axis} ({sym}) is {shape[axis]} but input {seen[1]!r} has "
                                                 f"{sym}={seen[0]}")
        return None

    def _error(self, spec: TensorSpec, message: str) -> DataError:
        return DataError(message, path=str(self.path), field=spec.name)

    def _names_fault(self, feeds: Mapping[str, Any]) -> DataError:
        missing = [n for n in self.input_names if n not in feeds]
        unknown = [n for n in feeds if n not in self._by_name]
        parts = []
        if missing:
            parts.append(f"missing input(s) {', '.join(map(repr, missing))}")
        if unknown:
            parts.append(f"unknown input(s) {', '.join(map(repr, unknown))}")
        expected = ", ".join(f"{s.name} {s.describe()}" for s in self.inputs)
        return DataError(f"{'; '.join(parts)}; the model takes: {expected}", path=str(self.path),
                         field=(missing or unknown)[0])

    def _input_fault(self, spec: TensorSpec, a: Any) -> DataError:
        if not isinstance(a, np.ndarray):
            return self._error(spec, f"expected a numpy array, got {type(a).__name__}")
        if a.dtype != spec.dtype:
            return self._error(spec, f"expected dtype {spec.dtype}, got {a.dtype} (shape {list(a.shape)})")
        return self._error(spec, f"expected rank {len(spec.shape)} {spec.describe()}, got shape {list(a.shape)}")

    def check(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Validate ``feeds`` against the model's inputs; raise DataError naming the model and input."""
        fault = self._fault(feeds)
        if fault is not None:
            raise fault
        return feeds if isinstance(feeds, dict) else dict(feeds)

    def run(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> list[np.ndarray]:
        """Run the model; ``feeds`` is a name->array mapping, a list in input order, or one array."""
        if type(feeds) is not dict:
            feeds = self._as_mapping(feeds)
        return self._engine.run(self.input_names, self.check(feeds))

    def _as_mapping(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray
                    ) -> Mapping[str, np.ndarray]:
        if isinstance(feeds, np.ndarray):
            if len(self.inputs) != 1:
                raise DataError(f"got one array but the model takes {len(self.inputs)} inputs "
                                f"({', '.join(self.input_names)}); pass a dict", path=str(self.path))
            return {self.input_names[0]: feeds}
        if isinstance(feeds, Mapping):
            return feeds
        if len(feeds) != len(self.inputs):
            raise DataError(f"got {len(feeds)} arrays but the model takes {len(self.inputs)} inputs "
                            f"({', '.join(self.input_names)})", path=str(self.path))
        return dict(zip(self.input_names, feeds))

    def run_dict(self, feeds: Mapping[str, np.ndarray] | Sequence[np.ndarray] | np.ndarray) -> dict[str, np.ndarray]:
        """Like :meth:`run`, with outputs keyed by name."""
        return dict(zip(self.output_names, self.run(feeds)))

    __call__ = run

    def __repr__(self) -> str:
        return f"Session({str(self.path)!r}, backend={self.backend!r})"


def open_session(path: str | Path, backend: str = "onnxruntime", **kw: Any) -> Session:
    """Open ``path`` on ``backend`` (see :class:`Session`)."""
    return Session(path, backend, **kw)
