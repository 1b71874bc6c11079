"""erc_verl.demo.recipe_run: following verl's file logger, and a failed run's error. The failing run is the real
recipe (recipe/cpu_tiny.sh -> erc_verl.main_ppo), refused by its preflight before Ray starts."""

from __future__ import annotations

import json
import sys

import pytest

from erc_verl.demo import recipe_run


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


def test_trainer_identity_needs_exactly_one_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("x\n(ERCTaskRunnerV1 pid=7) erc-verl: trainer=PPOTrainerSync trainer_mode=sync\n")
    assert recipe_run.trainer_identity(str(log)) == "trainer=PPOTrainerSync trainer_mode=sync"
    log.write_text("no trainer here\n")
    with pytest.raises(recipe_run.RecipeRunError, match="found 0"):
        recipe_run.trainer_identity(str(log))


@pytest.mark.integration
def test_a_refused_run_raises_with_the_refusal_from_its_log(tmp_path, monkeypatch):
    from erc_verl.demo.tiny_world import write_tiny_world

    write_tiny_world(str(tmp_path / "tiny"), warmup_steps=1)
    monkeypatch.setenv("PYTHON", sys.executable)
    run = recipe_run.RecipeRun(recipe="dapo_erc", workdir=str(tmp_path / "run"), tiny_dir=str(tmp_path / "tiny"),
                               steps=1, env={"ENTROPY_MASK_LOW": "1.5"})
    with pytest.raises(recipe_run.RecipeRunError) as exc:
        recipe_run.run_recipe(run)
    message = str(exc.value)
    assert "dapo_erc" in message and "exited with code 2" in message
    assert "erc-verl: error:" in message and "entropy_mask_low" in message
