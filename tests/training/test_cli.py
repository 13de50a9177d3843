"""The `training` CLI: JSON on stdout when it works; one line on stderr and exit code 2 when the user erred."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from training.cli import USAGE_ERROR, main

TINY_FLAGS = ["--max-steps", "2", "--batch-size", "4", "--lora-r", "2", "--val-fraction", "0.25", "--no-progress"]


def _error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "an error message is expected on stderr"
    return err[-1]


def test_train_then_eval(tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path, capsys) -> None:
    out = tmp_path / "adapter"
    assert main(["lora", "--base", str(tiny_bert_dir), "--data", str(sentiment_csv), "--out", str(out), *TINY_FLAGS]) == 0
    trained = json.loads(capsys.readouterr().out)
    assert trained["out"] == str(out) and trained["task"] == "classification" and trained["labels"] == ["neg", "pos"]
    assert main(["eval", str(out), "--no-progress"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    assert evaluated["held_out"] == trained["metrics"]["held_out"]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_export_int8_int4(fmt: str, tiny_export_adapters, tiny_llama_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / fmt
    assert main(["export", str(tiny_export_adapters["chat"]), "--format", fmt, "--out", str(out), "--base",
                 str(tiny_llama_dir), "--perplexity-tokens", "256", "--parity-prompts", "1", "--parity-tokens", "2"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["format"] == fmt and printed["quantize"] == fmt and printed["model_file"] == "quantized.safetensors"
    assert 0.0 <= printed["parity"][fmt]["next_token_agreement"] <= 1.0 and (out / "quantization.json").is_file()


def test_export_base_only_needs_a_quantized_format(tmp_path: Path, capsys) -> None:
    assert main(["export", str(tmp_path), "--format", "onnx", "--base-only", "--out", str(tmp_path / "o")]) == USAGE_ERROR
    assert "--base-only applies to --format int8 or int4" in _error_line(capsys)
    assert not (tmp_path / "o").exists()


def _bad_csv(tmp_path: Path) -> Path:
    path = tmp_path / "bad.csv"
    path.write_text("text,label\ngood,pos\nbad,neg,oops\n")
    return path


@pytest.mark.parametrize("case, expected", [
    ("missing data", "neither a bundled data set"),
    ("malformed rows", "bad.csv:3: expected 2 fields"),
    ("unknown base", "unknown base 'no-such-base'"),
    ("bad value", "lr must be in"),
    ("completion on an encoder", "completion needs a causal LM base"),
])
def test_user_errors_are_one_line_and_exit_2(
    case: str, expected: str, tmp_path: Path, tiny_bert_dir: Path, sentiment_csv: Path, capsys
) -> None:
    args = {"--base": str(tiny_bert_dir), "--data": str(sentiment_csv), "--out": str(tmp_path / "out")}
    extra: list[str] = []
    if case == "missing data":
        args["--data"] = str(tmp_path / "missing.csv")
    elif case == "malformed rows":
        args["--data"] = str(_bad_csv(tmp_path))
    elif case == "unknown base":
        args["--base"] = "no-such-base"
    elif case == "bad value":
        extra = ["--lr", "-1"]
    else:
        args["--data"] = "chatterbot:trivia"
        extra = ["--task", "completion"]
    argv = ["lora", *[item for pair in args.items() for item in pair], *TINY_FLAGS, *extra]
    assert main(argv) == USAGE_ERROR
    line = _error_line(capsys)
    assert line.startswith("training: error: ") and expected in line, line
    assert not (tmp_path / "out").exists()


def test_eval_of_a_folder_that_is_no_adapter(tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path)]) == USAGE_ERROR
    assert "adapter_config.json is missing" in _error_line(capsys)


def test_argparse_usage_errors_exit_2(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["lora", "--base", "b"])
    assert exited.value.code == USAGE_ERROR


REQUIRED = ["--base", "b", "--data", "d", "--out", "o"]


def _parsed(*flags: str):
    from training.cli import build_parser, switch_values_as_flags

    return build_parser().parse_args(switch_values_as_flags(["lora", *REQUIRED, *flags]))


@pytest.mark.parametrize("flags, expected", [
    ((), None),  # not given: the TrainConfig default applies
    (("--gradient-checkpointing",), True),
    (("--no-gradient-checkpointing",), False),
    (("--gradient-checkpointing", "true"), True),  # the form before switches still parses
    (("--gradient-checkpointing", "false"), False),
    (("--gradient-checkpointing=yes",), True),
    (("--gradient-checkpointing=0",), False),
])
def test_bool_fields_are_switches(flags: tuple[str, ...], expected: bool | None) -> None:
    args = _parsed(*flags, "--max-steps", "3")
    assert getattr(args, "gradient_checkpointing", None) is expected and args.max_steps == 3


def test_every_bool_field_is_a_switch(capsys) -> None:
    args = _parsed("--use-rslora", "--no-use-dora", "--gradient-checkpointing", "off")
    assert (args.use_rslora, args.use_dora, args.gradient_checkpointing) == (True, False, False)
    with pytest.raises(SystemExit):
        main(["lora", "--help"])
    help_text = capsys.readouterr().out
    for name in ("gradient-checkpointing", "use-rslora", "use-dora"):
        assert f"--{name}, --no-{name}" in help_text


def test_a_switch_with_another_value_is_a_usage_error(capsys) -> None:
    with pytest.raises(SystemExit) as exited:
        _parsed("--use-rslora", "maybe")
    assert exited.value.code == USAGE_ERROR and "unrecognized arguments: maybe" in capsys.readouterr().err
