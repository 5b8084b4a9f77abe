"""Load a causal LM and its tokenizer once, onto the right device."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from serve_app.engine.builtin_models import resolve_model_path
from serve_app.engine.precision import choose_dtype


def select_device(requested: str = "auto") -> torch.device:
    """'auto' is the GPU this process was given (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was requested but torch sees no CUDA device")
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(requested)


def load_tokenizer(model: str):
    return AutoTokenizer.from_pretrained(resolve_model_path(model))


def model_dtype(model: str, requested: str, device: torch.device, runner: str = "auto") -> tuple[torch.dtype, str]:
    """(dtype, why) for serving `model` with `dtype: requested` (precision.choose_dtype)."""
    config = AutoConfig.from_pretrained(resolve_model_path(model)) if requested == "auto" else None
    return choose_dtype(requested, device, config, runner)


def load_model(model: str, dtype: str | torch.dtype = "auto", device: torch.device | str = "cpu"):
    """Return (model, tokenizer) for a hub id, a local folder, or a built-in name."""
    device = torch.device(device)
    if isinstance(dtype, str):
        dtype, _ = model_dtype(model, dtype, device)
    path = resolve_model_path(model)
    tokenizer = AutoTokenizer.from_pretrained(path)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, attn_implementation="sdpa")
    return lm.to(device).eval(), tokenizer


def context_length(model_config, tokenizer, override: int | None = None) -> int:
    """The usable context: the config override, else what the model was built for."""
    if override:
        return override
    for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        value = getattr(model_config, attr, None)
        if value:
            return int(value)
    return int(min(tokenizer.model_max_length, 1 << 20))


def eos_token_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "eos_token_id", None) if source is not None else None
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return ids
