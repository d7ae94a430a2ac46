"""The three-stage Qwen2 pipeline: stages split by layers, connected by the transport core.

* :mod:`~blazil_ai.pipeline.weights` reads a checkpoint (only one stage's tensors),
* :mod:`~blazil_ai.pipeline.sampling` chooses tokens with Hugging Face ``generate``'s semantics,
* :mod:`~blazil_ai.pipeline.model` runs one stage (its layers, caches, embeddings/head), with
  :mod:`~blazil_ai.pipeline.packing` (CPU weight layout) and :mod:`~blazil_ai.pipeline.graphs` (CUDA graphs),
* :mod:`~blazil_ai.pipeline.stage` is a stage process, :mod:`~blazil_ai.pipeline.client` the client that
  talks to a ring of stages and streams generated tokens, :mod:`~blazil_ai.pipeline.launcher` starts a
  local ring of stage processes and stops it.
"""
