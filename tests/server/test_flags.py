"""`server serve`'s flags come from ServerConfig: every field is a flag or marked as not one, with its help;
a flag beats the environment, which beats the default."""

from __future__ import annotations

import argparse

import pytest

from server.cli import build_parser
from server.config import ServerConfig
from server.flags import add_config_flags, config_values, flag_name, is_flag


def _serve_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(["serve", *argv])


def test_every_field_is_a_flag_with_help_or_marked_not_one():
    parser = argparse.ArgumentParser()
    add_config_flags(parser, ServerConfig)
    known = {opt for action in parser._actions for opt in action.option_strings}
    for name, info in ServerConfig.model_fields.items():
        assert info.description, f"ServerConfig.{name} has no description (it is the flag's help)"
        if is_flag(info):
            assert flag_name(name, info) in known


def test_flags_reach_the_config_and_unset_ones_keep_its_defaults():
    config = ServerConfig(**config_values(_serve_args(["--max-num-seqs", "3", "--merge", "--dtype", "float32",
                                                       "--adapter", "a=/x", "--adapter", "b=/y"]), ServerConfig))
    assert (config.max_num_seqs, config.merge, config.dtype) == (3, True, "float32")
    assert config.adapters == {"a": "/x", "b": "/y"}
    assert config.max_loras == ServerConfig.model_fields["max_loras"].default


def test_a_flag_beats_the_environment_and_the_environment_beats_the_default(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_NUM_SEQS", "5")
    assert ServerConfig(**config_values(_serve_args([]), ServerConfig)).max_num_seqs == 5
    assert ServerConfig(**config_values(_serve_args(["--max-num-seqs", "7"]), ServerConfig)).max_num_seqs == 7


def test_a_repeated_adapter_name_and_a_bad_choice_are_refused():
    with pytest.raises(ValueError, match="given twice"):
        config_values(_serve_args(["--adapter", "a=/x", "--adapter", "a=/y"]), ServerConfig)
    with pytest.raises(SystemExit):
        _serve_args(["--quant", "int3"])


def test_secrets_are_not_flags():
    assert not is_flag(ServerConfig.model_fields["admin_token"])
