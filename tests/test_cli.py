"""The ``erc-verl`` command line's conventions: ``--version``, bad flags as argparse usage errors (exit 2), help on
every flag, and figures that leave the caller's matplotlib backend alone."""

from __future__ import annotations

import argparse
import importlib.metadata
import shutil
import subprocess
import sys

import pytest

import erc_verl
from erc_verl import cli


def _exit(argv: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def test_version_is_the_installed_package(capsys):
    code, out, _ = _exit(["--version"], capsys)
    assert code == 0 and out == f"erc-verl {erc_verl.__version__}\n"
    assert erc_verl.__version__ == importlib.metadata.version("erc-verl")


@pytest.mark.parametrize("argv, usage, error", [
    (["demo", "--steps", "0"], "usage: erc-verl demo", "erc-verl demo: error: --steps must be positive, got 0."),
    (["demo", "--steps", "five"], "usage: erc-verl demo",
     "erc-verl demo: error: argument --steps: invalid int value: 'five'"),
    (["sweep", "--seeds", "1"], "usage: erc-verl sweep", "erc-verl sweep: error: --seeds must be >= 2"),
    (["demo", "--no-such-flag"], "usage: erc-verl", "erc-verl: error: unrecognized arguments: --no-such-flag"),
    ([], "usage: erc-verl", "erc-verl: error: the following arguments are required: COMMAND"),
])
def test_bad_flags_are_usage_errors(argv, usage, error, capsys):
    """Usage, then one line saying what is wrong, exit 2; nothing starts."""
    code, out, err = _exit(argv, capsys)
    lines = err.strip().splitlines()
    assert code == 2 and out == ""
    assert lines[0].startswith(usage) and lines[-1].startswith(error)
    assert "Traceback" not in err


def test_the_installed_command_exits_2_on_a_bad_value():
    exe = shutil.which("erc-verl")
    command = [exe] if exe else [sys.executable, "-m", "erc_verl.cli"]
    result = subprocess.run([*command, "demo", "--steps", "0"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "erc-verl demo: error: --steps must be positive, got 0."


def test_every_flag_has_help():
    subcommands = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert set(subcommands.choices) == {"demo", "sweep"}
    for name, parser in subcommands.choices.items():
        flags = [a for a in parser._actions if a.option_strings and a.dest != "help"]
        assert len(flags) > 10, name
        for action in flags:
            assert action.help and len(action.help) > 10, f"erc-verl {name} {action.option_strings[0]}: no help"


def test_importing_the_figures_leaves_the_matplotlib_backend_alone():
    """A notebook's backend stays what its user chose (no matplotlib.use on import) and pyplot is not loaded."""
    code = ("import sys, matplotlib\n"
            "matplotlib.use('svg')\n"
            "import erc_verl.demo.plots, erc_verl.demo.sweep, erc_verl.demo.demo\n"
            "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["svg", "False"]
