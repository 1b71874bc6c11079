"""Command-line flags generated from a dataclass: one ``--field-name`` per field, its help from the field.

A field declares its help with ``option(default, "help")``; the type comes from the annotation (``bool``: a
``--x / --no-x`` pair; ``Literal[...]``: the choices; ``Optional[T]``: T), or from ``parse=`` for text such as
comma-separated lists. Defaults are left out of the parsed namespace, so a caller can layer the given flags over
its presets; the dataclass's defaults are shown in the help.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Literal


def option(default: Any, help: str, *, parse: Callable[[str], Any] | None = None, choices=None) -> Any:
    """A dataclass field with the help (and, optionally, a text parser or choices) its flag uses."""
    metadata = {"help": help, "parse": parse, "choices": choices}
    return dataclasses.field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add one flag per field of the dataclass ``cls`` (every field must have help: ``option``)."""
    hints = typing.get_type_hints(cls)
    for field in dataclasses.fields(cls):
        kind, meta = hints[field.name], field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} has no help; declare it with option(default, help)")
        args = typing.get_args(kind)
        if type(None) in args:  # Optional[T]
            kind = next(a for a in args if a is not type(None))
            args = typing.get_args(kind)
        shown = "" if field.default is None else f" (default: {_shown(field.default)})"
        kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS, help=meta["help"] + shown)
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs.update(choices=args, type=type(args[0]))
        else:
            kwargs["type"] = meta.get("parse", kind)
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        parser.add_argument("--" + field.name.replace("_", "-"), **kwargs)


def _shown(value: Any) -> str:
    text = ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
    return text.replace("%", "%%")
