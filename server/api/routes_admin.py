"""Admin routes (bearer token): vLLM's load/unload shapes, plus the richer ones the CLI uses."""

from __future__ import annotations

from fastapi import APIRouter
from starlette.concurrency import run_in_threadpool

from server.api.schemas import AdapterInfo, AddAdapterRequest, LoadLoraRequest, UnloadLoraRequest
from server.api.state import Admin, AppState, State
from server.registry import RegistryEntry

router = APIRouter(tags=["admin"], dependencies=[Admin])


async def _add(state: AppState, name: str, path: str, replace: bool, pin: bool) -> AdapterInfo:
    await run_in_threadpool(state.registry.add, name, path, replace=replace, pinned=pin)  # metrics: on_load
    state.metrics.adapters_loaded.set(state.registry.ready_count())
    return _info(next(e for e in state.registry.entries() if e.name == name), state.registry.is_resident(name))


def _remove(state: AppState, name: str) -> None:
    state.registry.remove(name)
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
    _remove(state, body.lora_name)
    return {"status": "ok", "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}


@router.get("/admin/adapters")
async def list_adapters(state: State) -> list[AdapterInfo]:
    return [_info(e, state.registry.is_resident(e.name)) for e in state.registry.entries()]


@router.post("/admin/adapters")
async def add_adapter(body: AddAdapterRequest, state: State) -> AdapterInfo:
    return await _add(state, body.name, body.path, replace=body.replace, pin=body.pin)


@router.delete("/admin/adapters/{name}")
async def remove_adapter(name: str, state: State) -> dict:
    _remove(state, name)
    return {"status": "ok", "removed": name}
