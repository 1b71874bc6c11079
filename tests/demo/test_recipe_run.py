"""erc_verl.demo.recipe_run, the one launcher: following verl's file logger, the run identity, killing a run with
everything under it, and a failed run's error. The failing run is the real recipe (recipe/cpu_tiny.sh ->
erc_verl.main_ppo), refused by its preflight before Ray starts; the killed one is a shell standing in for Ray (a
process that puts itself in a session of its own, as Ray's workers do)."""

from __future__ import annotations

import json

import psutil
import pytest

from erc_verl.demo import recipe_run
from erc_verl.seams.run_identity import identity_path, read_run_identity


def test_rows_are_read_line_by_line_and_a_torn_line_waits(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps({"step": 1, "data": {"a": 1.0}}) + "\n" + '{"step": 2, "da')
    rows, offset = recipe_run._read_new_rows(str(path), 0)
    assert rows == [{"a": 1.0, "step": 1}]
    with open(path, "a") as f:
        f.write('ta": {"a": 2.0}}\n')
    rows, offset = recipe_run._read_new_rows(str(path), offset)
    assert rows == [{"a": 2.0, "step": 2}] and offset == path.stat().st_size
    assert recipe_run._read_new_rows(str(tmp_path / "absent.jsonl"), 0) == ([], 0)


def _fake_run(metrics: str, identity: dict | None) -> str:
    """A shell command that does what erc_verl.main_ppo does for the launcher: two metric rows through
    $VERL_FILE_LOGGER_PATH and, optionally, the identity file next to them."""
    rows = "".join(json.dumps({"step": i, "data": {"loss": i / 10}}) + "\n" for i in (1, 2))
    script = f"printf '%s' '{rows}' > \"$VERL_FILE_LOGGER_PATH\"; echo trained"
    if identity is not None:
        script += f"; printf '%s' '{json.dumps(identity)}' > {identity_path(metrics)}"
    return script


def test_launch_returns_rows_identity_and_log(tmp_path):
    metrics = str(tmp_path / "metrics.jsonl")
    identity = {"trainer": "ERCPPOTrainerSync", "use_v1": True, "trainer_mode": "sync", "replay_buffer": "ReplayBuffer",
                "erc": True, "loss_mode": "grpo_erc"}
    seen = []
    finished = recipe_run.launch(["bash", "-c", _fake_run(metrics, identity)], log_path=str(tmp_path / "train.log"),
                                 metrics_path=metrics, on_step=seen.append, poll_s=0.05)
    assert finished.returncode == 0 and finished.killed == ""
    assert finished.rows == seen == [{"loss": 0.1, "step": 1}, {"loss": 0.2, "step": 2}]
    assert finished.identity == identity == read_run_identity(metrics)
    assert finished.log_tail().endswith("trained\n") and finished.wall_s > 0
    # a later run in the same place that writes nothing: no rows or identity of the earlier one
    again = recipe_run.launch(["true"], log_path=str(tmp_path / "train.log"), metrics_path=metrics)
    assert (again.returncode, again.rows, again.identity) == (0, [], None)


def test_kill_when_kills_the_group_and_processes_in_sessions_of_their_own(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    pid_file = tmp_path / "detached.pid"
    script = (f"setsid sleep 300 & echo $! > {pid_file}; "
              "echo '{\"step\": 1, \"data\": {}}' > \"$VERL_FILE_LOGGER_PATH\"; sleep 300")
    finished = recipe_run.launch(["bash", "-c", script], log_path=str(tmp_path / "train.log"),
                                 metrics_path=str(metrics), kill_when=lambda: metrics.exists(), poll_s=0.05)
    assert finished.returncode == -9 and finished.killed == "kill_when" and finished.rows == [{"step": 1}]
    assert "killed (SIGKILL, process group)" in finished.log_tail()
    detached = int(pid_file.read_text())
    assert not psutil.pid_exists(detached) or psutil.Process(detached).status() == psutil.STATUS_ZOMBIE


def test_a_run_that_ends_by_itself_leaves_no_process_behind(tmp_path):
    """What it started in a session of its own (Ray's workers) is no longer its child once it exits: still killed."""
    pid_file = tmp_path / "detached.pid"
    finished = recipe_run.launch(["bash", "-c", f"setsid sleep 300 & echo $! > {pid_file}; sleep 0.5"],
                                 log_path=str(tmp_path / "train.log"), metrics_path=str(tmp_path / "metrics.jsonl"),
                                 poll_s=0.05)
    assert finished.returncode == 0 and finished.killed == ""
    detached = int(pid_file.read_text())
    assert not psutil.pid_exists(detached) or psutil.Process(detached).status() == psutil.STATUS_ZOMBIE


def test_a_recipe_run_that_writes_no_run_identity_raises(tmp_path, monkeypatch):
    """Rows but no identity file: not a run of erc_verl.main_ppo (a stand-in recipe here, the real one below)."""
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    metrics = tmp_path / "run" / "metrics.jsonl"
    (recipes / "cpu_tiny.sh").write_text(_fake_run(str(metrics), identity=None) + "\n")
    monkeypatch.setattr(recipe_run, "RECIPE_DIR", recipes)
    run = recipe_run.RecipeRun(recipe="dapo", workdir=str(tmp_path / "run"), tiny_dir=str(tmp_path), steps=2)
    with pytest.raises(recipe_run.RecipeRunError, match=f"wrote no {identity_path(str(metrics))}"):
        recipe_run.run_recipe(run)


def test_timeout_kills_the_run(tmp_path):
    finished = recipe_run.launch(["sleep", "300"], log_path=str(tmp_path / "train.log"),
                                 metrics_path=str(tmp_path / "metrics.jsonl"), timeout_s=0.2, poll_s=0.05)
    assert finished.returncode == -9 and finished.killed.startswith("timeout")


@pytest.mark.integration
def test_a_refused_run_raises_with_the_refusal_from_its_log(tmp_path):
    from erc_verl.demo.tiny_world import write_tiny_world

    write_tiny_world(str(tmp_path / "tiny"), warmup_steps=1)
    run = recipe_run.RecipeRun(recipe="dapo_erc", workdir=str(tmp_path / "run"), tiny_dir=str(tmp_path / "tiny"),
                               steps=1, env={"ENTROPY_MASK_LOW": "1.5"})
    with pytest.raises(recipe_run.RecipeRunError) as exc:
        recipe_run.run_recipe(run)
    message = str(exc.value)
    assert "dapo_erc" in message and "exited with code 2" in message
    assert "erc-verl: error:" in message and "entropy_mask_low" in message
