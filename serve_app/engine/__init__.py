"""Plain-Python generation engine (torch + transformers, no Ray)."""

from serve_app.engine.types import GenerationRequest, SamplingParams, SequenceOutput

__all__ = ["GenerationRequest", "SamplingParams", "SequenceOutput"]
