"""Admin routes (bearer token): vLLM's load/unload shapes, plus the richer ones the CLI uses.

Adds and removes run off the event loop: they read, copy and fsync files (server/persist.py). What they
refuse (a bad name, a path outside the adapter roots, a limit) is an AdapterError: 400 with the reason.
"""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.schemas import AdapterInfo, AddAdapterRequest, LoadLoraRequest, UnloadLoraRequest, error_responses
from server.api.state import Admin, AppState, State
from server.registry import AdapterState, RegistryEntry

router = APIRouter(tags=["admin"], dependencies=[Admin], responses=error_responses(400, 401, 404, 409, 500, 503, 507))


async def _add(state: AppState, name: str, path: str, replace: bool, pin: bool) -> AdapterInfo:
    loaded = await run_in_threadpool(state.registry.add, name, path, replace=replace, pinned=pin)  # metrics: on_load
    state.metrics.adapters_loaded.set(state.registry.ready_count())
    entry = next((e for e in state.registry.entries() if e.name == name and e.version == loaded.version), None)
    if entry is None:  # removed or replaced again before we answered: describe what was added
        entry = RegistryEntry(name, AdapterState.READY, loaded.source, loaded.pinned, loaded.task, loaded.rank,
                              loaded.version)
    return _info(entry, state.registry.is_resident(name))


async def _remove(state: AppState, name: str) -> None:
    await run_in_threadpool(state.registry.remove, name)
    state.metrics.adapters_loaded.set(state.registry.ready_count())


def _info(entry: RegistryEntry, resident: bool) -> AdapterInfo:
    return AdapterInfo(
        name=entry.name, state=entry.state.value, source=str(entry.source), pinned=entry.pinned,
        task=entry.task, rank=entry.rank, version=entry.version, resident=resident,
    )


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraRequest, state: State) -> dict:
    info = await _add(state, body.lora_name, body.lora_path, replace=False, pin=False)
    return {"status": "ok", "message": f"Success: LoRA adapter '{info.name}' added successfully.", "adapter": info}


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraRequest, state: State) -> dict:
    await _remove(state, body.lora_name)
    return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}


@router.get("/admin/adapters")
async def list_adapters(state: State) -> list[AdapterInfo]:
    return [_info(e, state.registry.is_resident(e.name)) for e in state.registry.entries()]


@router.post("/admin/adapters")
async def add_adapter(body: AddAdapterRequest, state: State) -> AdapterInfo:
    return await _add(state, body.name, body.path, replace=body.replace, pin=body.pin)


@router.delete("/admin/adapters/{name}")
async def remove_adapter(name: str, state: State) -> dict:
    await _remove(state, name)
    return {"status": "ok", "removed": name}
