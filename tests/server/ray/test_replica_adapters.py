"""A replica's share of the catalog on its own registry: catalog versions, the version rule, deferred retires."""

from __future__ import annotations

import asyncio

from adapters import folder_digest
from server.ray.replica_adapters import AdapterLoadFailed, ReplicaAdapters
from server.ray.wire import CatalogEntry
from server.registry import AdapterRegistry, UnknownAdapterError


def _entry(name, path, version) -> CatalogEntry:
    return CatalogEntry(name, version, str(path), folder_digest(path))


def test_a_request_keeps_its_version_and_retires_wait_for_its_window(tiny_llama_base, tiny_adapters):
    adapters = ReplicaAdapters(AdapterRegistry(tiny_llama_base, 8))
    registry = adapters.registry
    v3, v7 = _entry("a", tiny_adapters["alpha"], 3), _entry("a", tiny_adapters["beta"], 7)

    async def run():
        async with adapters.using(["a"]):
            await adapters.ensure({"a": v3})
            admitted = registry.acquire("a")  # the request's hold, as a route takes it
            await adapters.ensure({"a": v7})  # a request routed after a replace, on this replica
            await adapters.ensure({"a": v3})  # one routed just before it: the newer version serves it
            await adapters.retire("a", None)  # a remove meanwhile: waits for the window
            still = registry.resolve("a").version
        await asyncio.sleep(0.1)  # the deferred retire runs once the window closes
        return admitted, still

    admitted, still = asyncio.run(run())
    assert admitted.version == 3 and admitted.rank == 4  # the admitted request's version, unchanged
    assert still == 7
    assert "a" not in adapters.held and "a" not in registry.names()
    registry.release(admitted)


def test_unknown_names_are_dropped_and_bad_entries_refused(tiny_llama_base, tiny_adapters, tmp_path):
    adapters = ReplicaAdapters(AdapterRegistry(tiny_llama_base, 8))

    async def run():
        await adapters.ensure({"a": _entry("a", tiny_adapters["alpha"], 1)})
        await adapters.ensure({"a": None})
        try:
            await adapters.ensure({"b": CatalogEntry("b", 2, str(tiny_adapters["beta"]), "not-its-digest")})
        except AdapterLoadFailed as exc:
            return str(exc)
        return ""

    message = asyncio.run(run())
    assert "files changed" in message and adapters.loads == {"a": 1}
    try:
        adapters.registry.resolve("a")
        raise AssertionError("a was not dropped")
    except UnknownAdapterError:
        pass


def test_multiplexing_evictions_spare_what_is_still_multiplexed(tiny_llama_base, tiny_adapters):
    adapters = ReplicaAdapters(AdapterRegistry(tiny_llama_base, 8))

    async def run():
        await adapters.ensure({"a": _entry("a", tiny_adapters["alpha"], 1), "b": _entry("b", tiny_adapters["beta"], 2)})
        alone = adapters.token("a", ("a",))
        combined = adapters.token("a+b", ("a", "b"))
        combined.__del__()  # Ray's LRU lets the combination go: b goes, a is still multiplexed
        await asyncio.sleep(0.1)
        held_after_combination = sorted(adapters.held)
        alone.__del__()
        alone.__del__()  # the garbage collector may call it again
        await asyncio.sleep(0.1)
        return held_after_combination, sorted(adapters.held)

    assert asyncio.run(run()) == (["a"], [])
