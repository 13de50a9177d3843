"""`server ray-serve`: the engine deployed on Ray Serve (every `server serve` flag, plus RayServeOptions').

Everything the user can get wrong is one line on stderr and exit code 2 before or while deploying: a bad
flag, Ray not installed, an unknown base, an unreadable key file, more replicas than a local cluster has
CPUs for, a replica that cannot load its base, an --adapter that does not validate. Then it serves until
SIGINT or SIGTERM, and takes the application down (and the local Ray cluster, if it started one).
Ray is imported only here, when the command runs.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import threading

from pydantic import ValidationError

from server.config import ServerConfig
from server.flags import add_config_flags, config_values
from server.ray.options import RayServeOptions

EXIT_USAGE = 2
SIGNAL_POLL_S = 1.0
STARTUP_CHECK_TIMEOUT_S = 600.0  # the --adapter check waits for a replica, which waits for its base
RAY_MISSING = 'error: `server ray-serve` needs Ray Serve, an optional extra: pip install -e ".[ray]"'
_START_ERROR = re.compile(r"EngineStartError: (.+)")

log = logging.getLogger(__name__)


def add_ray_serve_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("ray-serve", help="serve on Ray Serve: engine replicas routed by adapter "
                                              '(pip install -e ".[ray]"; docs/scaleout.md)')
    add_config_flags(parser, ServerConfig)  # every `server serve` flag, each replica's config
    add_config_flags(parser, RayServeOptions)


def ray_serve(args: argparse.Namespace) -> int:
    from server.cli import _first_error  # the single server's one-line form of a pydantic error

    try:
        config = ServerConfig(**config_values(args, ServerConfig))
        options = RayServeOptions(**config_values(args, RayServeOptions))
    except ValidationError as exc:
        return _usage(_first_error(exc))
    except ValueError as exc:
        return _usage(str(exc))
    if config.backend != "torch":
        return _usage("--backend onnxruntime is not served by ray-serve; replicas run the torch engine")
    if not config.port:
        return _usage("--port 0: Ray Serve's HTTP proxy needs a fixed port")
    try:
        import ray  # noqa: F401: the optional extra
        from ray import serve  # noqa: F401
    except ImportError:
        print(RAY_MISSING, file=sys.stderr)
        return EXIT_USAGE
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return _deploy_and_serve(config, options)


def _usage(message: str) -> int:
    print(f"error: {message.splitlines()[0]}", file=sys.stderr)
    return EXIT_USAGE


def _deploy_and_serve(config: ServerConfig, options: RayServeOptions) -> int:
    import ray
    from ray import serve

    from server.auth import load_api_keys
    from server.ray.app import build_application, prepare

    local = options.ray_address is None
    try:
        load_api_keys(config.api_key, config.api_key_file)  # the ingress reads them too: fail here, not there
        config, fingerprint = prepare(config)
    except ValueError as exc:
        return _usage(str(exc))
    starting = options.min_replicas if options.autoscaling else options.replicas
    cpus = os.cpu_count() or 1
    if local and (starting or 1) * options.cpus_per_replica > cpus:
        return _usage(f"{starting} replicas x --cpus-per-replica {options.cpus_per_replica:g} need more than the "
                      f"{cpus} CPUs of this machine; lower --cpus-per-replica (or --replicas)")
    try:
        ray.init(address=options.ray_address, include_dashboard=False, logging_level=config.log_level.upper())
    except (ConnectionError, ValueError, RuntimeError) as exc:
        return _usage(f"cannot start or reach Ray at {options.ray_address or 'a local cluster'}: {exc}")
    try:
        serve.start(http_options={"host": config.host, "port": config.port})
        handle = serve.run(build_application(config, options, fingerprint), name=options.app_name, route_prefix="/",
                           logging_config={"log_level": config.log_level.upper(), "enable_access_log": False})
        failures = handle.startup_report.remote().result(timeout_s=STARTUP_CHECK_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001: a failed deployment is reported as one line, whatever Ray raised
        found = _START_ERROR.search(str(exc))
        _teardown(options, local)
        return _usage(f"the deployment failed: {found.group(1) if found else str(exc).strip()}")
    if failures:
        _teardown(options, local)
        more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
        return _usage(failures[0] + more)
    log.info("serving %s on http://%s:%d (Ray Serve application %r)", config.base, config.host, config.port,
             options.app_name)
    _wait_for_signal()
    _teardown(options, local)
    return 0


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(SIGNAL_POLL_S):
        continue


def _teardown(options: RayServeOptions, local: bool) -> None:
    """Take the application down (Ray drains its replicas); a local cluster goes with it."""
    import ray
    from ray import serve

    try:
        serve.delete(options.app_name)
        if local:
            serve.shutdown()
    finally:
        if local:
            ray.shutdown()
