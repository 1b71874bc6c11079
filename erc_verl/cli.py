"""The ``erc-verl`` command line: ``erc-verl demo`` and ``erc-verl sweep`` (see :mod:`erc_verl.demo`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    """Each command's flags come from its config dataclass (erc_verl.flags); a value the config refuses is
    reported by that command's parser: its usage, one line, exit 2."""
    from erc_verl import __version__
    from erc_verl.demo import demo, sweep
    from erc_verl.flags import add_dataclass_flags, config_from_args

    parser = argparse.ArgumentParser(prog="erc-verl", description="Entropy Ratio Clipping (ERC) for verl.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, module, config_class, summary in (
        ("demo", demo, demo.DemoConfig, "DAPO with and without ERC on verl's trainer, on CPU in minutes"),
        ("sweep", sweep, sweep.SweepConfig, "DAPO vs DAPO+ERC under growing off-policy drift, several seeds"),
    ):
        command = sub.add_parser(name, help=summary, description=module.__doc__.split("\n\n")[0])
        add_dataclass_flags(command, config_class)
        command.set_defaults(handler=lambda args, module=module, command=command, config_class=config_class:
                             module.run(config_from_args(command, config_class, args)))
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
