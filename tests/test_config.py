import pytest
from pydantic import ValidationError

from serve_app.config import AppArgs


def test_defaults_are_valid_and_offline():
    args = AppArgs()
    assert args.model.startswith("builtin:")
    assert args.model_name == args.model


@pytest.mark.parametrize("bad, field", [
    ({"max_batch_size": 0}, "max_batch_size"),
    ({"batch_wait_timeout_s": -1}, "batch_wait_timeout_s"),
    ({"dtype": "float8"}, "dtype"),
    ({"max_bach_size": 4}, "max_bach_size"),  # a typo is an error, not ignored
    ({"autoscaling": {"min_replicas": 3, "max_replicas": 2}}, "autoscaling"),
    ({"autoscaling": {"target_sequences_per_replica": 0}}, "target_sequences_per_replica"),
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
    assert AppArgs.model_validate(args).cpu_threads(cores) == threads
