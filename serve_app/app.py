"""The deployment graph: Ingress -> Router-<model> -> ModelReplica-<model> x N, one Router and
replica set per served model (an embedding model's replicas are EmbeddingReplica-<model>).

`serve run serve_config.yaml` calls `build_app(args)`; so can Python:
`serve.run(build_app({"model": "builtin:tiny-llama"}))`.
"""

from __future__ import annotations

import ray
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from serve_app.config import AppArgs, ModelArgs


def default_num_gpus() -> float:
    """One GPU per replica when the cluster has any, else run on CPU."""
    if not ray.is_initialized():
        return 0
    return 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0


def resolve_tasks(args: AppArgs) -> AppArgs:
    """`args` with every model's `task` set: detected from the model's files where not configured."""
    from serve_app.engine.embedding import detect_task

    def resolved(model: ModelArgs) -> ModelArgs:
        return model if model.task else model.model_copy(update={"task": detect_task(model.model)})

    return args.model_copy(update={"models": [resolved(m) for m in args.models]})


def build_app(args: dict | AppArgs | None = None) -> Application:
    # Imported here: deployments depend on the core, never the other way round.
    from deployments.embedding_replica import EmbeddingReplica
    from deployments.ingress import Ingress
    from deployments.replica import ModelReplica
    from deployments.replica_routing import ModelReplicaRequestRouter, PinnedReplicaRequestRouter
    from deployments.router import Router

    if not isinstance(args, AppArgs):
        args = AppArgs.model_validate(args or {})
    args = resolve_tasks(args)
    routers, replicas = {}, {}
    for model in args.serving_args():
        num_gpus = model.num_gpus if model.num_gpus is not None else default_num_gpus()
        # Batches are bounded by the router; Serve's per-replica cap must not add a second queue.
        max_ongoing = 4 * model.max_queue_len + 64
        replica_class = EmbeddingReplica if model.task == "embed" else ModelReplica
        replica = replica_class.options(
            name=model.replica_deployment,
            ray_actor_options={"num_cpus": model.num_cpus, "num_gpus": num_gpus},
            autoscaling_config=model.autoscaling.serve_autoscaling_config(),
            graceful_shutdown_timeout_s=model.graceful_shutdown_timeout_s,
            max_ongoing_requests=max_ongoing,
            request_router_config=RequestRouterConfig(request_router_class=ModelReplicaRequestRouter),
            health_check_period_s=model.health_check_period_s,
        ).bind(model)
        routers[model.model_name] = Router.options(
            name=model.router_deployment,
            ray_actor_options={"num_cpus": model.router_num_cpus},
            num_replicas=model.router_replicas,
            graceful_shutdown_timeout_s=model.graceful_shutdown_timeout_s,
            max_ongoing_requests=max_ongoing,
            health_check_period_s=model.health_check_period_s,
            # A lease goes back to the Router replica that granted it.
            request_router_config=RequestRouterConfig(request_router_class=PinnedReplicaRequestRouter),
        ).bind(replica, model)
        replicas[model.model_name] = replica
    return Ingress.options(
        ray_actor_options={"num_cpus": args.ingress_num_cpus},
        num_replicas=args.ingress_replicas,
        # Serve's default is 20 s: a redeploy would cut every longer stream.
        graceful_shutdown_timeout_s=args.graceful_shutdown_timeout_s,
        max_ongoing_requests=sum(4 * m.max_queue_len + 64 for m in args.models),
        health_check_period_s=args.health_check_period_s,
    ).bind(routers, replicas, args)
