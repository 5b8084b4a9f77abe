"""The Ray settings `make serve` runs with reach the command, and a user's own value wins."""

import os
import subprocess
import sys

from serve_app import ray_env


def test_apply_adds_missing_settings_and_keeps_the_users():
    env = ray_env.apply({"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "2"})
    assert env["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == "2"
    assert ray_env.apply({}) == ray_env.RAY_ENV


def test_module_runs_the_command_with_the_settings():
    env = {k: v for k, v in os.environ.items() if k not in ray_env.RAY_ENV}
    out = subprocess.run([sys.executable, "-m", "serve_app.ray_env", sys.executable, "-c",
                          "import os; print(os.environ['RAY_SERVE_CONTROL_LOOP_INTERVAL_S'])"],
                         env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == ray_env.RAY_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]


def test_the_workers_of_the_test_cluster_run_with_them(ray_cluster):
    import ray

    @ray.remote(num_cpus=0)
    def interval():
        from ray.serve._private import constants
        return constants.CONTROL_LOOP_INTERVAL_S

    # Every worker (Serve's controller too) inherits the environment Ray started with.
    assert ray.get(interval.remote()) == float(ray_env.RAY_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"])
