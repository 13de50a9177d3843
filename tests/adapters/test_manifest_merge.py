"""The manifest's merge fields (a `training merge` folder): parents, one weight each, the method; validated."""

from __future__ import annotations

import pytest

from adapters import AdapterFormatError, Manifest, read_manifest, write_manifest
from tests.adapters.peft_folders import copy_folder


def _merged(**overrides) -> Manifest:
    fields = {"task": "completion", "base_name": "tiny", "base_fingerprint": "abc", "parents": ("a", "b"),
              "weights": (0.7, -0.3), "merge_method": "cat"}
    return Manifest(**{**fields, **overrides})


def test_merge_fields_round_trip(tmp_path, peft_folder):
    folder = copy_folder(peft_folder, tmp_path / "merged")
    written = write_manifest(folder, _merged())
    read = read_manifest(folder)
    assert read == written
    assert (read.parents, read.weights, read.merge_method, read.method) == (("a", "b"), (0.7, -0.3), "cat", "lora")


def test_a_trained_folder_names_no_parents():
    trained = Manifest(task="completion", base_name="tiny", base_fingerprint="abc")
    assert (trained.parents, trained.weights, trained.merge_method) == ((), (), "")
    with pytest.raises(AdapterFormatError, match="no merge_method"):
        Manifest(task="completion", base_name="tiny", base_fingerprint="abc", parents=("a", "b"), weights=(1, 1))


@pytest.mark.parametrize("overrides, message", [
    ({"merge_method": "average"}, "merge_method must be one of"),
    ({"method": "ia3"}, "is a LoRA folder"),
    ({"parents": ("a",), "weights": (1.0,)}, "at least 2 parents"),
    ({"parents": ("a", "a")}, "distinct non-empty names"),
    ({"parents": ("a", "")}, "distinct non-empty names"),
    ({"weights": (1.0,)}, "2 parents but 1 weights"),
    ({"weights": (1.0, float("nan"))}, "finite numbers"),
    ({"weights": (1.0, True)}, "finite numbers"),
    ({"weights": (1.0, "2")}, "finite numbers"),
    ({"parents": "ab"}, "parents must be a list"),
])
def test_bad_merge_fields_are_refused(overrides, message):
    with pytest.raises(AdapterFormatError, match=message):
        _merged(**overrides)

