"""`server serve`'s flags, derived from ServerConfig's fields: the config is the one source of names,
types, choices, defaults and help text, so a setting added there is a flag without touching the CLI.

The mapping: `max_num_seqs` -> `--max-num-seqs` (or the field's `json_schema_extra["flag"]`); a bool is a
switch (`--merge` / `--no-merge`); a Literal is a choice; `X | None` takes an X; a list is repeatable; a
`dict[str, str]` is repeatable `NAME=VALUE`. Only the flags the user gave reach ServerConfig (the others stay
argparse.SUPPRESS), so the environment (`LORAPLEX_<FIELD>`) still beats the default and a flag beats both.
"""

from __future__ import annotations

import argparse
import types
import typing
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

SCALARS = (int, float, str, Path)


def flag_name(name: str, info: FieldInfo) -> str:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return str(extra.get("flag") or "--" + name.replace("_", "-"))


def is_flag(info: FieldInfo) -> bool:
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    return extra.get("cli", True) is not False


def pair(text: str) -> tuple[str, str]:
    """`NAME=VALUE` for a dict field's repeatable flag."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise argparse.ArgumentTypeError(f"expected NAME=VALUE, got {text!r}")
    return name, value


def _without_none(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        rest = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _default_text(info: FieldInfo) -> str:
    if info.default_factory is not None:
        try:
            value = info.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return ""
    elif info.default is PydanticUndefined:
        return ""
    else:
        value = info.default
    if value in (None, {}, [], "") or info.repr is False:
        return ""
    return f" (default: {value})"


def _argument(name: str, info: FieldInfo) -> dict[str, Any]:
    """argparse keywords for one field."""
    help_text = (info.description or name.replace("_", " ")) + _default_text(info)
    kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
    annotation = _without_none(info.annotation)
    origin = typing.get_origin(annotation)
    extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
    if "metavar" in extra:
        kwargs["metavar"] = extra["metavar"]
    if annotation is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif origin is Literal:
        kwargs["choices"] = list(typing.get_args(annotation))
    elif origin is dict:
        kwargs.update(action="append", type=pair)
    elif origin is list:
        (item,) = typing.get_args(annotation)
        kwargs.update(action="append", type=_without_none(item))
    elif annotation in SCALARS:
        kwargs["type"] = annotation
    else:
        raise TypeError(f"ServerConfig.{name}: no flag for a field of type {info.annotation!r}")
    return kwargs


def add_config_flags(parser: argparse.ArgumentParser, config_cls: type[BaseModel]) -> None:
    for name, info in config_cls.model_fields.items():
        if is_flag(info):
            parser.add_argument(flag_name(name, info), **_argument(name, info))


def config_values(args: argparse.Namespace, config_cls: type[BaseModel]) -> dict[str, Any]:
    """The flags the user gave, as ServerConfig keyword arguments. A repeated dict key is an error."""
    values: dict[str, Any] = {}
    for name, info in config_cls.model_fields.items():
        if not hasattr(args, name):
            continue
        value = getattr(args, name)
        if typing.get_origin(_without_none(info.annotation)) is dict:
            keys = [key for key, _ in value]
            if len(set(keys)) != len(keys):
                raise ValueError(f"{flag_name(name, info)}: a name was given twice")
            value = dict(value)
        values[name] = value
    return values
