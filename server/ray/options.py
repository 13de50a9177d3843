"""`server ray-serve`'s own options, and their translation into Ray Serve's deployment settings.

ServerConfig stays the engine's one config: every replica is built from it exactly as `server serve` builds its
process. These options describe only the deployment around it (how many replicas, what Ray reserves for each,
how Ray routes and scales them), so they live beside it instead of in it: server/config.py is the single
server's, and a replica never reads them. They are flags only (no LORAPLEX_* environment), derived by
server/flags.py like ServerConfig's. Pure pydantic: importing this module does not import Ray.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from server.config import ServerConfig
from server.persist import RUNTIME_DIR

INGRESS_MAX_ONGOING = 1000  # the ingress only parses and forwards: it is never the bottleneck
CATALOG_MAX_ONGOING = 1000  # one lookup per routed request, from every ingress replica
CONSTRUCTOR_RETRIES = 2  # a replica that cannot load its base will not on a third try either
HEALTH_CHECK_PERIOD_S = 5.0  # how soon Ray notices a dead model worker thread (check_health) and restarts it


class RayServeOptions(BaseModel):
    """How the engine is deployed on Ray Serve; see docs/scaleout.md."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    replicas: int = Field(1, ge=1, description="engine replicas, each loading the base (fixed; --max-replicas "
                          "turns on autoscaling instead)")
    min_replicas: int | None = Field(None, ge=0, description="autoscaling: fewest replicas (default 1)")
    max_replicas: int | None = Field(None, ge=1, description="autoscaling: most replicas; setting it turns "
                                     "autoscaling on")
    target_ongoing_requests: float | None = Field(None, gt=0, description=(
        "autoscaling: requests in flight per replica that Ray scales to (default: half of --max-ongoing-requests)"))
    max_ongoing_requests: int | None = Field(None, ge=1, description=(
        "requests Ray sends one replica at most; past it Ray sends an adapter's requests to another replica, "
        "or queues them at the ingress (default: --max-num-seqs)"))
    ingress_replicas: int = Field(1, ge=1, description="replicas of the ingress (parses, routes by adapter, admin)")
    cpus_per_replica: float = Field(1.0, gt=0, description="CPUs Ray reserves for each engine replica; with "
                                    "--threads 0 also its torch threads")
    gpus_per_replica: float | None = Field(None, ge=0, description="GPUs Ray reserves for each engine replica "
                                           "(default: 1 with --device cuda, else 0)")
    ray_address: str | None = Field(None, description="a running Ray cluster to deploy on (auto, host:port or "
                                    "ray://host:port); default: start a local one for this process")
    metrics_port: int = Field(9600, ge=0, le=65535, description=(
        "first port of the replicas' Prometheus endpoints: the replica of local rank r on a node listens on "
        "this + r (0: a free port each); GET /metrics/targets lists them all"))
    app_name: str = Field("loraplex", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Ray Serve application name")

    @property
    def autoscaling(self) -> bool:
        return self.max_replicas is not None

    @model_validator(mode="after")
    def _one_way_to_size(self) -> "RayServeOptions":
        scaling = {"--min-replicas": self.min_replicas, "--target-ongoing-requests": self.target_ongoing_requests}
        given = [flag for flag, value in scaling.items() if value is not None]
        if not self.autoscaling and given:
            raise ValueError(f"{', '.join(given)}: autoscaling settings need --max-replicas")
        if self.autoscaling and "replicas" in self.model_fields_set:
            raise ValueError("--replicas fixes the number of replicas; with --max-replicas (autoscaling) use "
                             "--min-replicas instead")
        if self.autoscaling and self.min_replicas is not None and self.min_replicas > self.max_replicas:
            raise ValueError(f"--min-replicas {self.min_replicas} is above --max-replicas {self.max_replicas}")
        return self


def max_models_per_replica(config: ServerConfig) -> int:
    """Ray's multiplexing budget: the adapters a replica keeps in memory (its registry's memory tier), and
    never more than it may register."""
    return min(config.max_cpu_loras, config.max_adapters)


def replica_threads(config: ServerConfig, options: RayServeOptions) -> int:
    """Torch threads of a replica's model workers: --threads, else the CPUs Ray reserved for it."""
    return config.threads or max(1, int(options.cpus_per_replica))


def engine_deployment_options(config: ServerConfig, options: RayServeOptions) -> dict[str, Any]:
    """Ray Serve's options for the engine deployment: size or autoscaling, per-replica resources, flow control.
    max_queued_requests is --max-waiting: what the single server queues before its 429, queued at the ingress."""
    max_ongoing = options.max_ongoing_requests or config.max_num_seqs
    gpus = options.gpus_per_replica if options.gpus_per_replica is not None else float(config.device == "cuda")
    settings: dict[str, Any] = {
        "max_ongoing_requests": max_ongoing,
        "max_queued_requests": config.max_waiting,
        "graceful_shutdown_timeout_s": config.shutdown_timeout,
        "health_check_period_s": HEALTH_CHECK_PERIOD_S,
        "max_constructor_retry_count": CONSTRUCTOR_RETRIES,
        "ray_actor_options": {"num_cpus": options.cpus_per_replica, "num_gpus": gpus},
    }
    if options.autoscaling:
        settings["autoscaling_config"] = {
            "min_replicas": 1 if options.min_replicas is None else options.min_replicas,
            "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests or max(1.0, max_ongoing / 2),
        }
    else:
        settings["num_replicas"] = options.replicas
    return settings


def ingress_deployment_options(options: RayServeOptions) -> dict[str, Any]:
    return {"num_replicas": options.ingress_replicas, "max_ongoing_requests": INGRESS_MAX_ONGOING,
            "ray_actor_options": {"num_cpus": 0}}


def catalog_deployment_options() -> dict[str, Any]:
    """One catalog per application: it is the cluster's single writer of adapter versions and the journal."""
    return {"num_replicas": 1, "max_ongoing_requests": CATALOG_MAX_ONGOING, "ray_actor_options": {"num_cpus": 0}}


def catalog_state_dir(config: ServerConfig, app_name: str, fingerprint: str) -> Path:
    """Where the catalog journals runtime adds: beside the single server's folders, never one of them (a
    `server serve` on the same port must not restore or collect the cluster's adapters)."""
    return Path(config.state_dir).expanduser() / RUNTIME_DIR / f"ray-{app_name}-port-{config.port}-base-{fingerprint}"


def split_args(values: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Keyword arguments (a Serve config file's `args`) split into ServerConfig's and RayServeOptions'.
    ValueError naming what neither takes."""
    server = {k: v for k, v in values.items() if k in ServerConfig.model_fields}
    ray = {k: v for k, v in values.items() if k in RayServeOptions.model_fields}
    unknown = sorted(set(values) - set(server) - set(ray))
    if unknown:
        raise ValueError(f"unknown argument(s) {unknown}: args take ServerConfig and RayServeOptions field names "
                         "(`server ray-serve --help` lists them as flags)")
    return server, ray
