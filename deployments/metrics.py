"""Prometheus metrics, through Ray's metrics API (exported on each node's metrics port).

Named after vLLM's where the meaning is the same (`vllm:num_requests_running`
is `vllm_num_requests_running` here: Ray no longer accepts ':' in names), ours
are `serve_app_*`. Ray adds the `deployment`, `replica` and `application` tags
and exports every name with a `ray_` prefix: `ray_vllm_num_requests_running`.
Each process creates only the metrics it records. Every metric carries `model_name`: a
Router or model replica serves one model (set once per process, `set_enabled`), the
ingress tags each request with its own.
"""

from __future__ import annotations

import functools
import time

from ray.serve import metrics

# Seconds: from a token every few ms on a GPU to minutes of queueing on an overloaded CPU.
LATENCY_BUCKETS = [0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                   20.0, 40.0, 80.0, 160.0, 640.0]
TOKEN_BUCKETS = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192]
MODEL = ("model_name",)


_enabled = True
_model_name = ""  # the model of this process's Router or replica ("" in the ingress: tagged per request)


def set_enabled(enabled: bool, model_name: str = "") -> None:
    """Turn this process's metrics on or off (config `metrics`) and name the model a Router or
    replica process serves; call before recording any."""
    global _enabled, _model_name
    _enabled = enabled
    _model_name = model_name


class _Off:
    """Stands in for every metric when metrics are off."""

    def observe(self, *args, **kwargs) -> None: ...
    def inc(self, *args, **kwargs) -> None: ...
    def set(self, *args, **kwargs) -> None: ...


class _AllOff(dict):
    def __missing__(self, name: str) -> _Off:
        return _Off()


def metric_set(make):
    """One process-wide set of metrics, made on first use; stand-ins when metrics are off."""
    @functools.cache
    @functools.wraps(make)
    def get():
        if not _enabled:
            return _AllOff()
        made = make()
        for metric in made.values():
            metric.set_default_tags({"model_name": _model_name})
        return made
    return get


@metric_set
def ingress_metrics():
    """Per request, where a request begins and ends (the ingress)."""
    return {
        "ttft": metrics.Histogram("vllm_time_to_first_token_seconds", "Time to first token (from the ingress).",
                                  LATENCY_BUCKETS, tag_keys=MODEL),
        "itl": metrics.Histogram("vllm_inter_token_latency_seconds", "Time between two output tokens.",
                                 LATENCY_BUCKETS, tag_keys=MODEL),
        "e2e": metrics.Histogram("vllm_e2e_request_latency_seconds", "Request latency, first byte in to last out.",
                                 LATENCY_BUCKETS, tag_keys=MODEL),
        "prompt_tokens": metrics.Counter("vllm_prompt_tokens_total", "Prompt tokens of finished sequences.",
                                         tag_keys=MODEL),
        "generation_tokens": metrics.Counter("vllm_generation_tokens_total", "Generated tokens.", tag_keys=MODEL),
        "finished": metrics.Counter("vllm_request_success_total", "Sequences finished, by finish reason.",
                                    tag_keys=(*MODEL, "finished_reason")),
        "errors": metrics.Counter("serve_app_request_errors_total",
                                  "Requests answered with an error, by status and cause (429 queue_full, 400 ...).",
                                  tag_keys=(*MODEL, "status", "code")),
    }


@metric_set
def router_metrics():
    return {
        "queue_time": metrics.Histogram("vllm_request_queue_time_seconds", "Time a request waited for admission.",
                                        LATENCY_BUCKETS, tag_keys=MODEL),
        "queue_length": metrics.Gauge("serve_app_router_queue_length", "Sequences waiting in this router.",
                                      tag_keys=MODEL),
        "in_flight": metrics.Gauge("serve_app_router_in_flight_sequences", "Sequences this router has admitted.",
                                   tag_keys=MODEL),
    }


@metric_set
def replica_metrics():
    return {
        "running": metrics.Gauge("vllm_num_requests_running", "Sequences in the engine's running batch.",
                                 tag_keys=MODEL),
        "waiting": metrics.Gauge("vllm_num_requests_waiting", "Sequences in the engine waiting for KV blocks.",
                                 tag_keys=MODEL),
        "kv_usage": metrics.Gauge("vllm_kv_cache_usage_perc", "Fraction of KV-cache blocks in use (0-1).",
                                  tag_keys=MODEL),
        "step_tokens": metrics.Histogram("vllm_iteration_tokens_total", "Tokens computed per engine step.",
                                         TOKEN_BUCKETS, tag_keys=MODEL),
        "step_rows": metrics.Histogram("serve_app_step_batch_size", "Sequences decoded or prefilled per step.",
                                       TOKEN_BUCKETS, tag_keys=MODEL),
        "step_time": metrics.Histogram("serve_app_step_seconds", "Wall time of one engine step.", LATENCY_BUCKETS,
                                       tag_keys=MODEL),
        "draft_tokens": metrics.Counter("vllm_spec_decode_num_draft_tokens_total",
                                        "Speculative draft tokens checked.", tag_keys=MODEL),
        "accepted_draft_tokens": metrics.Counter("vllm_spec_decode_num_accepted_tokens_total",
                                                 "Speculative draft tokens kept (the model agreed).", tag_keys=MODEL),
        "prefix_cache_queries": metrics.Counter("vllm_prefix_cache_queries", "Prompt tokens looked up in the "
                                                "prefix cache (every admitted sequence's prompt).", tag_keys=MODEL),
        "prefix_cache_hits": metrics.Counter("vllm_prefix_cache_hits", "Prompt tokens served from the prefix "
                                             "cache instead of being computed.", tag_keys=MODEL),
    }


@metric_set
def embedding_replica_metrics():
    """An embedding replica: its forwards (padded tokens, inputs, time) and inputs in hand."""
    return {
        "running": metrics.Gauge("vllm_num_requests_running", "Inputs the replica holds (waiting or embedding).",
                                 tag_keys=MODEL),
        "step_tokens": metrics.Histogram("vllm_iteration_tokens_total", "Tokens computed per forward (padded).",
                                         TOKEN_BUCKETS, tag_keys=MODEL),
        "step_rows": metrics.Histogram("serve_app_step_batch_size", "Inputs embedded per forward.",
                                       TOKEN_BUCKETS, tag_keys=MODEL),
        "step_time": metrics.Histogram("serve_app_step_seconds", "Wall time of one forward.", LATENCY_BUCKETS,
                                       tag_keys=MODEL),
    }


class RequestMetrics:
    """Latency and token counts of one request's sequences, recorded as its outputs arrive."""

    def __init__(self, model_name: str):
        self.m = ingress_metrics()
        self.tags = {"model_name": model_name}
        self.start = time.monotonic()
        self.last_token_at: dict[str, float] = {}

    def observe(self, outputs) -> None:
        now = time.monotonic()
        m, tags = self.m, self.tags
        for out in outputs:
            if out.token_ids:
                previous = self.last_token_at.get(out.request_id)
                if previous is None:
                    m["ttft"].observe(now - self.start, tags=tags)
                else:  # a message may carry several tokens: their mean gap
                    m["itl"].observe((now - previous) / len(out.token_ids), tags=tags)
                self.last_token_at[out.request_id] = now
            if out.finished:
                m["finished"].inc(tags={**tags, "finished_reason": out.finish_reason})
                m["e2e"].observe(now - self.start, tags=tags)
                if out.prompt_tokens:
                    m["prompt_tokens"].inc(out.prompt_tokens, tags=tags)
                if out.completion_tokens:
                    m["generation_tokens"].inc(out.completion_tokens, tags=tags)


def record_embedding(model_name: str, seconds: float, prompt_tokens: int, inputs: int) -> None:
    """One embeddings request that succeeded: latency, tokens embedded, inputs (as finished sequences)."""
    m, tags = ingress_metrics(), {"model_name": model_name}
    m["e2e"].observe(seconds, tags=tags)
    m["prompt_tokens"].inc(prompt_tokens, tags=tags)
    m["finished"].inc(inputs, tags={**tags, "finished_reason": "stop"})


def count_error(model_name: str, status: int, code: str | None) -> None:
    ingress_metrics()["errors"].inc(tags={"model_name": model_name, "status": str(status), "code": code or ""})
