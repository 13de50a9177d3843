"""`training METHOD ...` / `training eval ...` / `training export ...` / `training merge ...`: argparse, one-line
errors, exit code 2.

The METHOD flags are generated from TrainConfig's fields (name, type, help), so the config's help text
is the CLI's help text; a bool field is a switch (`--gradient-checkpointing` / `--no-gradient-checkpointing`).
Results go to stdout as JSON; progress bars and warnings go to stderr.
`--device` (training and eval; auto: cuda where torch sees one) is resolved once by training.device, and a
device this machine lacks is a one-line error like any other. export and merge compute on the CPU: what they
write is for CPU runtimes (ONNX Runtime, the server's int8/int4 path) and their parity checks run there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import typing
from pathlib import Path
from typing import Any, Callable, Sequence

from adapters import AdapterError, BaseNotFoundError
from adapters.manifest import MERGE_METHODS
from training.config import AUTO, FALSE_WORDS, METHODS, TRUE_WORDS, TrainConfig
from training.errors import TrainingError

USAGE_ERROR = 2  # argparse's own exit code for bad usage; user errors share it
COMMAND_FLAGS_EXCLUDED = ("method",)  # set by the sub-command itself


def _converter(annotation: Any) -> Callable[[str], Any]:
    """argparse `type=` for a TrainConfig annotation (int, float, str, Path, X | None, tuple[str, ...])."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return str  # comma-separated; TrainConfig splits it
    if args:
        return _converter(args[0])
    return annotation if annotation in (int, float, str, Path) else str


def _field_help(name: str) -> str:
    """TrainConfig's help text of field `name`, for a flag another command shares with training."""
    return next(f.metadata.get("help", "") for f in dataclasses.fields(TrainConfig) if f.name == name)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _switch_names() -> tuple[str, ...]:
    """The bool fields of TrainConfig: each is a `--flag` / `--no-flag` switch."""
    hints = typing.get_type_hints(TrainConfig)
    return tuple(f.name for f in dataclasses.fields(TrainConfig) if hints[f.name] is bool)


def _add_config_arguments(parser: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        if field.name in COMMAND_FLAGS_EXCLUDED:
            continue
        required = field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING
        help_text = field.metadata.get("help", "")
        if field.default not in (dataclasses.MISSING, None, ()):
            help_text += f" (default: {field.default})"
        if hints[field.name] is bool:
            parser.add_argument(_flag(field.name), dest=field.name, action=argparse.BooleanOptionalAction,
                                default=argparse.SUPPRESS, help=help_text)
            continue
        parser.add_argument(
            _flag(field.name), dest=field.name, type=_converter(hints[field.name]),
            required=required, default=argparse.SUPPRESS, help=help_text,
        )


def switch_values_as_flags(argv: Sequence[str]) -> list[str]:
    """`--flag true|false` and `--flag=true|false` (how the switches were given before they were switches)
    -> `--flag` / `--no-flag`, so older command lines keep working. Only a true/false word is read as the
    flag's value; any other token is left where it is, for argparse to judge."""
    switches = {_flag(name) for name in _switch_names()}
    tokens = list(argv)
    out: list[str] = []
    i = 0
    while i < len(tokens):
        flag, equals, value = tokens[i].partition("=")
        if flag in switches and not equals and i + 1 < len(tokens):
            value = tokens[i + 1]
        word = value.strip().lower()
        if flag in switches and word in TRUE_WORDS + FALSE_WORDS:
            out.append(flag if word in TRUE_WORDS else "--no-" + flag[2:])
            i += 1 if equals else 2
            continue
        out.append(tokens[i])
        i += 1
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="training", description="Train adapters from data, evaluate them.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for method in METHODS:
        sub = commands.add_parser(method, help=f"train a {method} adapter", description=f"Train a {method} adapter.")
        _add_config_arguments(sub)
        sub.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    evaluate = commands.add_parser("eval", help="print an adapter's held-out figures as JSON")
    evaluate.add_argument("adapter_dir", type=Path,
                          help="a training run's folder, any method (a stock PEFT folder needs --base and --data)")
    evaluate.add_argument("--data", help="data set name or CSV/JSONL path (default: the one it was trained on)")
    evaluate.add_argument("--base", help="base name or path (default: the manifest's base)")
    evaluate.add_argument("--split", choices=("validation", "all"), default="validation",
                          help="validation: the rows training held out; all: every row")
    evaluate.add_argument("--batch-size", type=int, help="rows per evaluation batch")
    evaluate.add_argument("--cache-dir", type=Path, help="where prepared bases are cached")
    evaluate.add_argument("--device", default=AUTO, help=_field_help("device") + f" (default: {AUTO})")
    evaluate.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    _add_export_parser(commands)
    _add_merge_parser(commands)
    return parser


def _add_merge_parser(commands: argparse._SubParsersAction) -> None:
    merge = commands.add_parser(
        "merge", help="combine LoRA adapters of one base into one adapter folder (PEFT's add_weighted_adapter)",
        description="Combine LoRA completion adapters of one base into one LoRA adapter folder, with PEFT's "
                    "add_weighted_adapter; its manifest names the parents, their weights and the method. "
                    "cat is exact (delta = sum of weight x delta, rank = sum of ranks) and equals what the server "
                    "serves for a request with model \"a:0.7+b:0.3\"; linear keeps the rank but mixes the A and B "
                    "factors (cross terms). The folder appears only once complete.")
    merge.add_argument("out", type=Path, help="adapter folder to write (replaced atomically)")
    merge.add_argument("--adapter", dest="parents", action="append", required=True, metavar="DIR=WEIGHT",
                       help="a parent adapter folder and its weight (repeat: at least two; weights may be negative)")
    merge.add_argument("--method", choices=MERGE_METHODS, required=True,
                       help="cat: exact, rank = sum of ranks; linear: rank kept, factors mixed (equal ranks and "
                            "targets); svd: exact delta truncated to --svd-rank; ties / dare_linear / dare_ties: "
                            "factors pruned to --density, then combined (equal ranks)")
    merge.add_argument("--density", type=float, help="ties / dare_*: fraction of each parent's values kept, in (0, 1]")
    merge.add_argument("--svd-rank", type=int, help="svd: rank of the merged adapter (default: the largest parent's)")
    merge.add_argument("--seed", type=int, default=0, help="seed of DARE's random pruning (default: 0)")
    merge.add_argument("--base", help="base name or path (default: the first parent's base)")
    merge.add_argument("--cache-dir", type=Path, help="where prepared bases are cached")


def _merge(args: argparse.Namespace) -> dict[str, Any]:
    from training.merge import MergeOptions, merge_adapters, parse_parent

    optional = {"cache_dir": args.cache_dir} if args.cache_dir is not None else {}
    options = MergeOptions(out=args.out, parents=tuple(parse_parent(p) for p in args.parents), method=args.method,
                           density=args.density, svd_rank=args.svd_rank, seed=args.seed, base=args.base,
                           **optional)  # checked (and refused) before torch and PEFT load the parents
    result = merge_adapters(options)
    manifest = result.manifest
    return {"out": str(result.out), "method": manifest.merge_method, "base": manifest.base_name,
            "parents": list(manifest.parents), "weights": list(manifest.weights), "rank": result.rank}


def _add_export_parser(commands: argparse._SubParsersAction) -> None:
    from training.export.options import (DEFAULT_PARITY_PROMPTS, DEFAULT_PARITY_ROWS, DEFAULT_PARITY_TOKENS,
                                          DEFAULT_PERPLEXITY_TOKENS, FORMATS, QUANTIZE)

    export = commands.add_parser(
        "export", help="write a base with one adapter merged in as a merged HF folder, an ONNX model or an "
                       "INT8/INT4 quantized checkpoint",
        description="Merge an adapter into its base and write an export folder (model, tokenizer, labels, "
                    "export_manifest.json, parity.json). The folder appears only once complete.")
    export.add_argument("adapter_dir", type=Path,
                        help="a training run's folder: lora (DoRA too), qlora, ia3, freeze or full (prompt learning "
                             "has no weights to merge); a stock PEFT folder needs --base")
    export.add_argument("--format", choices=FORMATS, default="onnx",
                        help="merged: HF folder with the adapter folded in; onnx: one ONNX graph (default); int8 / "
                             "int4: a quantized base checkpoint (quantized.safetensors + quantization.json) that "
                             "`server serve --base DIR` loads as it is")
    export.add_argument("--out", type=Path, required=True, help="export folder to write (replaced atomically)")
    export.add_argument("--quantize", choices=QUANTIZE, default="none",
                        help="int8: 8-bit weights and int8 matmuls in the ONNX graph (onnx format only)")
    export.add_argument("--base-only", action="store_true",
                        help="int8/int4: quantize the base alone, without the adapter (ADAPTER_DIR names the base)")
    export.add_argument("--base", help="base name or path (default: the manifest's base)")
    export.add_argument("--data", help="rows for the parity report (default: the adapter's own held-out rows)")
    export.add_argument("--parity-rows", type=int, default=DEFAULT_PARITY_ROWS,
                        help=f"classification rows compared (default: {DEFAULT_PARITY_ROWS})")
    export.add_argument("--parity-prompts", type=int, default=DEFAULT_PARITY_PROMPTS,
                        help=f"completion prompts decoded greedily (default: {DEFAULT_PARITY_PROMPTS})")
    export.add_argument("--parity-tokens", type=int, default=DEFAULT_PARITY_TOKENS,
                        help=f"new tokens per parity prompt (default: {DEFAULT_PARITY_TOKENS})")
    export.add_argument("--perplexity-tokens", type=int, default=DEFAULT_PERPLEXITY_TOKENS,
                        help="int8/int4 completion: held-out text tokens scored for perplexity and next-token "
                             f"agreement (default: {DEFAULT_PERPLEXITY_TOKENS})")
    export.add_argument("--opset", type=int, help="ONNX opset (default: optimum's choice)")
    export.add_argument("--threads", type=int, default=0, help="onnxruntime threads for the parity runs (0: all)")
    export.add_argument("--cache-dir", type=Path, help="where prepared bases are cached")


def _export(args: argparse.Namespace) -> dict[str, Any]:
    from training.export.options import ExportOptions

    values = {k: getattr(args, k) for k in ("base", "data", "parity_rows", "parity_prompts", "parity_tokens",
                                            "perplexity_tokens", "opset", "threads", "cache_dir", "base_only")
              if getattr(args, k) is not None}
    options = ExportOptions(adapter_dir=args.adapter_dir, out=args.out, format=args.format, quantize=args.quantize,
                            **values)  # checked (and refused) before torch and optimum load
    from training.export.runner import export_adapter

    result = export_adapter(options)
    manifest = result.manifest
    return {"out": str(result.out), "format": manifest.format, "task": manifest.task, "base": manifest.base_name,
            "adapter": manifest.adapter_name, "quantize": manifest.quantize, "model_file": manifest.model_file,
            "labels": list(manifest.labels), "parity": result.parity}


def _train(args: argparse.Namespace) -> dict[str, Any]:
    from training.runner import run_training  # heavy imports (torch, transformers) only when needed

    values = {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig) if hasattr(args, f.name)}
    config = TrainConfig(method=args.command, **values)
    result = run_training(config, progress=not args.no_progress)
    manifest = result.manifest
    return {"out": str(result.out), "task": manifest.task, "base": manifest.base_name,
            "labels": list(manifest.labels), "metrics": manifest.metrics}


def _evaluate(args: argparse.Namespace) -> dict[str, Any]:
    from training.evaluate import evaluate_adapter

    return evaluate_adapter(args.adapter_dir, data=args.data, base=args.base, split=args.split,
                            cache_dir=args.cache_dir, batch_size=args.batch_size, progress=not args.no_progress,
                            device=args.device)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the exit code (0 ok, 2 bad usage or input the user can fix)."""
    args = build_parser().parse_args(switch_values_as_flags(sys.argv[1:] if argv is None else argv))
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        if args.command == "eval":
            result = _evaluate(args)
        elif args.command == "export":
            result = _export(args)
        elif args.command == "merge":
            result = _merge(args)
        else:
            result = _train(args)
    except (TrainingError, BaseNotFoundError, AdapterError) as exc:
        print(f"training: error: {exc}", file=sys.stderr)
        return USAGE_ERROR
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
