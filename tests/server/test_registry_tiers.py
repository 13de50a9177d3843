"""The memory tier over the disk tier: LRU eviction, re-reads, holds, pins, changed folders, over HTTP."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.config import ServerConfig
from adapters import AdapterError, AdapterNameError
from server.adapter_limits import AdapterLimits
from server.registry import AdapterExistsError, AdapterNotReadyError, AdapterRegistry, TorchAdapterReader
from tests.server.conftest import ADMIN


@pytest.fixture
def folders(tmp_path: Path, tiny_adapters: dict[str, Path]) -> dict[str, Path]:
    """Four adapter folders of our own (tests change some on disk)."""
    out = {}
    for name, source in (("a", "alpha"), ("b", "beta"), ("c", "alpha"), ("d", "beta")):
        out[name] = Path(shutil.copytree(tiny_adapters[source], tmp_path / name))
    return out


def _registry(base, folders, max_resident: int, **pins) -> AdapterRegistry:
    loads = []
    registry = AdapterRegistry(base, 16, max_resident, on_load=lambda result, s: loads.append(result))
    for name, path in folders.items():
        registry.add(name, path, pinned=pins.get(name, False))
    registry.loads = loads
    return registry


def test_least_recently_used_goes_to_disk_and_comes_back_identical(tiny_llama_base, folders):
    registry = _registry(tiny_llama_base, folders, 2)
    assert registry.resident_count() == 2 and registry.stats.evictions == 2
    assert not registry.is_resident("a") and registry.is_resident("d")
    original = {m: w.a.clone() for m, w in registry.resolve("c").lora.items()}
    a = registry.acquire("a")  # a miss: re-read from its folder, same version as when added
    assert registry.stats.misses == 1 and registry.loads[-1] == "reload"
    assert a.version == next(e.version for e in registry.entries() if e.name == "a")
    registry.release(a)
    c = registry.resolve("c")  # c is an alpha copy; whichever way it travelled, the weights are the same
    for module, weights in c.lora.items():
        torch.testing.assert_close(weights.a, original[module], atol=0, rtol=0)
    assert registry.resident_count() == 2


def test_a_held_adapter_is_never_evicted_and_goes_once_released(tiny_llama_base, folders):
    registry = _registry(tiny_llama_base, {"a": folders["a"]}, 1)
    held = registry.acquire("a")
    registry.add("b", folders["b"])
    registry.add("c", folders["c"])
    assert registry.is_resident("a")  # the unheld ones went instead of what a request is using
    assert registry.resident_count() == 1 and registry.stats.evictions == 2
    registry.release(held)
    registry.resolve("b")
    assert not registry.is_resident("a") and registry.is_resident("b") and registry.resident_count() == 1


def test_pinned_adapters_stay(tiny_llama_base, folders):
    registry = _registry(tiny_llama_base, folders, 1, a=True)
    assert registry.is_resident("a")


def test_a_changed_folder_is_refused_on_re_read(tiny_llama_base, folders):
    registry = _registry(tiny_llama_base, {"a": folders["a"], "b": folders["b"]}, 1)
    (folders["a"] / "adapter_config.json").write_text((folders["b"] / "adapter_config.json").read_text())
    with pytest.raises(AdapterNotReadyError, match="add it again"):
        registry.acquire("a")
    shutil.rmtree(folders["a"])
    with pytest.raises(AdapterNotReadyError, match="cannot be re-read"):
        registry.acquire("a")
    assert registry.resolve("b").name == "b"  # the others keep serving


def test_replacing_keeps_the_held_version(tiny_llama_base, folders):
    registry = _registry(tiny_llama_base, {"a": folders["a"]}, 4)
    old = registry.acquire("a")
    registry.add("a", folders["b"], replace=True)
    new = registry.resolve("a")
    assert new.version > old.version and set(old.lora) != set(new.lora)
    registry.release(old)


def test_http_serves_adapters_from_disk(tmp_path, tiny_llama_base, folders):
    config = ServerConfig(
        base=str(tiny_llama_base.prepared.path), served_name="tiny", state_dir=tmp_path / "state",
        admin_token="test-token", max_model_len=256, max_cpu_loras=1,
        adapters={name: str(path) for name, path in folders.items()},
    )
    with TestClient(create_app(config, base=tiny_llama_base)) as client:
        listed = {a["name"]: a for a in client.get("/admin/adapters", headers=ADMIN).json()}
        assert sorted(listed) == ["a", "b", "c", "d"] and [n for n, a in listed.items() if a["resident"]] == ["d"]
        assert {"a", "b", "c", "d"} <= {m["id"] for m in client.get("/v1/models").json()["data"]}
        body = {"prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
        texts = {name: client.post("/v1/completions", json={**body, "model": name}).json()["choices"][0]["text"]
                 for name in ("a", "b", "c", "a")}
        assert texts["a"] == texts["c"]  # the same weights, each re-read from disk
        metrics = client.get("/metrics").text
        assert "loraplex_adapter_cache_misses_total 4.0" in metrics
        assert 'loraplex_adapter_loads_total{result="reload"} 4.0' in metrics


# -- admission: limits, reserved names, one change per name at a time ---------------------------------

def test_rank_and_size_limits_are_checked_at_add_time_and_named(tiny_llama_base, folders):
    registry = AdapterRegistry(tiny_llama_base, 8, limits=AdapterLimits(max_rank=4))
    with pytest.raises(AdapterError, match=r"rank 8, more than the limit of 4 \(max_lora_rank"):
        registry.add("b", folders["d"], startup=True)  # limits apply to start-up adapters too (d: beta, rank 8)
    size = sum(f.stat().st_size for f in folders["b"].iterdir())
    registry = AdapterRegistry(tiny_llama_base, 8, limits=AdapterLimits(max_bytes=size - 1))
    with pytest.raises(AdapterError, match=rf"holds {size} bytes, more than the limit of {size - 1} \(max_adapter"):
        registry.add("b", folders["b"])
    assert registry.names() == []
    registry.add("a", folders["a"])  # alpha: rank 4, smaller
    assert registry.names() == ["a"]


def test_reserved_names_are_refused(tiny_llama_base, folders):
    registry = AdapterRegistry(tiny_llama_base, 8, reserved_names={"tiny"})
    with pytest.raises(AdapterNameError, match="base model's own name"):
        registry.add("tiny", folders["a"], startup=True)
    assert registry.names() == []


class _BlockingReader:
    """Reads take until `go` is set: an add stays in flight while the test does something else."""

    def __init__(self, base) -> None:
        self.inner = TorchAdapterReader(base)
        self.go = threading.Event()

    def read(self, name, source, version, pinned):
        assert self.go.wait(30)
        return self.inner.read(name, source, version, pinned)

    def digest(self, source):
        return self.inner.digest(source)


def test_a_second_change_of_a_name_in_flight_is_refused_not_raced(tiny_llama_base, folders):
    reader = _BlockingReader(tiny_llama_base)
    registry = AdapterRegistry(tiny_llama_base, 8, reader=reader)
    adding = threading.Thread(target=registry.add, args=("a", folders["a"]))
    adding.start()
    try:
        for _ in range(200):
            if registry.names():
                break
            time.sleep(0.01)
        with pytest.raises(AdapterExistsError, match="right now"):
            registry.add("a", folders["b"], replace=True)
        with pytest.raises(AdapterExistsError, match="right now"):
            registry.remove("a")
    finally:
        reader.go.set()
        adding.join(30)
    assert registry.resolve("a").rank == 4  # the first add won, whole
    registry.remove("a")
    assert registry.names() == []
