"""The three-stage Qwen2 pipeline: stages split by layers, connected by the transport core.

* :mod:`~blazil_ai.pipeline.weights` reads a checkpoint (only one stage's tensors),
* :mod:`~blazil_ai.pipeline.model` runs one stage (its layers, caches, embeddings/head),
* :mod:`~blazil_ai.pipeline.sampling` chooses tokens with Hugging Face ``generate``'s semantics,
* :mod:`~blazil_ai.pipeline.stage` is a stage process, :mod:`~blazil_ai.pipeline.driver` the client
  that starts a local pipeline, checks it and streams generated tokens.
"""
