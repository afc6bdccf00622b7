"""Command-line parsing generated from a dataclass config: one place for names, defaults and help."""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from typing import Any, TypeVar

__all__ = ["ArgumentParser", "Derived", "add_dataclass_arguments", "dataclass_from_namespace", "parse_bool"]

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Derived:
    """A command's default that is worked out after parsing (argparse sees None); ``description`` says how."""

    description: str


class ArgumentParser(argparse.ArgumentParser):
    """An ``argparse.ArgumentParser`` whose errors are one line, ``prog: error: message``, and exit code 2.

    argparse prints the whole usage before an error; with dozens of flags that buries the message.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true",
                          help="on an error, show the full traceback instead of one line (see diffusion/cli/errors.py)")

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_bool(text: str) -> bool:
    """A command-line boolean: 1/true/yes/on or 0/false/no/off (any case); anything else is an argparse error."""
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
        return parse_bool
    if annotation is dict or origin is dict:
        return _json_dict
    if annotation in (int, float, str):
        return annotation
    raise TypeError(f"no command-line parser for the type {annotation!r}")


def add_dataclass_arguments(parser: Any, cls: type, defaults: dict[str, Any] | None = None) -> None:
    """Add ``--field-name`` for every field of ``cls`` (help from ``metadata['help']``, choices from
    ``metadata['choices']``; ``metadata['required']`` makes the option required).

    ``defaults`` replaces a field's default for this command (a task's own settings, say).  The help shows the
    default argparse will really use (``%(default)r``), so ``--help`` cannot drift from the parsed values.
    """
    hints = typing.get_type_hints(cls)
    defaults = defaults or {}
    unknown = set(defaults) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ValueError(f"defaults name no field of {cls.__name__}: {sorted(unknown)}")
    for f in dataclasses.fields(cls):
        default = defaults.get(f.name, f.default if f.default is not dataclasses.MISSING else None)
        text = f.metadata.get("help", "").replace("%", "%%")
        shown = "%(default)r"
        if isinstance(default, Derived):
            default, shown = None, default.description.replace("%", "%%")
        if f.metadata.get("required"):  # no default worth showing: the command needs the value
            parser.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_parser_for(hints[f.name]),
                                required=True, choices=f.metadata.get("choices"), metavar=f.name.upper(), help=text)
            continue
        parser.add_argument(
            "--" + f.name.replace("_", "-"), dest=f.name, type=_parser_for(hints[f.name]), default=default,
            choices=f.metadata.get("choices"), metavar=f.name.upper(), help=f"{text} (default: {shown})",
        )


def dataclass_from_namespace(cls: type[T], namespace: argparse.Namespace) -> T:
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})
