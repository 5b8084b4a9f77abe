"""Typed arguments of the application: the single source of defaults.

`serve_config.yaml` passes `args:` to `serve_app.app:build_app`, which validates
them with `AppArgs`. A wrong field fails at startup with a message naming it.

An app serves one or more models (`models:`, each a `ModelArgs`); the per-model
fields may also be written at the top level of `args` for a single model. Each
model's deployments receive a `ModelServingArgs`: that model's fields with the
app-wide ones beside them.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_MODEL = "builtin:smollm2-135m-instruct"
DEFAULT_EMBEDDING_MODEL = "builtin:all-minilm-l6-v2"

Task = Literal["generate", "embed"]


class AutoscalingArgs(BaseModel):
    """How many model replicas run, and how fast that number follows the load."""

    model_config = ConfigDict(extra="forbid")

    min_replicas: int = Field(1, ge=0, description="Replicas kept when idle (0 = scale to zero).")
    max_replicas: int = Field(1, ge=1, description="Upper bound; on a GPU cluster, the number of GPUs.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time. Unset: min_replicas, or 1 if that is 0.")
    target_sequences_per_replica: float = Field(
        16, gt=0, description="Queued + in-flight sequences one replica should carry; usually ~max_batch_size/2."
    )
    upscale_delay_s: float = Field(5.0, ge=0, description="How long demand must stay higher before replicas are added.")
    downscale_delay_s: float = Field(30.0, ge=0, description="How long demand must stay lower before replicas are removed.")
    metrics_interval_s: float = Field(1.0, gt=0, description="How often replicas and the router report load.")
    look_back_period_s: float = Field(5.0, gt=0, description="Window over which reported load is averaged.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not (
            self.min_replicas <= self.initial_replicas <= self.max_replicas
        ):
            raise ValueError("initial_replicas must lie within [min_replicas, max_replicas]")
        return self

    def serve_autoscaling_config(self) -> dict:
        """Ray Serve's `autoscaling_config` for the model replicas."""
        from serve_app.autoscaling import SequenceAutoscalingPolicy

        return {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "initial_replicas": self.start_replicas,
            "upscale_delay_s": self.upscale_delay_s,
            "downscale_delay_s": self.downscale_delay_s,
            "metrics_interval_s": self.metrics_interval_s,
            "look_back_period_s": self.look_back_period_s,
            "policy": {
                "policy_function": SequenceAutoscalingPolicy,
                "policy_kwargs": {"target_sequences_per_replica": self.target_sequences_per_replica},
            },
        }

    @property
    def start_replicas(self) -> int:
        if self.initial_replicas is not None:
            return self.initial_replicas
        return max(self.min_replicas, 1)


class ModelArgs(BaseModel):
    """One served model: what it is, how its replicas batch, queue, scale and where they run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(
        DEFAULT_MODEL,
        description="Hugging Face hub id, local directory, or a built-in offline model "
        "('builtin:smollm2-135m-instruct', 'builtin:all-minilm-l6-v2', 'builtin:tiny-llama').",
    )
    served_model_name: str | None = Field(None, description="Name clients pass as `model`. Unset: `model`.")
    task: Task | None = Field(
        None, description="generate: chat and completions; embed: /v1/embeddings (on a causal LM, its last "
        "token pooled). Unset: detected; a sentence-transformers folder or a BERT-family encoder embeds, a "
        "causal LM generates.",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="The weights. auto: bfloat16 on a GPU; on a CPU, a bfloat16 checkpoint (most current "
        "models, the built-in SmolLM2) stays bfloat16 and is multiplied in float32 by a compiled kernel (or natively "
        "where the CPU has AVX512-BF16/AMX), other checkpoints bfloat16 only where a startup check finds native bf16 "
        "faster, else float32. Activations are float32 on CPU either way.")
    kv_cache_dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="The KV cache. auto: float16 when the weights are 16-bit (decode attention reads "
        "half the bytes; on GPU with the native runner, on CPU with the compiled kernels), float32 for float32 "
        "weights, else the attention's dtype. float16/bfloat16 halve the cache's memory.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the GPU Ray assigned, else CPU.")
    max_model_len: int | None = Field(
        None, gt=0, description="Context limit for prompt + completion; for an embedding model, tokens of one "
        "input. Unset: the model's own (a sentence-transformers model's max_seq_length).")
    torch_threads: int | None = Field(
        None, gt=0, description="torch intra-op threads of a CPU replica. Unset: the node's cores / "
        "autoscaling.max_replicas (at least 1), so the replicas of one node do not oversubscribe it."
    )

    # Batching and queueing
    max_batch_size: int = Field(
        32, ge=1, le=1024, description="Sequences a replica decodes together (its slots); an embedding "
        "replica: inputs it holds at once.")
    max_num_batched_tokens: int | None = Field(
        None, ge=1, description="Token budget of one engine step: one per decoding row, the rest prefills "
        "prompts in chunks; smaller keeps streams smooth, larger prefills faster. Unset: 256 on CPU, 2048 on "
        "GPU (at least max_batch_size); embedding models: padded tokens per forward, 8192 CPU / 32768 GPU.",
    )
    step_time_target_s: float | None = Field(
        None, gt=0, description="When set, a step that overran it shrinks the next step's token budget in "
        "proportion (down to decode rows + 16), growing back by a quarter per step; caps stream silences, "
        "slows prompts. Unset: a fixed budget.",
    )
    num_speculative_tokens: int = Field(
        4, ge=0, le=16, description="Prompt-lookup speculative decoding: draft up to this many tokens from "
        "earlier in the stream's own text and keep those the model's draws agree with (same output, fewer "
        "steps). Streams with a seed, logprobs or penalties decode one token per step. 0 = off.",
    )
    speculative_max_rows: int = Field(
        8, ge=1, description="Draft only while at most this many sequences decode: beyond that a step is "
        "bound by compute and drafts stop paying.",
    )
    enable_prefix_caching: bool = Field(
        True, description="Keep the KV blocks of finished prompts and outputs so a request starting the same "
        "way (a shared system prompt, a chat's earlier turns) prefills only the rest; evicted LRU.",
    )
    runner: Literal["auto", "native", "transformers"] = Field(
        "auto", description="The forward pass: native = our own for the Llama family (Llama, Mistral, "
        "Qwen2, Qwen3); transformers = the model's transformers module; auto = native where supported.",
    )
    cuda_graphs: bool = Field(
        True, description="On a GPU, with the native runner: replay decode steps (up to max_batch_size rows, "
        "256 at most) from CUDA graphs captured at their first use, one launch per step instead of one per "
        "operation; off: every operation is launched from Python. No effect on a CPU.",
    )
    kv_cache_tokens: int | None = Field(
        None, ge=16, description="Tokens the paged KV cache of a replica holds; a sequence is admitted when "
        "prompt + max_tokens fit, the rest wait. Unset: max(max_model_len, max_batch_size x 1024).",
    )
    batch_wait_timeout_s: float = Field(0.01, ge=0, le=10, description="How long the router waits to fill a batch.")
    max_queue_len: int = Field(256, ge=1, description="Requests waiting in the router; beyond it clients get 429.")

    # Placement
    num_gpus: float | None = Field(None, ge=0, description="GPUs per replica, fractions allowed. Unset: 1 if the cluster has GPUs, else 0.")
    num_cpus: float = Field(1, ge=0, description="CPUs reserved per model replica.")
    router_num_cpus: float = Field(0, ge=0, description="CPUs reserved per Router replica.")
    router_replicas: int = Field(
        1, ge=1, le=64, description="Router replicas; each admits into its share of every model replica's slots.")
    prefix_aware_routing: bool = Field(
        True, description="Send a request to the replica most likely to hold its prompt's start in its "
        "prefix cache, within prefix_routing_max_imbalance. Off: always the least loaded replica.",
    )
    prefix_routing_max_imbalance: int = Field(
        4, ge=0, description="Sequences a replica may carry beyond the least loaded one and still be chosen "
        "for holding a request's prefix; beyond it the least loaded replica is chosen.",
    )
    autoscaling: AutoscalingArgs = Field(default_factory=AutoscalingArgs, description="How many replicas run.")

    @property
    def model_name(self) -> str:
        return self.served_model_name or self.model

    def step_token_budget(self, device_type: str) -> int:
        """max_num_batched_tokens, or its default for this device (CPU steps must stay short)."""
        if self.task == "embed":
            return self.max_num_batched_tokens or (32768 if device_type == "cuda" else 8192)
        default = 2048 if device_type == "cuda" else 256
        return max(self.max_num_batched_tokens or default, self.max_batch_size)

    def cpu_threads(self, node_cores: int) -> int:
        """torch threads of a CPU replica: torch_threads, or the cores shared by as many replicas as
        autoscaling may place. Why not all cores each: 3 replicas x 2 spinning OpenMP threads on 2
        cores stalled a 1,900-token request past a 60 s grace period; 1 thread each served it."""
        return self.torch_threads or max(1, node_cores // self.autoscaling.max_replicas)

    def kv_tokens(self, max_model_len: int) -> int:
        """kv_cache_tokens, or its default for this context length."""
        return self.kv_cache_tokens or max(max_model_len, self.max_batch_size * 1024)


class AppWideArgs(BaseModel):
    """What the whole app shares: ingress, limits on one request, timeouts, metrics, security."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    stream_interval_s: float = Field(
        0.005, ge=0, le=1, description="Least time between two stream messages per hop; tokens in between are "
        "merged. Bounds the message rate where decode steps are faster than the serving processes take messages; "
        "above a decode step's time it becomes the stream's token gap."
    )
    max_tokens_default: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    request_timeout_s: float | None = Field(
        600.0, gt=0, description="Per-request deadline (a client may lower it with the X-Request-Timeout header)."
    )
    max_body_bytes: int = Field(1_000_000, ge=1024, description="Larger request bodies get 413.")
    retry_after_s: int = Field(1, ge=1, description="Retry-After sent with 429/503.")

    # Placement
    ingress_num_cpus: float = Field(0, ge=0, description="CPUs reserved per ingress replica.")
    ingress_replicas: int = Field(1, ge=1, le=256, description="Ingress replicas (HTTP, tokenization, SSE).")
    lease_timeout_s: float = Field(
        60.0, gt=0, description="A router frees the slots of an admitted request whose ingress stopped renewing "
        "its lease for this long (the ingress died); ingresses renew every quarter of it."
    )
    health_check_period_s: float = Field(
        2.0, gt=0, description="How often Serve checks each replica; a dead replica stays among the "
        "router's placement choices until a check fails."
    )
    graceful_shutdown_timeout_s: float = Field(
        120, ge=0, description="A replica being removed (redeploy, scale down, `serve shutdown`) finishes its "
        "requests for up to this long; the same for ingress, router and model replicas."
    )

    # Limits on one request, checked at the ingress before anything reaches the engine.
    max_prompts_per_request: int = Field(32, ge=1, le=1024, description="Length of a /v1/completions prompt list.")
    max_messages: int = Field(512, ge=1, description="Messages in one chat request.")
    max_stop_chars: int = Field(256, ge=1, le=4096, description="Length of one stop string.")
    max_prompt_tokens: int | None = Field(
        None, ge=1, description="Tokens in one prompt; longer prompts get 400. Unset: max_model_len - 1.")
    max_embedding_inputs: int = Field(
        2048, ge=1, description="Inputs in one /v1/embeddings request (OpenAI's limit).")
    body_read_timeout_s: float = Field(
        30.0, gt=0, description="Deadline for receiving a request body; a slower client gets 408.")
    max_schema_bytes: int = Field(
        65_536, ge=256, description="Size of one request's output constraint (schema, regex or grammar, or all "
        "its tools' parameter schemas together); larger ones get 400.")
    max_tools: int = Field(128, ge=1, description="Tools in one chat request.")
    grammar_cache_size: int = Field(
        256, ge=1, description="Compiled grammars each process keeps; a repeated schema is not compiled again.")

    # Operations
    metrics: bool = Field(True, description="Export Prometheus metrics through Ray.")

    # Security
    api_key: str | list[str] | None = Field(
        None, description="Accepted key(s): clients send `Authorization: Bearer <key>`. Also from env "
        "SERVE_APP_API_KEYS (comma-separated) and api_key_file; any of them turns auth on.")
    api_key_file: str | None = Field(None, description="A file with one accepted API key per line.")
    allowed_hosts: list[str] | None = Field(
        None, min_length=1, description="Host header values served, others get 400 (`*.x`: subdomains, `<ip>`: any IP, `*`: any "
        "host). Unset: any host with API keys; without, localhost, this machine's names and any IP.")
    prefix_cache_salt_by_api_key: bool = Field(
        False, description="Requests made with different API keys never share cached KV blocks (a cache hit "
        "shows in the time to first token, which would leak other tenants' prompts).",
    )
    trust_ray_headers: bool = Field(
        False, description="Honour Ray's per-request control headers (x-request-disconnect-disabled, "
        "x-request-timeout-seconds) from clients; off, such requests get 400.")


def deployment_slug(model_name: str) -> str:
    """The part of a model's deployment names (Router-<slug>) that its served name gives."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-.") or "model"


def _default_models() -> list[ModelArgs]:
    return [ModelArgs(model=DEFAULT_MODEL), ModelArgs(model=DEFAULT_EMBEDDING_MODEL)]


class AppArgs(AppWideArgs):
    """Everything a user configures; every field has a working default.

    `models` lists the served models (default: the built-in chat model and the built-in
    embedding model). Per-model fields at the top level (`model: X`, `max_batch_size: 8`, ...)
    mean a single model with those fields, as before there was a list.
    """

    models: list[ModelArgs] = Field(
        default_factory=_default_models, min_length=1,
        description="The served models, each with its own replicas, router, limits and autoscaling.")

    @model_validator(mode="before")
    @classmethod
    def _fold_single_model(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        top = [name for name in data if name in ModelArgs.model_fields]
        if not top:
            return data
        if "models" in data:
            raise ValueError(f"per-model fields {', '.join(top)} at the top level of args cannot be combined "
                             "with `models:`; move them into the entries of `models`")
        rest = {k: v for k, v in data.items() if k not in ModelArgs.model_fields}
        return {**rest, "models": [{k: data[k] for k in top}]}

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        names = [m.model_name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"served model names must be unique; {', '.join(repeated)} appears more than once "
                             "(set served_model_name)")
        return self

    @property
    def model_names(self) -> list[str]:
        return [m.model_name for m in self.models]

    def serving_args(self) -> list[ModelServingArgs]:
        """Each model's fields with the app-wide ones, and unique deployment names."""
        taken: set[str] = set()
        out = []
        for m in self.models:
            slug = base = deployment_slug(m.model_name)
            n = 1
            while slug.lower() in taken:
                n += 1
                slug = f"{base}-{n}"
            taken.add(slug.lower())
            out.append(ModelServingArgs(**self.model_dump(exclude={"models"}), **m.model_dump(), slug=slug))
        return out


class ModelServingArgs(ModelArgs, AppWideArgs):
    """What one model's Router and replicas (and the ingress, per model) work from: the model's
    fields, the app-wide ones, and the names of its deployments."""

    slug: str = Field("model", description="Makes this model's deployment names unique within the app.")

    @property
    def router_deployment(self) -> str:
        return f"Router-{self.slug}"

    @property
    def replica_deployment(self) -> str:
        prefix = "EmbeddingReplica" if self.task == "embed" else "ModelReplica"
        return f"{prefix}-{self.slug}"
