import pytest
from pydantic import ValidationError

from serve_app.config import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL, AppArgs


def test_defaults_serve_the_offline_chat_and_embedding_models():
    args = AppArgs()
    assert args.model_names == [DEFAULT_MODEL, DEFAULT_EMBEDDING_MODEL]
    assert all(name.startswith("builtin:") for name in args.model_names)


def test_top_level_model_fields_mean_one_model():
    args = AppArgs.model_validate({"model": "builtin:tiny-llama", "max_batch_size": 8, "metrics": False})
    assert args.model_names == ["builtin:tiny-llama"]
    assert args.models[0].max_batch_size == 8 and not args.metrics
    # Without `model`: the default chat model alone, with those fields.
    assert AppArgs.model_validate({"max_queue_len": 9}).model_names == [DEFAULT_MODEL]


def test_mixing_top_level_model_fields_with_models_names_them():
    with pytest.raises(ValidationError, match="max_batch_size, num_cpus.*models"):
        AppArgs.model_validate({"max_batch_size": 8, "num_cpus": 0, "models": [{"model": "builtin:tiny-llama"}]})


def test_served_names_must_be_unique():
    with pytest.raises(ValidationError, match="unique.*'?builtin:tiny-llama"):
        AppArgs.model_validate({"models": [{"model": "builtin:tiny-llama"}, {"model": "builtin:tiny-llama"}]})
    args = AppArgs.model_validate({"models": [{"model": "builtin:tiny-llama"},
                                              {"model": "builtin:tiny-llama", "served_model_name": "second"}]})
    assert args.model_names == ["builtin:tiny-llama", "second"]


def test_each_model_gets_its_own_deployment_names():
    args = AppArgs.model_validate({"models": [{"model": "org/a", "task": "generate"},
                                              {"model": "org-a", "task": "generate"},
                                              {"model": "builtin:all-minilm-l6-v2", "task": "embed"}]})
    names = [(m.router_deployment, m.replica_deployment) for m in args.serving_args()]
    assert names == [("Router-org-a", "ModelReplica-org-a"), ("Router-org-a-2", "ModelReplica-org-a-2"),
                     ("Router-builtin-all-minilm-l6-v2", "EmbeddingReplica-builtin-all-minilm-l6-v2")]
    assert len({n for pair in names for n in pair}) == 6


def test_models_are_served_with_the_app_wide_fields_beside_their_own():
    args = AppArgs.model_validate({"request_timeout_s": 9, "models": [{"model": "m", "max_queue_len": 3}]})
    (model,) = args.serving_args()
    assert model.max_queue_len == 3 and model.request_timeout_s == 9 and model.model_name == "m"


def test_tasks_are_detected_from_the_model(tmp_path):
    from serve_app.app import resolve_tasks
    from serve_app.engine.embedding import detect_task

    args = resolve_tasks(AppArgs())
    assert [m.task for m in args.models] == ["generate", "embed"]
    (tmp_path / "config.json").write_text('{"architectures": ["BertModel"], "model_type": "bert"}')
    assert detect_task(str(tmp_path)) == "embed"
    (tmp_path / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    assert detect_task(str(tmp_path)) == "generate"
    (tmp_path / "modules.json").write_text("[]")  # a sentence-transformers folder embeds, whatever it wraps
    assert detect_task(str(tmp_path)) == "embed"


@pytest.mark.parametrize("bad, field", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s"),
    ({"dtype": "float8"}, "dtype"),
    ({"max_bach_size": 4}, "max_bach_size"),  # a typo is an error, not ignored
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
    ({"autoscaling": {"target_sequences_per_replica": 0}}, "target_sequences_per_replica"),
    ({"models": []}, "models"),
    ({"models": [{"model": "x", "task": "classify"}]}, "task"),
    ({"models": [{"model": "x", "max_bach_size": 4}]}, "max_bach_size"),
    ({"max_embedding_inputs": 0}, "max_embedding_inputs"),
])
def test_wrong_args_fail_naming_the_field(bad, field):
    with pytest.raises(ValidationError) as info:
        AppArgs.model_validate(bad)
    assert field in str(info.value)


def test_build_app_rejects_bad_args_at_startup():
    from serve_app.app import build_app

    with pytest.raises(ValidationError, match="max_queue_len"):
        build_app({"max_queue_len": "many"})


@pytest.mark.parametrize("args, cores, threads", [
    ({}, 8, 8),  # one replica: all the cores
    ({"autoscaling": {"max_replicas": 3}}, 2, 1),  # more replicas than cores: one thread each, never 0
    ({"autoscaling": {"max_replicas": 4}}, 16, 4),
    ({"torch_threads": 3, "autoscaling": {"max_replicas": 4}}, 16, 3),  # set explicitly: as given
])
def test_cpu_threads_share_the_cores_among_the_replicas_autoscaling_may_place(args, cores, threads):
    assert AppArgs.model_validate(args).models[0].cpu_threads(cores) == threads
