"""The engine's settings, resolved once (factory.engine_config builds them from the app's config)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BLOCK_SIZE = 16  # tokens per KV block: the unit of allocation and of prefix sharing


@dataclass(frozen=True)
class EngineConfig:
    max_num_seqs: int  # sequences decoded together
    max_model_len: int  # prompt + output of one sequence
    max_num_batched_tokens: int  # token budget of one step
    kv_cache_tokens: int  # slots of the paged KV cache
    step_time_target_s: float | None  # adaptive step budget (None: fixed)
    num_speculative_tokens: int  # prompt-lookup draft length (0: off)
    speculative_max_rows: int  # draft only while at most this many sequences decode
    enable_prefix_caching: bool
    cache_salt: str  # keeps this model's cached blocks apart from any other's
    runner: Literal["auto", "native", "transformers"]
    cuda_graphs: bool  # replay GPU decode steps from captured graphs (decode_graphs.py)
    grammar_cache_size: int  # compiled grammars kept
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"]
    block_size: int = BLOCK_SIZE
