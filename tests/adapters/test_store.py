"""Atomic folder writes and the named adapter store."""

from __future__ import annotations

import pytest

from adapters import AdapterNameError, AdapterStore, atomic_directory, read_adapter_folder


def _listing(folder) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_atomic_directory_creates_a_new_folder(tmp_path):
    dest = tmp_path / "deep" / "out"
    with atomic_directory(dest) as tmp:
        assert tmp.parent == dest.parent and tmp != dest and not dest.exists()  # invisible until done
        (tmp / "a.txt").write_text("one")
    assert (dest / "a.txt").read_text() == "one"
    assert _listing(dest.parent) == ["out"]


def test_atomic_directory_failure_on_a_new_folder_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError, match="crash"):
        with atomic_directory(tmp_path / "out") as tmp:
            (tmp / "half.txt").write_text("half")
            raise RuntimeError("crash mid-write")
    assert _listing(tmp_path) == []


def test_atomic_directory_replaces_on_success_and_keeps_the_old_on_failure(tmp_path):
    dest = tmp_path / "out"
    with atomic_directory(dest) as tmp:
        (tmp / "a.txt").write_text("one")
    with atomic_directory(dest) as tmp:
        (tmp / "b.txt").write_text("two")
    assert _listing(dest) == ["b.txt"]  # replaced whole, not merged
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(dest) as tmp:
            (tmp / "c.txt").write_text("half")
            raise KeyboardInterrupt
    assert _listing(dest) == ["b.txt"]
    assert _listing(tmp_path) == ["out"]  # no temporary or moved-aside folder left behind


def test_store_install_replace_names_remove(tmp_path, peft_folder):
    store = AdapterStore(tmp_path / "store")
    assert store.names() == []
    path = store.install("tenant-1", peft_folder)
    assert path == tmp_path / "store" / "tenant-1"
    assert _listing(path) == _listing(peft_folder)
    assert sorted(read_adapter_folder(path).lora) == sorted(read_adapter_folder(peft_folder).lora)

    replacement = tmp_path / "v2"
    replacement.mkdir()
    (replacement / "adapter_config.json").write_text('{"v": 2}')
    store.install("tenant-1", replacement)
    store.install("tenant-0", replacement)
    assert _listing(store.path("tenant-1")) == ["adapter_config.json"]  # the old version's files are gone
    assert store.names() == ["tenant-0", "tenant-1"]
    assert _listing(store.root) == ["tenant-0", "tenant-1"]

    assert store.remove("tenant-1") is True
    assert store.remove("tenant-1") is False
    assert store.names() == ["tenant-0"]


def test_store_names_skip_hidden_temporary_folders(tmp_path):
    store = AdapterStore(tmp_path)
    (tmp_path / ".one.tmp-abc").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "stray-file").write_text("x")
    assert store.names() == ["real"]


def test_failed_install_keeps_the_previous_version(tmp_path, peft_folder):
    store = AdapterStore(tmp_path / "store")
    store.install("a", peft_folder)
    with pytest.raises(FileNotFoundError):
        store.install("a", tmp_path / "does-not-exist")
    assert _listing(store.path("a")) == _listing(peft_folder)
    assert _listing(store.root) == ["a"]


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "/abs", ".hidden", "a\\b"])
def test_store_refuses_path_traversal(tmp_path, peft_folder, name):
    store = AdapterStore(tmp_path / "store")
    (tmp_path / "victim").mkdir()
    with pytest.raises(AdapterNameError):
        store.install(name, peft_folder)
    with pytest.raises(AdapterNameError):
        store.remove(name)
    with pytest.raises(AdapterNameError):
        store.path(name)
    assert (tmp_path / "victim").is_dir() and _listing(tmp_path) == ["victim"]


def test_atomic_write_text_replaces_whole_and_leaves_no_temporary(tmp_path):
    from adapters.store import atomic_write_text

    target = tmp_path / "journal.json"
    atomic_write_text(target, "one", mode=0o600)
    atomic_write_text(target, "two", mode=0o600)
    assert target.read_text() == "two" and (target.stat().st_mode & 0o777) == 0o600
    assert _listing(tmp_path) == ["journal.json"]


def test_sweep_removes_what_a_killed_writer_left_and_nothing_else(tmp_path, peft_folder):
    store = AdapterStore(tmp_path)
    store.install("kept", peft_folder)
    (tmp_path / ".half.tmp-abc").mkdir()
    (tmp_path / ".half.tmp-abc" / "adapter_config.json").write_text("{")
    (tmp_path / ".kept.old-1-2").mkdir()
    (tmp_path / ".unrelated").write_text("mine")
    assert store.sweep() == [".half.tmp-abc", ".kept.old-1-2"]
    assert _listing(tmp_path) == [".unrelated", "kept"] and store.names() == ["kept"]
