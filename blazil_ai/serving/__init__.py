"""Serving text generation: an OpenAI-compatible HTTP server over the three-stage pipeline (``blazil llm serve``)."""
