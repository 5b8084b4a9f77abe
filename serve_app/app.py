"""The deployment graph: Ingress -> Router -> ModelReplica x N.

`serve run serve_config.yaml` calls `build_app(args)`; so can Python:
`serve.run(build_app({"model": "builtin:tiny-llama"}))`.
"""

from __future__ import annotations

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serve_app.config import AppArgs


def default_num_gpus() -> float:
    """One GPU per replica when the cluster has any, else run on CPU."""
    if not ray.is_initialized():
        return 0
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def build_app(args: dict | AppArgs | None = None) -> Application:
    # Imported here: deployments depend on the core, never the other way round.
    from deployments.ingress import Ingress
    from deployments.replica import ModelReplica
    from deployments.replica_routing import ModelReplicaRequestRouter, PinnedReplicaRequestRouter
    from deployments.router import Router

    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    num_gpus = args.num_gpus if args.num_gpus is not None else default_num_gpus()
    plain = args.model_dump()
    scaling = args.autoscaling

    replica = ModelReplica.options(
        ray_actor_options={"num_cpus": args.num_cpus, "num_gpus": num_gpus},
        autoscaling_config=scaling.serve_autoscaling_config(),
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        # Batches are bounded by the router; Serve's per-replica cap must not add a second queue.
        max_ongoing_requests=4 * args.max_queue_len + 64,
        request_router_config=RequestRouterConfig(request_router_class=ModelReplicaRequestRouter),
        health_check_period_s=args.health_check_period_s,
    ).bind(plain)
    router = Router.options(
        ray_actor_options={"num_cpus": args.router_num_cpus},
        num_replicas=args.router_replicas,
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        max_ongoing_requests=4 * args.max_queue_len + 64,
        health_check_period_s=args.health_check_period_s,
        # A lease goes back to the Router replica that granted it.
        request_router_config=RequestRouterConfig(request_router_class=PinnedReplicaRequestRouter),
    ).bind(replica, plain)
    return Ingress.options(
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        num_replicas=args.ingress_replicas,
        # Serve's default is 20 s: a redeploy would cut every longer stream.
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        max_ongoing_requests=4 * args.max_queue_len + 64,
        health_check_period_s=args.health_check_period_s,
    ).bind(router, replica, plain)
