"""`server ray-serve`'s options: their checks (one line, exit 2), and what they become in Ray Serve's settings."""

from __future__ import annotations

import sys

import pytest

from server.cli import main
from server.config import ServerConfig
from server.ray.options import (
    RayServeOptions, engine_deployment_options, max_models_per_replica, replica_threads, split_args,
)


@pytest.mark.parametrize(("argv", "message"), [
    (["--replicas", "0"], "replicas: Input should be greater than or equal to 1"),
    (["--replicas", "2", "--max-replicas", "4"], "--replicas fixes the number of replicas"),
    (["--min-replicas", "2"], "autoscaling settings need --max-replicas"),
    (["--min-replicas", "5", "--max-replicas", "4"], "--min-replicas 5 is above --max-replicas 4"),
    (["--cpus-per-replica", "0"], "cpus_per_replica: Input should be greater than 0"),
    (["--backend", "onnxruntime", "--base", "minilm-l6"], "--backend onnxruntime is not served by ray-serve"),
    (["--port", "0"], "--port 0: Ray Serve's HTTP proxy needs a fixed port"),
    (["--adapter", "a=/x", "--adapter", "a=/y"], "--adapter: a name was given twice"),
])
def test_bad_options_are_one_line_and_exit_2(argv, message, capsys):
    assert main(["ray-serve", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


def test_without_ray_it_says_how_to_install_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    assert main(["ray-serve", "--replicas", "2"]) == 2
    assert capsys.readouterr().err == 'error: `server ray-serve` needs Ray Serve, an optional extra: pip install -e ".[ray]"\n'


def test_the_single_server_never_imports_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)
    from server.cli import build_parser

    assert build_parser().parse_args(["serve", "--port", "1"]).command == "serve"


def test_fixed_and_autoscaling_settings():
    config = ServerConfig(max_num_seqs=8, max_waiting=32, max_cpu_loras=16, max_adapters=10, shutdown_timeout=5)
    fixed = engine_deployment_options(config, RayServeOptions(replicas=3))
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert (fixed["max_ongoing_requests"], fixed["max_queued_requests"], fixed["graceful_shutdown_timeout_s"]) == (8, 32, 5)
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}
    scaled = engine_deployment_options(config, RayServeOptions(max_replicas=6, max_ongoing_requests=12))
    assert "num_replicas" not in scaled and scaled["max_ongoing_requests"] == 12
    assert scaled["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 6, "target_ongoing_requests": 6.0}
    explicit = RayServeOptions(min_replicas=0, max_replicas=2, target_ongoing_requests=3)
    assert engine_deployment_options(config, explicit)["autoscaling_config"]["min_replicas"] == 0
    gpu = engine_deployment_options(ServerConfig(device="cuda"), RayServeOptions())
    assert gpu["ray_actor_options"]["num_gpus"] == 1.0
    assert max_models_per_replica(config) == 10  # the memory tier, never more than a replica may register
    assert replica_threads(config, RayServeOptions(cpus_per_replica=2)) == 2
    assert replica_threads(config.model_copy(update={"threads": 3}), RayServeOptions()) == 3


def test_serve_config_args_split_by_field():
    server, ray = split_args({"base": "smollm2-135m", "max_num_seqs": "4", "replicas": "2"})
    assert server == {"base": "smollm2-135m", "max_num_seqs": "4"} and ray == {"replicas": "2"}
    with pytest.raises(ValueError, match="unknown argument"):
        split_args({"replica": 2})
