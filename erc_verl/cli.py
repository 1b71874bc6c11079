"""The ``erc-verl`` command line: ``erc-verl demo`` (see :mod:`erc_verl.demo`)."""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence


def build_parser() -> argparse.ArgumentParser:
    from erc_verl import demo

    parser = argparse.ArgumentParser(prog="erc-verl", description="Entropy Ratio Clipping (ERC) for verl.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    demo_parser = sub.add_parser(
        "demo", help="small CPU RLVR run comparing DAPO with and without ERC", description=demo.__doc__.split("\n\n")[0]
    )
    demo.build_parser(demo_parser)
    demo_parser.set_defaults(handler=lambda args: demo.run(demo.settings_from_args(args)))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except OSError as error:  # a file the command reads or writes: one line, not a traceback
        if error.filename is None:
            raise
        raise SystemExit(f"erc-verl {args.command}: {error.strerror}: {error.filename}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
