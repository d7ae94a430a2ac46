"""ONNX models: a session over onnxruntime or tract, dynamic batching, and the project's built models.

- :mod:`~blazil_ai.models.session`: :class:`Session` (checked inputs, two engines, same outputs)
- :mod:`~blazil_ai.models.batcher`: :class:`DynamicBatcher` (merge concurrent single-item calls)
- :mod:`~blazil_ai.models.store`: where built models live (``$BLAZIL_HOME/models``)
- one module per model type: ``text``, ``fraud``, ``timeseries``, ``audio``, ``detection``
"""

from blazil_ai.models.batcher import BatcherClosed, DynamicBatcher, session_batcher
from blazil_ai.models.session import BACKENDS, Session, TensorSpec, default_threads, open_session
from blazil_ai.models.store import MODEL_TYPES, blazil_home, model_file, models_dir

__all__ = ["BACKENDS", "MODEL_TYPES", "BatcherClosed", "DynamicBatcher", "Session", "TensorSpec", "blazil_home",
           "default_threads", "model_file", "models_dir", "open_session", "session_batcher"]
