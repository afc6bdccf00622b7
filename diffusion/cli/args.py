"""Command-line parsing generated from a dataclass config: one place for names, defaults and help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

__all__ = ["add_dataclass_arguments", "dataclass_from_namespace"]

T = TypeVar("T")


def _bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _json_dict(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}: {err}") from err
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object, got {text!r}")
    return value


def _optional(parse: Any) -> Any:
    def inner(text: str) -> Any:
        return None if text.lower() in ("none", "null") else parse(text)

    return inner


def _parser_for(annotation: Any) -> Any:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _optional(_parser_for(args[0]))
    if annotation is bool:
        return _bool
    if annotation is dict or origin is dict:
        return _json_dict
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"no command-line parser for the type {annotation!r}")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--field-name`` for every field of ``cls`` (help from ``metadata['help']``)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else None
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_parser_for(hints[f.name]), default=default,
            metavar=f.name.upper(), help=f"{f.metadata.get('help', '')} (default: {default!r})",
        )


def dataclass_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})
