"""``erc-verl demo``: flags refused before anything starts, and the overrides it hands the recipe land in the
config verl composes (real recipe, real Hydra, dry run). The training itself is the README's
``erc-verl demo --quick``, which CI runs; it fails when an arm fails, logs too few steps, or an ERC arm logs no
ERC metric (``check_arm``)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from erc_verl.algorithm.gate import ERCBounds
from erc_verl import flags
from erc_verl.demo import commands, demo

REPO = Path(__file__).resolve().parents[2]


def _settings(*argv: str) -> demo.DemoConfig:
    """The flags as ``erc-verl demo`` reads them: generated from DemoConfig, its refusals a usage error."""
    parser = flags.add_dataclass_flags(argparse.ArgumentParser(prog="erc-verl demo"), demo.DemoConfig)
    return flags.config_from_args(parser, demo.DemoConfig, parser.parse_args(list(argv)))


def _demo_cmd(*args: str) -> list[str]:
    exe = shutil.which("erc-verl")
    base = [exe] if exe else [sys.executable, "-m", "erc_verl.cli"]
    return [*base, "demo", "--no-progress", *args]


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--arms", "dapo,ppo"], "--arms"),
        (["--arms", "dapo,dapo"], "--arms"),
        (["--prompts", "10", "--minibatches", "4"], "--minibatches"),
        (["--n", "1"], "--n"),
        (["--steps", "0"], "--steps"),
        (["--erc-low", "1.1", "--erc-high", "1.05"], "--erc-low"),
        (["--jobs", "0"], "--jobs"),
    ],
)
def test_bad_flags_name_the_flag(argv, flag, capsys):
    """Refused as a usage error: the usage, then one line naming the flag, exit 2."""
    with pytest.raises(SystemExit) as exc:
        _settings(*argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: erc-verl demo") and err[-1].startswith("erc-verl demo: error: ")
    assert flag in err[-1]


def test_the_config_checks_its_values_where_it_is_built(tmp_path):
    """DemoConfig refuses bad values itself (no parser needed); the ERC band is the algorithm's own check."""
    with pytest.raises(ValueError, match="--steps must be positive"):
        demo.DemoConfig(steps=0, out=str(tmp_path))
    with pytest.raises(ValueError) as band:
        demo.DemoConfig(erc_low=1.1, erc_high=1.05, out=str(tmp_path))
    with pytest.raises(ValueError) as algorithm:
        ERCBounds(1.1, 1.05, keys=("--erc-low", "--erc-high"))
    assert str(band.value) == str(algorithm.value) == (
        "ERC needs 0 <= --erc-low < --erc-high, got low=1.1, high=1.05. Set --erc-low / --erc-high (paper: 0.95 / 1.05).")


def test_presets_and_flags():
    quick = _settings("--quick")
    assert (quick.steps, quick.prompts, quick.minibatches) == (demo.PRESETS["quick"]["steps"], 8, 4)
    custom = _settings("--quick", "--steps", "3", "--arms", "gppo,gppo_erc")
    assert custom.steps == 3 and custom.arms == ("gppo", "gppo_erc")
    default = _settings()
    assert (default.steps, default.prompts, default.minibatches) == (30, 16, 8) and default.progress
    assert demo.DemoConfig(quick=True) == quick


def test_cli_lists_demo_and_sweep():
    from erc_verl.cli import build_parser

    args = build_parser().parse_args(["demo", "--quick", "--arms", "gppo,gppo_erc"])
    assert args.command == "demo" and args.quick and args.arms == ("gppo", "gppo_erc")
    assert build_parser().parse_args(["sweep", "--seeds", "3"]).command == "sweep"


@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_that_cannot_be_a_directory_is_one_line(tmp_path, where):
    """--out naming a file (or a path under one) is refused before anything runs, not with a traceback."""
    a_file = tmp_path / "results.txt"
    a_file.write_text("keep me")
    out = a_file if where == "file" else a_file / "demo"
    result = subprocess.run(_demo_cmd("--quick", "--out", str(out)), capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    expected = (f"erc-verl demo: error: --out {out} is a file, not a directory; choose another --out."
                if where == "file" else f"erc-verl demo: error: --out {out} cannot be created: {a_file} is a file.")
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("usage: erc-verl demo") and lines[-1] == expected
    assert [line for line in lines if "error" in line] == [expected]
    assert a_file.read_text() == "keep me"


def test_a_file_error_mid_run_is_one_line(tmp_path, monkeypatch):
    from erc_verl import cli

    def run(settings):
        raise PermissionError(13, "Permission denied", f"{settings.out}/run.json")

    monkeypatch.setattr(demo, "run", run)
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", "--quick", "--out", str(tmp_path)])
    assert str(exc.value) == f"erc-verl demo: Permission denied: {tmp_path}/run.json"


def test_check_arm_refuses_missing_steps_and_a_silent_erc_arm(tmp_path):
    s = _settings("--quick", "--steps", "2", "--out", str(tmp_path))
    erc_rows = [{"step": i, "critic/score/mean": 0.5, "actor/erc_clipfrac": 0.01} for i in (1, 2)]
    run_dir = str(tmp_path / "dapo_erc")
    commands.check_arm("dapo_erc", erc_rows, s.steps, run_dir)
    with pytest.raises(SystemExit, match="logged 1 training steps, expected 2"):
        commands.check_arm("dapo_erc", erc_rows[:1], s.steps, run_dir)
    plain_rows = [{"step": i, "critic/score/mean": 0.5} for i in (1, 2)]
    with pytest.raises(SystemExit, match="did not log actor/erc_clipfrac: the ERC loss did not run"):
        commands.check_arm("dapo_erc", plain_rows, s.steps, run_dir)
    with pytest.raises(SystemExit, match="logged actor/erc_clipfrac: the baseline loss did not run"):
        commands.check_arm("dapo", erc_rows, s.steps, run_dir)


def test_arms_on_different_trainers_are_not_compared():
    identity = {"trainer": "PPOTrainerSync", "use_v1": True, "trainer_mode": "sync", "replay_buffer": "ReplayBuffer"}
    commands.check_same_trainer({"dapo": identity, "dapo_erc": {**identity, "trainer": "ERCPPOTrainerSync"}}, "demo")
    with pytest.raises(SystemExit, match="erc-verl demo: the runs used different trainers"):
        commands.check_same_trainer({"dapo": identity, "dapo_erc": {**identity, "use_v1": False}}, "demo")


@pytest.mark.integration
@pytest.mark.parametrize("arm", ["dapo", "dapo_erc"])
def test_demo_overrides_reach_the_config_the_recipe_composes(tmp_path, arm):
    """The demo's overrides and ERC band, through recipe/cpu_tiny.sh and erc_verl.main_ppo (ERC_DRY_RUN=1: the
    launch's checks and the composed config, no Ray)."""
    from erc_verl.demo.tiny_world import write_tiny_world

    write_tiny_world(str(tmp_path / "tiny"), warmup_steps=1)
    s = _settings("--quick", "--prompts", "16", "--minibatches", "8", "--seed", "3", "--lr", "2e-4",
                  "--erc-low", "0.9", "--erc-high", "1.2", "--out", str(tmp_path))
    diagnostics = str(tmp_path / arm / "diagnostics") if arm in commands.ERC_ARMS else None
    env = {"TINY_DIR": str(tmp_path / "tiny"), "ERC_DRY_RUN": "1", "PYTHON": sys.executable,
           **commands.erc_env(s.erc_low, s.erc_high)}
    result = subprocess.run(["bash", str(REPO / "recipe" / "cpu_tiny.sh"), arm, *demo.arm_overrides(arm, s, diagnostics)],
                            capture_output=True, text=True, timeout=300, cwd=tmp_path,
                            env={**os.environ, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    config = yaml.safe_load(result.stdout)
    actor, rollout = config["actor_rollout_ref"]["actor"], config["actor_rollout_ref"]["rollout"]
    assert config["data"]["train_batch_size"] == 16 and actor["ppo_mini_batch_size"] == 2
    assert actor["optim"]["lr"] == 2e-4 and rollout["seed"] == 3 and config["data"]["seed"] == 3
    assert rollout["val_kwargs"]["n"] == s.val_n and config["trainer"]["val_before_train"] is True
    if arm == "dapo_erc":
        assert actor["policy_loss"]["loss_mode"] == "grpo_erc"
        assert (actor["entropy_mask_low"], actor["entropy_mask_high"]) == (0.9, 1.2)
        assert actor["erc_diagnostics"]["dir"] == diagnostics
    else:
        assert actor["policy_loss"]["loss_mode"] == "vanilla" and actor["erc_diagnostics"]["dir"] is None
