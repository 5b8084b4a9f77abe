"""The autoscaling policy on synthetic contexts (no cluster)."""

import time
from types import SimpleNamespace

import pytest

from serve_app.autoscaling import IN_FLIGHT, ROUTER_QUEUE, SequenceAutoscalingPolicy, desired_replicas
from serve_app.config import AutoscalingArgs


def ctx(in_flight: dict | None, queued: dict | None = None, current=1, target=1, lo=1, hi=4):
    metrics = {}
    if in_flight is not None:
        metrics[IN_FLIGHT] = in_flight
    if queued is not None:
        metrics[ROUTER_QUEUE] = queued
    return SimpleNamespace(aggregated_metrics=metrics, current_num_replicas=current, target_num_replicas=target,
                           capacity_adjusted_min_replicas=lo, capacity_adjusted_max_replicas=hi)


@pytest.mark.parametrize("total, target, lo, hi, expected", [
    (0, 8, 1, 4, 1),      # idle: the floor
    (0, 8, 0, 4, 0),      # idle with scale-to-zero
    (1, 8, 0, 4, 1),      # any work needs a replica
    (16, 8, 1, 4, 2),
    (17, 8, 1, 4, 3),     # ceil
    (1000, 8, 1, 4, 4),   # a spike: the ceiling
])
def test_desired_replicas(total, target, lo, hi, expected):
    assert desired_replicas(total, target, lo, hi) == expected


def test_policy_counts_sequences_in_replicas_plus_router_queue_once():
    policy = SequenceAutoscalingPolicy(target_sequences_per_replica=4)
    # Two replicas each run 4 sequences (1 request each: a batch); 8 more wait in the router,
    # reported identically by both replicas.
    desired, state = policy(ctx({"r1": 4, "r2": 4}, {"r1": 8, "r2": 8}, current=2, target=2))
    assert state["total_sequences"] == 16
    assert desired == 4


def test_policy_holds_while_replicas_have_not_reported():
    policy = SequenceAutoscalingPolicy(4)
    assert policy(ctx(None, current=2, target=3))[0] == 3


def test_policy_scales_down_to_min_when_idle():
    policy = SequenceAutoscalingPolicy(4)
    assert policy(ctx({"r1": 0, "r2": 0, "r3": 0}, {"r1": 0}, current=3, target=3, lo=1))[0] == 1


def test_serve_config_carries_delays_bounds_and_target():
    cfg = AutoscalingArgs(min_replicas=0, max_replicas=3, upscale_delay_s=1, downscale_delay_s=9,
                          target_sequences_per_replica=6).serve_autoscaling_config()
    assert (cfg["min_replicas"], cfg["max_replicas"], cfg["initial_replicas"]) == (0, 3, 1)
    assert (cfg["upscale_delay_s"], cfg["downscale_delay_s"]) == (1, 9)
    assert cfg["policy"]["policy_kwargs"] == {"target_sequences_per_replica": 6}


def test_serve_applies_bounds_and_delays_around_the_policy():
    """Serve's own wrapper (the one the controller uses) turns our raw target into decisions."""
    from ray.serve._private.common import DeploymentID
    from ray.serve.autoscaling_policy import _apply_autoscaling_config
    from ray.serve.config import AutoscalingConfig, AutoscalingContext

    # Serve's delay logic reads the wall clock, so the delay here is short and real.
    config = AutoscalingConfig(min_replicas=1, max_replicas=3, upscale_delay_s=0.3, downscale_delay_s=10,
                               metrics_interval_s=1, look_back_period_s=2)
    policy = _apply_autoscaling_config(SequenceAutoscalingPolicy(4))

    def tick(load, now, state):
        c = AutoscalingContext(
            deployment_id=DeploymentID("ModelReplica", "app"), deployment_name="ModelReplica", app_name="app",
            current_num_replicas=1, target_num_replicas=1, running_replicas=[], total_num_requests=1,
            total_queued_requests=0, aggregated_metrics={IN_FLIGHT: {"r1": load}}, raw_metrics={},
            capacity_adjusted_min_replicas=1, capacity_adjusted_max_replicas=3, policy_state=state,
            last_scale_up_time=None, last_scale_down_time=None, current_time=now, config=config)
        return policy(c)

    decision, state = tick(100, time.time(), {})
    assert decision == 1  # a spike does not scale before upscale_delay_s
    time.sleep(0.35)
    decision, state = tick(100, time.time(), state)
    assert decision == 3  # ...and then only up to max_replicas
