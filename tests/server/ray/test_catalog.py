"""The catalog's admin rules, on a fake set of replicas: versions, conflicts, limits, the journal, retirement."""

from __future__ import annotations

import asyncio

import pytest

from server.adapter_limits import AdapterLimits
from server.persist import RuntimeAdapters
from server.ray.catalog import AdapterCatalog
from server.ray.wire import AdminFailure, CatalogEntry, StagedAdapter, Validated


class FakeReplicas:
    """Validates everything but the names in `refuse`; records retires. `gate`, when set, holds validation."""

    def __init__(self) -> None:
        self.refuse: set[str] = set()
        self.retired: list[tuple[str, int | None]] = []
        self.validated: list[StagedAdapter] = []
        self.gate: asyncio.Event | None = None

    async def validate(self, staged: StagedAdapter):
        self.validated.append(staged)
        if self.gate is not None:
            await self.gate.wait()
        if staged.name in self.refuse:
            return AdminFailure(400, f"adapter {staged.name!r} does not fit the base", "invalid_adapter_error")
        return Validated("completion", 4)

    async def retire(self, name: str, below: int | None) -> None:
        self.retired.append((name, below))


def _catalog(tmp_path, replicas, startup=None, journal=True, max_adapters=8) -> AdapterCatalog:
    persist = RuntimeAdapters(tmp_path / "journal", "fp") if journal else None
    return AdapterCatalog(replicas, AdapterLimits(roots=(tmp_path.parent,)), max_adapters, persist, startup)


def test_versions_grow_and_replicas_retire_what_was_replaced(tmp_path, tiny_adapters):
    replicas = FakeReplicas()
    catalog = _catalog(tmp_path, replicas, startup={"alpha": str(tiny_adapters["alpha"])})

    async def run():
        assert await catalog.check_startup() == []
        first = await catalog.add("beta", str(tiny_adapters["beta"]))
        exists = await catalog.add("beta", str(tiny_adapters["alpha"]))
        second = await catalog.add("beta", str(tiny_adapters["alpha"]), replace=True)
        return first, exists, second

    first, exists, second = asyncio.run(run())
    assert isinstance(first, CatalogEntry) and first.task == "completion" and first.rank == 4
    assert isinstance(exists, AdminFailure) and exists.status == 409
    assert second.version > first.version > catalog.resolve(["alpha"])["alpha"].version
    assert replicas.retired == [("beta", second.version)]
    assert second.path != str(tiny_adapters["alpha"]) and "journal" in second.path  # served from the store copy
    assert catalog.resolve(["beta", "nobody"]) == {"beta": second, "nobody": None}


def test_refusals_leave_nothing_behind(tmp_path, tiny_adapters):
    replicas = FakeReplicas()
    replicas.refuse.add("wrong")
    catalog = _catalog(tmp_path, replicas, max_adapters=1)

    async def run():
        return [await catalog.add("wrong", str(tiny_adapters["beta"])),
                await catalog.add("bad name!", str(tiny_adapters["beta"])),
                await catalog.add("outside", "/etc"),
                await catalog.add("missing", str(tmp_path / "nothing-here")),
                await catalog.add("one", str(tiny_adapters["beta"])),
                await catalog.add("two", str(tiny_adapters["alpha"])),
                await catalog.remove("nobody")]

    wrong, bad_name, outside, missing, one, full, unknown = asyncio.run(run())
    assert (wrong.status, bad_name.status, outside.status, missing.status) == (400, 400, 400, 400)
    assert "outside the adapter roots" in outside.message
    assert isinstance(one, CatalogEntry) and full.status == 507 and unknown.status == 404
    assert [e.name for e in catalog.entries()] == ["one"]
    assert sorted(p.name for p in (tmp_path / "journal" / "store").iterdir()) == [one.digest]  # no stray copy


def test_one_change_per_name_at_a_time(tmp_path, tiny_adapters):
    replicas = FakeReplicas()
    catalog = _catalog(tmp_path, replicas)

    async def run():
        replicas.gate = asyncio.Event()
        first = asyncio.ensure_future(catalog.add("beta", str(tiny_adapters["beta"])))
        while not replicas.validated:
            await asyncio.sleep(0.01)
        second = await catalog.add("beta", str(tiny_adapters["beta"]))
        removed = await catalog.remove("beta")
        replicas.gate.set()
        return await first, second, removed

    first, second, removed = asyncio.run(run())
    assert isinstance(first, CatalogEntry)
    assert second.status == removed.status == 409 and "right now" in second.message


def test_the_journal_restores_and_start_up_failures_are_reported(tmp_path, tiny_adapters):
    replicas = FakeReplicas()
    catalog = _catalog(tmp_path, replicas)
    added = asyncio.run(catalog.add("beta", str(tiny_adapters["beta"]), pinned=True))
    replicas.refuse.add("alpha")
    again = _catalog(tmp_path, replicas, startup={"alpha": str(tiny_adapters["alpha"]), "gone": str(tmp_path / "no")})
    restored = again.resolve(["beta"])["beta"]
    assert (restored.version, restored.digest, restored.pinned, restored.task) == (added.version, added.digest, True,
                                                                                    None)
    failures = asyncio.run(again.check_startup())
    assert len(failures) == 2 and any("'gone'" in f for f in failures) and any("does not fit" in f for f in failures)
    assert [e.name for e in again.entries()] == ["beta"] and again.entries()[0].task == "completion"
    newer = asyncio.run(again.add("gamma", str(tiny_adapters["alpha"])))
    assert newer.version > added.version  # versions never go back after a restart
    assert asyncio.run(again.remove("beta")) is None and replicas.retired[-1] == ("beta", None)
    assert _catalog(tmp_path, replicas).resolve(["beta"])["beta"] is None


@pytest.mark.parametrize("journal", [False])
def test_without_a_journal_adds_are_served_from_their_folder(tmp_path, tiny_adapters, journal):
    entry = asyncio.run(_catalog(tmp_path, FakeReplicas(), journal=journal).add("beta", str(tiny_adapters["beta"])))
    assert entry.path == str(tiny_adapters["beta"].resolve())
