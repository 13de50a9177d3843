"""Runtime adapters survive a restart: copied into the state dir and journaled before they are
acknowledged; a killed add leaves nothing that would be loaded; other ports and bases are not touched."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from adapters import AdapterError, folder_digest

from server.api.app import create_app
from server.config import ServerConfig
from server.persist import JOURNAL_FILE, PersistedAdapter, RuntimeAdapters, runtime_state_dir
from tests.server.conftest import ADMIN

PORT = 8000


@pytest.fixture
def adapter_dir(tmp_path: Path, tiny_adapters: dict[str, Path]) -> Path:
    """alpha (served from the command line) and copies the tests add, change and delete, in one root."""
    root = tmp_path / "adapters"
    for name, source in (("alpha", "alpha"), ("one", "alpha"), ("two", "beta")):
        shutil.copytree(tiny_adapters[source], root / name)
    return root


def _config(tmp_path: Path, base, adapter_dir: Path, port: int = PORT) -> ServerConfig:
    return ServerConfig(base=str(base.prepared.path), served_name="tiny", port=port, state_dir=tmp_path / "state",
                        admin_token="test-token", max_model_len=256, adapters={"alpha": str(adapter_dir / "alpha")})


def _client(config: ServerConfig, base) -> TestClient:
    return TestClient(create_app(config, base=base))


def _adapters(client) -> dict[str, dict]:
    return {a["name"]: a for a in client.get("/admin/adapters", headers=ADMIN).json()}


def _text(client, model: str) -> str:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 4, "temperature": 0}
    answer = client.post("/v1/completions", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["choices"][0]["text"]


def _state(tmp_path: Path, base, port: int = PORT) -> Path:
    return runtime_state_dir(tmp_path / "state", port, base.signature.fingerprint)


def test_runtime_adapters_come_back_after_a_restart_even_with_their_source_deleted(tmp_path, tiny_llama_base,
                                                                                   adapter_dir):
    config = _config(tmp_path, tiny_llama_base, adapter_dir)
    with _client(config, tiny_llama_base) as client:
        added = client.post("/admin/adapters", headers=ADMIN,
                            json={"name": "one", "path": str(adapter_dir / "one"), "pin": True})
        assert added.status_code == 200, added.text
        before = {"one": _text(client, "one"), "alpha": _text(client, "alpha")}
        versions = {n: a["version"] for n, a in _adapters(client).items()}
    shutil.rmtree(adapter_dir / "one")  # the copy in the state dir is what is served now
    with _client(config, tiny_llama_base) as client:
        listed = _adapters(client)
        assert sorted(listed) == ["alpha", "one"] and listed["one"]["pinned"] and listed["one"]["state"] == "ready"
        assert listed["one"]["version"] == versions["one"]
        assert {name: _text(client, name) for name in before} == before
        replaced = client.post("/admin/adapters", headers=ADMIN,
                               json={"name": "one", "path": str(adapter_dir / "two"), "replace": True})
        assert replaced.status_code == 200 and replaced.json()["version"] > versions["one"]  # never reused
    journal = json.loads((_state(tmp_path, tiny_llama_base) / JOURNAL_FILE).read_text())
    assert [(a["name"], a["pinned"]) for a in journal["adapters"]] == [("one", False)]  # alpha: command line only
    with _client(config, tiny_llama_base) as client:
        assert _adapters(client)["one"]["rank"] == 8  # the replacement (beta's rank), not the first one
        assert client.delete("/admin/adapters/one", headers=ADMIN).status_code == 200
    with _client(config, tiny_llama_base) as client:
        assert sorted(_adapters(client)) == ["alpha"]
    store = _state(tmp_path, tiny_llama_base) / "store"
    assert list(store.iterdir()) == []  # removed: its copy went with it


def test_a_runtime_replace_of_a_start_up_adapter_survives_and_removing_it_brings_the_command_line_back(
        tmp_path, tiny_llama_base, adapter_dir):
    config = _config(tmp_path, tiny_llama_base, adapter_dir)
    with _client(config, tiny_llama_base) as client:
        assert client.post("/admin/adapters", headers=ADMIN, json={"name": "alpha", "path": str(adapter_dir / "two"),
                                                                   "replace": True}).status_code == 200
    with _client(config, tiny_llama_base) as client:
        assert _adapters(client)["alpha"]["rank"] == 8  # acknowledged later than the command line was read
        assert client.delete("/admin/adapters/alpha", headers=ADMIN).status_code == 200
    with _client(config, tiny_llama_base) as client:
        assert _adapters(client)["alpha"]["rank"] == 4  # the command line's, again


def test_servers_on_other_ports_or_bases_do_not_load_each_others_adapters(tmp_path, tiny_llama_base, adapter_dir):
    with _client(_config(tmp_path, tiny_llama_base, adapter_dir), tiny_llama_base) as client:
        assert client.post("/admin/adapters", headers=ADMIN,
                           json={"name": "one", "path": str(adapter_dir / "one")}).status_code == 200
    with _client(_config(tmp_path, tiny_llama_base, adapter_dir, port=PORT + 1), tiny_llama_base) as client:
        assert sorted(_adapters(client)) == ["alpha"]
    assert _state(tmp_path, tiny_llama_base) != runtime_state_dir(tmp_path / "state", PORT, "another-base")


def test_what_a_killed_add_leaves_is_cleaned_and_bad_entries_are_skipped(tmp_path, tiny_llama_base, adapter_dir,
                                                                         caplog):
    config = _config(tmp_path, tiny_llama_base, adapter_dir)
    with _client(config, tiny_llama_base) as client:
        for name in ("one", "two"):
            assert client.post("/admin/adapters", headers=ADMIN,
                               json={"name": name, "path": str(adapter_dir / name)}).status_code == 200
    state = _state(tmp_path, tiny_llama_base)
    store = state / "store"
    journal = json.loads((state / JOURNAL_FILE).read_text())
    digests = {a["name"]: a["digest"] for a in journal["adapters"]}
    # what kill -9 leaves at each point of an add: a half-copied folder, a copy no entry names, a journal tmp
    (store / f".{'d' * 64}.tmp-x1").mkdir()
    (store / f".{'d' * 64}.tmp-x1" / "adapter_config.json").write_text("{")
    shutil.copytree(adapter_dir / "alpha", store / ("e" * 64))
    (state / f".{JOURNAL_FILE}.tmp-x2").write_text("{")
    # and entries that no longer validate: a changed copy, a missing copy, a name that is now the base's
    (store / digests["two"] / "adapter_config.json").write_text("{}")
    journal["adapters"] += [{**journal["adapters"][0], "name": "ghost", "digest": "f" * 64},
                            {**journal["adapters"][0], "name": "tiny"}, {"name": "../x"}]
    (state / JOURNAL_FILE).write_text(json.dumps(journal))
    with caplog.at_level(logging.WARNING), _client(config, tiny_llama_base) as client:
        assert sorted(_adapters(client)) == ["alpha", "one"]  # start-up did not fail
        assert _text(client, "one")
    for name in ("two", "ghost", "tiny", "../x"):
        assert name in caplog.text
    assert sorted(p.name for p in store.iterdir()) == sorted({digests["one"], digests["two"]})
    assert sorted(p.name for p in state.iterdir()) == [JOURNAL_FILE, "store"]
    skipped = {a["name"] for a in json.loads((state / JOURNAL_FILE).read_text())["adapters"]}
    assert {"two", "ghost"} <= skipped  # kept for a later start; removing it forgets it
    with _client(config, tiny_llama_base) as client:
        assert client.delete("/admin/adapters/two", headers=ADMIN).status_code == 200
    assert "two" not in {a["name"] for a in json.loads((state / JOURNAL_FILE).read_text())["adapters"]}


def test_an_unreadable_journal_is_moved_aside_and_the_server_starts(tmp_path, tiny_llama_base, adapter_dir):
    config = _config(tmp_path, tiny_llama_base, adapter_dir)
    with _client(config, tiny_llama_base) as client:
        assert client.post("/admin/adapters", headers=ADMIN,
                           json={"name": "one", "path": str(adapter_dir / "one")}).status_code == 200
    state = _state(tmp_path, tiny_llama_base)
    (state / JOURNAL_FILE).write_text("{not json")
    copies = sorted(p.name for p in (state / "store").iterdir())
    with _client(config, tiny_llama_base) as client:
        assert sorted(_adapters(client)) == ["alpha"]
        assert client.post("/admin/adapters", headers=ADMIN,
                           json={"name": "two", "path": str(adapter_dir / "two")}).status_code == 200
    assert [p.name for p in state.glob(f"{JOURNAL_FILE}.unreadable-*")]
    assert set(copies) <= {p.name for p in (state / "store").iterdir()}  # nothing a person may want is deleted


def test_a_failed_add_leaves_no_copy_and_no_entry(tmp_path, tiny_llama_base, adapter_dir):
    config = _config(tmp_path, tiny_llama_base, adapter_dir)
    wide = adapter_dir / "nan"
    shutil.copytree(adapter_dir / "one", wide)
    (wide / "adapter_config.json").write_text((adapter_dir / "one" / "adapter_config.json").read_text()
                                              .replace('"r": 4', '"r": 5'))
    with _client(config, tiny_llama_base) as client:
        refused = client.post("/admin/adapters", headers=ADMIN, json={"name": "bad", "path": str(wide)})
        assert refused.status_code == 400, refused.text
    state = _state(tmp_path, tiny_llama_base)
    assert list((state / "store").iterdir()) == [] and not (state / JOURNAL_FILE).exists()


def test_runtime_adapters_unit_commit_forget_and_collect(tmp_path):
    digest_of = lambda folder: (folder / "adapter_config.json").read_text().strip() * 8  # 64 hex chars
    source = tmp_path / "src"
    source.mkdir()
    (source / "adapter_config.json").write_text("abcdef01")
    state = RuntimeAdapters(tmp_path / "state", "fp")
    copy = state.stage(source, digest_of(source), digest_of)
    assert copy.is_dir() and state.records() == []
    state.commit(PersistedAdapter("a", digest_of(source), False, 3, str(source)))
    state.commit(PersistedAdapter("b", digest_of(source), True, 4, str(source)))  # shares the copy
    assert state.forget("a") and copy.is_dir()
    assert state.forget("b") and not copy.exists()
    assert not state.forget("b")
    with pytest.raises(AdapterError, match="changed while it was being added"):
        state.stage(source, "0" * 64, digest_of)
    assert list((tmp_path / "state" / "store").iterdir()) == []
    assert RuntimeAdapters(tmp_path / "state", "other-base").records() == []  # a journal of another base is not read


# -- a real server process, killed with SIGKILL in the middle of an add --------------------------------


REPO = Path(__file__).resolve().parents[2]
START_WAIT_S = 180  # two cores shared with other work: torch import and the base load can be slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _Server:
    def __init__(self, base_dir: Path, state_dir: Path, alpha: Path, log: Path, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        args = [sys.executable, "-m", "server.cli", "serve", "--base", str(base_dir), "--port", str(self.port),
                "--adapter", f"alpha={alpha}", "--state-dir", str(state_dir), "--device", "cpu",
                "--served-name", "tiny", "--log-level", "warning"]
        env = {**os.environ, "LORAPLEX_ADMIN_TOKEN": "test-token"}
        self.log = open(log, "ab")
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + START_WAIT_S
        while True:
            assert self.proc.poll() is None, f"server exited: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"server did not start: {log.read_text()[-3000:]}"
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)

    def add(self, name: str, path: Path, **extra) -> httpx.Response:
        return httpx.post(f"{self.url}/admin/adapters", headers=ADMIN, timeout=120,
                          json={"name": name, "path": str(path), **extra})

    def kill_during_add(self, name: str, path: Path, delay_s: float, **extra) -> None:
        """Send the add's request whole, then SIGKILL the server `delay_s` later, without reading an answer."""
        body = json.dumps({"name": name, "path": str(path), **extra}).encode()
        head = (f"POST /admin/adapters HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer test-token\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        with socket.create_connection(("127.0.0.1", self.port)) as sock:
            sock.sendall(head + body)
            time.sleep(delay_s)
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)
        self.log.close()


def _check_after_restart(server: _Server, state: Path, acknowledged: dict[str, int], in_flight: dict[str, set[int]]):
    """The adapters are exactly the acknowledged ones, plus (whole, serving) an in-flight one whose journal
    commit happened before the kill; the state dir holds nothing half-written or unreferenced."""
    listed = {a["name"]: a for a in httpx.get(f"{server.url}/admin/adapters", headers=ADMIN, timeout=30).json()}
    runtime = {name: a["rank"] for name, a in listed.items() if name != "alpha"}
    for name, rank in acknowledged.items():
        assert runtime.get(name) in {rank} | in_flight.get(name, set()), (name, runtime)
    assert set(runtime) <= set(acknowledged) | set(in_flight), runtime
    for name, rank in runtime.items():
        assert rank in {acknowledged.get(name)} | in_flight.get(name, set())
        body = {"model": name, "prompt": "Once", "max_tokens": 2}
        assert httpx.post(f"{server.url}/v1/completions", json=body, timeout=60).status_code == 200
    journal = json.loads((state / JOURNAL_FILE).read_text())
    assert sorted(a["name"] for a in journal["adapters"]) == sorted(runtime)
    assert sorted(p.name for p in (state / "store").iterdir()) == sorted({a["digest"] for a in journal["adapters"]})
    assert not [p for p in state.iterdir() if p.name.startswith(".")]
    return runtime


def _visible_copies_are_whole(state: Path) -> None:
    """Right after the kill: any folder a start could load (not hidden) is a complete copy."""
    for copy in (state / "store").iterdir() if (state / "store").is_dir() else ():
        if not copy.name.startswith("."):
            assert folder_digest(copy) == copy.name


def test_sigkill_in_the_middle_of_an_add_or_replace_loses_nothing_acknowledged(tmp_path, tiny_llama_dir,
                                                                                tiny_adapters):
    from adapters.fingerprint import fingerprint_base_folder

    sources = tmp_path / "adapters"
    for name, source in (("alpha", "alpha"), ("one", "alpha"), ("two", "beta")):
        shutil.copytree(tiny_adapters[source], sources / name)
    state_root, log = tmp_path / "state", tmp_path / "server.log"
    servers = []
    try:
        server = _Server(tiny_llama_dir, state_root, sources / "alpha", log)
        servers.append(server)
        state = runtime_state_dir(state_root, server.port, fingerprint_base_folder(tiny_llama_dir))
        assert server.add("one", sources / "one", pin=True).status_code == 200
        acknowledged = {"one": 4}
        server.kill_during_add("two", sources / "two", delay_s=0.0)
        _visible_copies_are_whole(state)
        port = server.port

        server = _Server(tiny_llama_dir, state_root, sources / "alpha", log, port)  # same port: the state's key
        servers.append(server)
        runtime = _check_after_restart(server, state, acknowledged, {"two": {8}})
        acknowledged = {**acknowledged, **({"two": 8} if "two" in runtime else {})}
        shutil.rmtree(sources / "one")  # served from the state dir's copy from now on
        server.kill_during_add("one", sources / "two", delay_s=0.05, replace=True)  # a replace, killed
        _visible_copies_are_whole(state)

        server = _Server(tiny_llama_dir, state_root, sources / "alpha", log, port)
        servers.append(server)
        _check_after_restart(server, state, acknowledged, {"one": {8}})
    finally:
        for running in servers:
            running.stop()

