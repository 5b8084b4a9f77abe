"""The cluster examples parse with Ray's own schema and our argument model."""

import json
from pathlib import Path

import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from serve_app.config import AppArgs

ROOT = Path(__file__).resolve().parent.parent


def serve_configs():
    yield "serve_config.yaml", yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    yield "multi_gpu", yaml.safe_load((ROOT / "examples/serve_config.multi_gpu.yaml").read_text())
    service = yaml.safe_load((ROOT / "examples/kuberay-rayservice.yaml").read_text())
    assert service["kind"] == "RayService" and service["apiVersion"] == "ray.io/v1"
    yield "rayservice", yaml.safe_load(service["spec"]["serveConfigV2"])


@pytest.mark.parametrize("name, config", list(serve_configs()))
def test_serve_configs_validate(name, config):
    ServeDeploySchema.model_validate(config)
    for app in config["applications"]:
        AppArgs.model_validate(app.get("args", {}))


def test_grafana_dashboard_queries_our_metrics():
    dashboard = json.loads((ROOT / "examples/grafana-dashboard.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in ("ray_vllm_num_requests_running", "ray_vllm_time_to_first_token_seconds_bucket",
                   "ray_vllm_inter_token_latency_seconds_bucket", "ray_vllm_e2e_request_latency_seconds_bucket",
                   "ray_vllm_request_queue_time_seconds_bucket", "ray_vllm_generation_tokens_total",
                   "ray_vllm_request_success_total", "ray_serve_app_request_errors_total",
                   "ray_vllm_kv_cache_usage_perc", "ray_vllm_iteration_tokens_total_bucket",
                   "ray_vllm_spec_decode_num_accepted_tokens_total"):
        assert metric in exprs, metric


def test_rayservice_head_runs_with_our_ray_settings():
    from serve_app.ray_env import RAY_ENV

    service = yaml.safe_load((ROOT / "examples/kuberay-rayservice.yaml").read_text())
    head = service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {e["name"]: e["value"] for e in head.get("env", [])} == RAY_ENV
