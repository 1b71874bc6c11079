"""The ``erc-verl`` command line: ``erc-verl demo`` and ``erc-verl sweep`` (see :mod:`erc_verl.demo`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from erc_verl.demo import demo, sweep

    parser = argparse.ArgumentParser(prog="erc-verl", description="Entropy Ratio Clipping (ERC) for verl.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module, summary in (
        ("demo", demo, "DAPO with and without ERC on verl's trainer, on CPU in minutes"),
        ("sweep", sweep, "DAPO vs DAPO+ERC under growing off-policy drift, several seeds"),
    ):
        command = sub.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0])
        module.build_parser(command)
        command.set_defaults(handler=lambda args, module=module: module.run(module.settings_from_args(args)))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from erc_verl.demo.recipe_run import RecipeRunError

    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except RecipeRunError as error:  # its message already ends with the tail of the run's log
        raise SystemExit(f"erc-verl {args.command}: {error}") from None
    except KeyboardInterrupt as interrupt:  # Ctrl-C, SIGTERM or SIGHUP: the runs were stopped on the way out
        raise SystemExit(f"erc-verl {args.command}: interrupted ({interrupt or 'Ctrl-C'}); every run was stopped.") \
            from None
    except OSError as error:  # a file the command reads or writes: one line, not a traceback
        if error.filename is None:
            raise
        raise SystemExit(f"erc-verl {args.command}: {error.strerror}: {error.filename}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
