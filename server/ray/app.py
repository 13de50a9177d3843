"""The Ray Serve application: ingress -> engine replicas, with the catalog beside them.

`build_application` is what `server ray-serve` deploys; `build_app` is the same for Ray Serve's own tools
(`serve run server.ray.app:build_app base=smollm2-135m replicas=2`, or `import_path: server.ray.app:build_app`
in a Serve config file), taking ServerConfig and RayServeOptions field names as arguments.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from adapters import resolve_base
from server.auth import establish_admin_token
from server.config import ServerConfig
from server.ray.catalog_deployment import CatalogDeployment
from server.ray.engine import EngineReplica
from server.ray.options import (
    RayServeOptions, catalog_deployment_options, engine_deployment_options, ingress_deployment_options,
    max_models_per_replica, replica_threads, split_args,
)
from server.ray.router import Ingress

ENGINE = "Engine"
CATALOG = "Catalog"
INGRESS = "Ingress"


def build_application(config: ServerConfig, options: RayServeOptions, fingerprint: str) -> Application:
    """`config.admin_token` set (one token for the cluster); `fingerprint`: the base's (names the journal)."""
    engine = serve.deployment(EngineReplica, name=ENGINE).options(**engine_deployment_options(config, options)).bind(
        config, max_models_per_replica(config), replica_threads(config, options), options.metrics_port)
    catalog = serve.deployment(CatalogDeployment, name=CATALOG).options(**catalog_deployment_options()).bind(
        engine, config, fingerprint, options.app_name)
    return serve.deployment(serve.ingress()(Ingress), name=INGRESS).options(**ingress_deployment_options(options)).bind(
        config, engine, catalog)


def prepare(config: ServerConfig) -> tuple[ServerConfig, str]:
    """The base's fingerprint (preparing the base into the cache the first time) and the config with the
    cluster's admin token, written where `server add-adapter` finds it for this port."""
    fingerprint = resolve_base(config.base, config.cache_dir).fingerprint
    token = establish_admin_token(config.admin_token, config.state_dir, config.port)
    return config.model_copy(update={"admin_token": token}), fingerprint


def build_app(args: dict[str, Any]) -> Application:
    """Ray Serve's application builder: `args` hold ServerConfig and RayServeOptions fields."""
    server_args, ray_args = split_args(dict(args))
    config, fingerprint = prepare(ServerConfig(**server_args))
    return build_application(config, RayServeOptions(**ray_args), fingerprint)
