"""What an operator sees: Prometheus metrics on Ray's metrics port, request ids through
every log, and no INFO lines for routine polling."""

import glob
import os
import re
import time
import uuid

import pytest
import requests
from ray import serve

from serve_app.app import build_app
from tests.conftest import APP_ARGS, TINY, wait_for

N = 6


@pytest.fixture(scope="module")
def ops_app(ray_cluster):
    serve.run(build_app(APP_ARGS), name="ops", route_prefix="/ops")
    yield f"{ray_cluster}/ops"
    serve.delete("ops")


def scrape(metrics_url: str) -> str:
    return requests.get(metrics_url, timeout=10).text


def value(text: str, name: str, **labels) -> float:
    """Sum of a metric's samples of app `ops` whose labels include `labels`."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        label_text, number = line[len(name) + 1:].rsplit("} ", 1)
        found = dict(re.findall(r'(\w+)="([^"]*)"', label_text))
        if found.get("application") == "ops" and all(found.get(k) == v for k, v in labels.items()):
            total += float(number)
    return total


def wait_for_metric(metrics_url: str, name: str, at_least: float, **labels) -> str:
    """Ray exports every second here (conftest); wait until the metric caught up."""
    wait_for(lambda: value(scrape(metrics_url), name, **labels) >= at_least, 30, f"{name} >= {at_least}")
    return scrape(metrics_url)


def test_counters_and_histograms_move_by_the_requests_served(ops_app, metrics_url):
    before = scrape(metrics_url)
    for i in range(N):
        body = {"model": TINY, "prompt": f"metric {i}", "max_tokens": 5, "ignore_eos": True, "stream": i % 2 == 0}
        assert requests.post(f"{ops_app}/v1/completions", json=body, timeout=60).status_code == 200
    rejected = requests.post(f"{ops_app}/v1/completions", json={"model": TINY, "prompt": "x", "top_p": 7}, timeout=60)
    assert rejected.status_code == 400
    # Errors the router of the HTTP app answers (no route, wrong method) are counted too.
    assert requests.get(f"{ops_app}/v1/nothing", timeout=10).status_code == 404
    assert requests.get(f"{ops_app}/v1/completions", timeout=10).status_code == 405
    m = "ray_vllm_request_success_total"
    wait_for_metric(metrics_url, m, value(before, m, finished_reason="length") + N, finished_reason="length")
    after = wait_for_metric(metrics_url, "ray_vllm_iteration_tokens_total_count", 1)  # replica metrics: a 1 s beat

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("ray_vllm_request_success_total", finished_reason="length") == N
    assert moved("ray_vllm_generation_tokens_total") == 5 * N
    assert moved("ray_vllm_prompt_tokens_total") > 0
    assert moved("ray_vllm_e2e_request_latency_seconds_count") == N
    assert moved("ray_vllm_time_to_first_token_seconds_count") == N
    # One sample per message after a stream's first; how many messages 5 tokens make depends on the
    # host (an engine that outpaces its reader coalesces them), so only that the histogram moves.
    assert moved("ray_vllm_inter_token_latency_seconds_count") > 0
    assert moved("ray_vllm_request_queue_time_seconds_count") == N
    assert moved("ray_serve_app_request_errors_total", status="400", code="invalid_value") == 1
    assert moved("ray_serve_app_request_errors_total", status="404", code="not_found") == 1
    assert moved("ray_serve_app_request_errors_total", status="405", code="method_not_allowed") == 1
    assert value(after, "ray_vllm_iteration_tokens_total_count") > 0
    for gauge in ("ray_vllm_num_requests_running", "ray_vllm_kv_cache_usage_perc", "ray_serve_app_router_queue_length"):
        assert f"{gauge}{{" in after, gauge


def test_speculative_drafts_are_counted(ops_app, metrics_url):
    """The built-in tiny model repeats itself: a greedy stream gets drafts, and most are kept."""
    before = scrape(metrics_url)
    body = {"model": TINY, "prompt": "spec", "max_tokens": 32, "ignore_eos": True, "temperature": 0}
    r = requests.post(f"{ops_app}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 32
    name = "ray_vllm_spec_decode_num_accepted_tokens_total"
    after = wait_for_metric(metrics_url, name, value(before, name) + 1)
    drafted = value(after, "ray_vllm_spec_decode_num_draft_tokens_total") - value(
        before, "ray_vllm_spec_decode_num_draft_tokens_total")
    accepted = value(after, name) - value(before, name)
    assert 0 < accepted <= drafted


def test_a_request_id_comes_back_and_is_in_every_log_of_the_graph(ops_app):
    rid = f"trace-{uuid.uuid4().hex[:12]}"
    r = requests.post(f"{ops_app}/v1/completions", json={"model": TINY, "prompt": "id", "max_tokens": 2},
                      headers={"x-request-id": rid}, timeout=60)
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    bad = requests.post(f"{ops_app}/v1/completions", json={"model": TINY}, headers={"x-request-id": rid + "b"},
                        timeout=60)
    assert bad.status_code == 400 and bad.headers["x-request-id"] == rid + "b"  # errors too
    assert requests.get(f"{ops_app}/health", timeout=10).headers.get("x-request-id")  # generated when not sent
    logs = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "session_latest", "logs", "serve")

    def parts_that_logged_it() -> set[str]:
        return {part for part in ("Ingress", "Router", "ModelReplica")
                for f in glob.glob(f"{logs}/replica_ops_{part}*.log") if rid in open(f).read()}

    wait_for(lambda: parts_that_logged_it() == {"Ingress", "Router", "ModelReplica"}, 10,
             "the request id in every part's log", [], lambda: (parts_that_logged_it(),))


def test_routine_polling_is_not_logged_at_info(ops_app):
    for _ in range(3):
        requests.get(f"{ops_app}/health", timeout=10)
        requests.get(f"{ops_app}/stats?replicas=1", timeout=10)
    time.sleep(2.5)  # model replicas poll the routers' queue length every second
    logs = os.path.join(os.environ.get("RAY_TMPDIR", "/tmp/ray"), "session_latest", "logs", "serve")
    text = "".join(open(f).read() for f in glob.glob(f"{logs}/replica_ops_*.log"))
    for routine in ("CALL queue_length OK", "CALL info OK", "CALL stats OK", "CALL ready_replicas OK",
                    "GET /health 200", "GET /stats 200"):
        assert routine not in text, routine
    assert "POST /v1/completions 200" in text or "CALL submit OK" in text  # requests are still logged
