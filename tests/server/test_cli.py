"""The admin CLI against a live server on loopback: the token is found on this host without typing it."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest
import uvicorn

from server.api.app import create_app
from server.cli import main
from server.config import ServerConfig

STARTUP_WAIT_S = 30


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def live_server(tmp_path, monkeypatch, tiny_llama_base, tiny_adapters):
    monkeypatch.setenv("LORAPLEX_STATE", str(tmp_path / "state"))
    monkeypatch.delenv("LORAPLEX_ADMIN_TOKEN", raising=False)
    port = _free_port()
    config = ServerConfig(base="tiny", port=port, state_dir=tmp_path / "state", admin_token=None,
                          adapters={"alpha": str(tiny_adapters["alpha"])})
    server = uvicorn.Server(uvicorn.Config(create_app(config, base=tiny_llama_base), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + STARTUP_WAIT_S
    while not server.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=STARTUP_WAIT_S)


def test_add_list_remove_adapter(live_server, tiny_adapters, capsys):
    url = ["--url", live_server]
    assert main(["add-adapter", "beta", str(tiny_adapters["beta"]), *url]) == 0
    assert json.loads(capsys.readouterr().out)["state"] == "ready"
    assert main(["list-adapters", *url]) == 0
    assert sorted(a["name"] for a in json.loads(capsys.readouterr().out)) == ["alpha", "beta"]
    assert main(["add-adapter", "beta", str(tiny_adapters["beta"]), *url]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["remove-adapter", "beta", *url]) == 0
    assert main(["remove-adapter", "beta", *url]) == 1
    assert main(["add-adapter", "bad", "/does/not/exist", *url]) == 1
    assert "outside the adapter roots" in capsys.readouterr().err


def test_wrong_token_and_unreachable_server(live_server, capsys):
    assert main(["list-adapters", "--url", live_server, "--token", "wrong"]) == 1
    assert "401" in capsys.readouterr().err
    assert main(["list-adapters", "--url", f"http://127.0.0.1:{_free_port()}", "--token", "x"]) == 1
    assert "cannot reach" in capsys.readouterr().err


def test_bad_serve_arguments_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["serve", "--adapter", "no-equals-sign"])
    assert exc.value.code == 2


@pytest.mark.parametrize("problem", ["missing-folder", "base-name"])
def test_a_bad_start_up_adapter_is_one_line_and_exit_2(problem, tmp_path, tiny_llama_dir, tiny_adapters, capsys):
    """Start-up adapters are registered before serving: a bad one is a one-line error, never a traceback in
    the lifespan with the port half-open."""
    name, path = ("ok", tmp_path / "nope") if problem == "missing-folder" else (tiny_llama_dir.name,
                                                                                 tiny_adapters["alpha"])
    code = main(["serve", "--base", str(tiny_llama_dir), "--port", str(_free_port()), "--state-dir",
                 str(tmp_path / "state"), "--adapter", f"{name}={path}"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1 and "Traceback" not in err
