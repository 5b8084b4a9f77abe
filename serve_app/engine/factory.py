"""The one front door for building an engine, and for what the ingress needs to know of it.

The replica calls `build_engine`; the ingress calls `serving_limits` for the
tokenizer and context length, so both agree on the limits without importing
loading internals.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoConfig

from serve_app.config import ModelServingArgs
from serve_app.engine.async_engine import AsyncEngine
from serve_app.engine.batch_engine import BatchEngine
from serve_app.engine.builtin_models import resolve_model_path
from serve_app.engine.engine_config import EngineConfig
from serve_app.engine.loading import context_length, eos_token_ids, load_model, load_tokenizer, model_dtype

logger = logging.getLogger(__name__)


def max_model_len_for(args: ModelServingArgs, model_config, tokenizer) -> int:
    """The context a request may use: the model's (or the override), within the KV cache."""
    length = context_length(model_config, tokenizer, args.max_model_len)
    return min(length, args.kv_cache_tokens) if args.kv_cache_tokens else length


def engine_config(args: ModelServingArgs, device_type: str, max_model_len: int) -> EngineConfig:
    """The engine's settings from the app's (the only place they are translated)."""
    return EngineConfig(
        max_num_seqs=args.max_batch_size,
        max_model_len=max_model_len,
        max_num_batched_tokens=args.step_token_budget(device_type),
        kv_cache_tokens=args.kv_tokens(max_model_len),
        step_time_target_s=args.step_time_target_s,
        num_speculative_tokens=args.num_speculative_tokens,
        speculative_max_rows=args.speculative_max_rows,
        enable_prefix_caching=args.enable_prefix_caching,
        cache_salt=args.model,
        runner=args.runner,
        cuda_graphs=args.cuda_graphs,
        grammar_cache_size=args.grammar_cache_size,
        kv_cache_dtype=args.kv_cache_dtype,
    )


def build_engine(args: ModelServingArgs, device: torch.device) -> AsyncEngine:
    """Start an engine thread that loads the model on `device` (see AsyncEngine: the
    thread that steps the model must be the one that loaded it)."""
    def build() -> BatchEngine:
        dtype, why = model_dtype(args.model, args.dtype, device, args.runner)
        model, tokenizer = load_model(args.model, dtype, device)
        max_model_len = max_model_len_for(args, model.config, tokenizer)
        engine = BatchEngine(model, tokenizer, eos_token_ids(model, tokenizer),
                             engine_config(args, device.type, max_model_len))
        engine.dtype_reason = why
        logger.info("engine: %s on %s, %s (%s), runner %s", args.model, device, dtype, why, engine.runner.name)
        return engine

    return AsyncEngine(build, stream_interval_s=args.stream_interval_s)


def serving_limits(args: ModelServingArgs):
    """(tokenizer, max_model_len) without loading the weights: what the ingress validates against."""
    tokenizer = load_tokenizer(args.model)
    model_config = AutoConfig.from_pretrained(resolve_model_path(args.model))
    return tokenizer, max_model_len_for(args, model_config, tokenizer)
