"""The pipeline's client and launcher under their former module name, for code that still imports them from
here (``blazil_ai.serving``). New code imports :mod:`blazil_ai.pipeline.client` (the protocol client) and
:mod:`blazil_ai.pipeline.launcher` (the stage processes); this module goes once nothing imports it."""

from blazil_ai.pipeline.client import GenerationResult, PipelineClient, PipelineError, StreamEvent
from blazil_ai.pipeline.launcher import LocalPipeline, StageProcess, free_port, resolve_transport

__all__ = ["GenerationResult", "LocalPipeline", "PipelineClient", "PipelineError", "StageProcess", "StreamEvent",
           "free_port", "resolve_transport"]
