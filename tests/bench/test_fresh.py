"""erc_verl.bench.fresh: a function run in a new interpreter, with exactly the malloc settings asked for."""

import os

import pytest

from erc_verl.bench.fresh import MALLOC_ENV, run_fresh


def test_the_child_runs_with_exactly_the_malloc_settings_named(monkeypatch):
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.trim_threshold=1")
    env = run_fresh("os:environ.copy", malloc_env=MALLOC_ENV["cached"])
    assert {k: v for k, v in env.items() if k.startswith("MALLOC_") or k == "GLIBC_TUNABLES"} == MALLOC_ENV["cached"]
    assert env["PATH"] == os.environ["PATH"]  # everything else is inherited


def test_a_failing_child_raises_with_its_output(capsys):
    with pytest.raises(RuntimeError, match="failed with exit code 1"):
        run_fresh("os:getenv")  # no argument: TypeError in the child
    assert "TypeError" in capsys.readouterr().err
