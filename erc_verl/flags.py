"""Command-line flags generated from a config dataclass: the one way ``erc-verl demo``/``sweep`` and the benchmarks
turn their typed configs into ``--flags``, as TRL's ``HfArgumentParser`` does for its configs.

A field declares its flag with ``option(default, "help", ...)``; its type comes from the annotation (``bool``: a
``--x / --no-x`` pair; ``Literal[...]``: the choices; ``Optional[T]``: T), or from ``parse=`` for text such as
comma-separated lists. Flags not given stay out of the parsed namespace, so the dataclass's defaults (or a preset a
command layers under the flags, as the overhead benchmark does) apply; the help shows the defaults. The dataclass checks its own values; a
``ValueError`` it raises becomes argparse's usage error (one line, exit 2) in :func:`config_from_args`.
"""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, Callable, Literal, Optional


def option(default: Any, help: str, *, parse: Optional[Callable[[str], Any]] = None, choices=None,
           group: Optional[str] = None, metavar: Optional[str] = None,
           show: Optional[Callable[[Any], str]] = None) -> Any:
    """A dataclass field with what its flag needs: help, and optionally a text parser, choices, an argument
    group in ``--help``, a metavar and how the default is shown."""
    metadata = dict(help=help, parse=parse, choices=choices, group=group, metavar=metavar, show=show)
    return dataclasses.field(default=default, metadata={k: v for k, v in metadata.items() if v is not None})


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> argparse.ArgumentParser:
    """One ``--field-name`` per field of the dataclass ``cls`` (each declared with :func:`option`)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for field in dataclasses.fields(cls):
        kind, meta = hints[field.name], field.metadata
        if "help" not in meta:
            raise TypeError(f"{cls.__name__}.{field.name} has no help; declare it with option(default, help)")
        args = typing.get_args(kind)
        if type(None) in args:  # Optional[T]
            kind = next(a for a in args if a is not type(None))
            args = typing.get_args(kind)
        shown = "" if field.default is None else f" (default: {meta.get('show', _shown)(field.default)})"
        kwargs: dict[str, Any] = dict(dest=field.name, default=argparse.SUPPRESS,
                                      help=(meta["help"] + shown).replace("%", "%%"))  # argparse formats help
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif typing.get_origin(kind) is Literal:
            kwargs.update(choices=args, type=type(args[0]))
        else:
            kwargs.update(type=meta.get("parse", kind), metavar=meta.get("metavar"))
        if "choices" in meta:
            kwargs["choices"] = meta["choices"]
        target = parser
        if "group" in meta:
            target = groups.get(meta["group"]) or groups.setdefault(meta["group"],
                                                                  parser.add_argument_group(meta["group"]))
        target.add_argument(flag(field.name), **kwargs)
    return parser


def config_from_args(parser: argparse.ArgumentParser, cls: type, args: argparse.Namespace):
    """``cls`` from the flags given (the dataclass's defaults for the others); a value the config refuses is a usage
    error: usage, one line, exit 2."""
    given = {field.name: getattr(args, field.name) for field in dataclasses.fields(cls) if hasattr(args, field.name)}
    try:
        return cls(**given)
    except ValueError as error:
        parser.error(str(error))


def flag(name: str) -> str:
    """A config field's command-line flag: ``eval_every`` -> ``--eval-every``."""
    return "--" + name.replace("_", "-")


def comma_list(text: str) -> tuple[str, ...]:
    """A flag's comma-separated names: ``dapo, dapo_erc`` -> ("dapo", "dapo_erc")."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def _shown(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
