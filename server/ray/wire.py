"""What crosses process boundaries between the ingress, the catalog and the engine replicas (Ray pickles them):
frozen dataclasses and two exceptions, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    """One adapter as the cluster knows it. `path` is what replicas read (the copy in the shared store for a
    runtime add, the folder itself for an --adapter one); `digest` is checked before each read."""

    name: str
    version: int
    path: str
    digest: str
    pinned: bool = False
    source: str = ""  # where it was added from (informational)
    task: str | None = None  # known once a replica has validated it
    rank: int | None = None
    startup: bool = False  # an --adapter one: not journaled, comes from the command line each start


@dataclass(frozen=True)
class StagedAdapter:
    """An add in progress: its files are staged at `path`, it is not visible yet."""

    name: str
    version: int
    path: str
    digest: str
    pinned: bool
    source: str


@dataclass(frozen=True)
class Validated:
    """A replica read the folder and it fits the base."""

    task: str
    rank: int


@dataclass(frozen=True)
class AdminFailure:
    """What an admin call answers instead of raising across processes: status, message, OpenAI error type."""

    status: int
    message: str
    kind: str


@dataclass(frozen=True)
class ForwardedRequest:
    """An HTTP request as the ingress received it, plus the catalog's entries (None: not in the catalog) for
    every adapter its `model` names, read when it was routed."""

    method: str
    path: str
    query_string: bytes
    headers: tuple[tuple[bytes, bytes], ...]
    body: bytes
    client: tuple[str, int] | None = None
    entries: tuple[tuple[str, CatalogEntry | None], ...] = ()


@dataclass(frozen=True)
class ResponseStart:
    """The first piece of a forwarded answer; `bytes` pieces (the body) follow."""

    status: int
    headers: tuple[tuple[bytes, bytes], ...]


@dataclass(frozen=True)
class ReplicaInfo:
    """An engine replica, for /metrics/targets and for operators (pid: what to look at, or kill, on its node)."""

    replica: str
    rank: int
    node_ip: str
    metrics_host: str
    metrics_port: int  # 0: no metrics endpoint
    pid: int


@dataclass(frozen=True)
class BaseCard:
    """The base as /v1/models shows it."""

    served_name: str
    root: str
    task: str
    created: int


class ReplicaLost(Exception):
    """The replica a request was sent to stopped (killed, crashed, drained) before it answered in full."""


class Backpressure(Exception):
    """Every replica is at max_ongoing_requests and the ingress's queue is full."""
