"""``erc-verl sweep``: cells and flags, the statistics (checked against hand-computed intervals), the table and
figure, and resuming (runs already in runs.jsonl are not trained again). The runs themselves go through
erc_verl.demo.recipe_run, as the demo's do."""

from __future__ import annotations

import argparse
import json
import math

import matplotlib.image
import pytest

from erc_verl import flags
from erc_verl.demo import sweep


def _settings(*argv: str) -> sweep.SweepConfig:
    """The flags as ``erc-verl sweep`` reads them: generated from SweepConfig, its refusals a usage error."""
    parser = flags.add_dataclass_flags(argparse.ArgumentParser(prog="erc-verl sweep"), sweep.SweepConfig)
    return flags.config_from_args(parser, sweep.SweepConfig, parser.parse_args(list(argv)))


def test_cells_parse_as_updates_at_learning_rate(tmp_path):
    s = _settings("--cells", "2@1e-4, 8@4e-4", "--out", str(tmp_path))
    assert s.cells == ((2, 1e-4), (8, 4e-4))


REFUSED = {  # command line -> what the refusal says
    "--cells 8": "UPDATES@LR",
    "--cells 8@x": "UPDATES@LR",
    "--cells 0@1e-4": "positive",
    "--cells 8@1e-4,8@1e-4": "distinct",
    "--cells 3@1e-4": "multiple of every cell's updates; not of [3]",
    "--seeds 1": "--seeds",
    "--steps 2": "--steps",
    "--arms dapo": "--arms",
    "--jobs 0": "--jobs",
}


@pytest.mark.parametrize("command_line", REFUSED)
def test_bad_flags_are_refused_before_anything_runs(command_line, capsys):
    """A usage error: the usage, then one line saying what is wrong, exit 2."""
    message = REFUSED[command_line]
    with pytest.raises(SystemExit) as exc:
        _settings(*command_line.split())
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("usage: erc-verl sweep") and err[-1].startswith("erc-verl sweep: error: ")
    assert message in err[-1]


def test_defaults_are_the_documented_sweep(tmp_path):
    s = _settings("--out", str(tmp_path))
    assert s == sweep.SweepConfig(out=str(tmp_path))
    assert (s.cells, s.seeds, s.arms, s.steps) == (((2, 1e-4), (8, 1e-4), (8, 4e-4)), 5, ("dapo", "dapo_erc"), 10)


def test_mean_ci_is_the_t_interval():
    mean, half = sweep.mean_ci([1.0, 2.0, 3.0, 4.0, 5.0])
    assert mean == 3.0 and half == pytest.approx(2.776 * math.sqrt(2.5) / math.sqrt(5))
    assert sweep.mean_ci([1.0, float("nan"), 3.0]) == pytest.approx((2.0, 12.706 * math.sqrt(2) / math.sqrt(2)))
    assert math.isnan(sweep.mean_ci([2.0])[1])


def _records(s: sweep.SweepConfig) -> dict[str, dict]:
    """ERC lower than DAPO by exactly 0.1 on entropy fluctuation in every seed; everything else equal."""
    records = {}
    for updates, lr in s.cells:
        for seed in range(s.seeds):
            for arm in s.arms:
                key = sweep.run_key(updates, lr, seed, arm)
                records[key] = {"key": key, "updates": updates, "lr": lr, "seed": seed, "arm": arm,
                                "settings": sweep.run_settings(s),
                                "entropy_fluct": 0.5 + seed / 10 - (0.1 if arm == "dapo_erc" else 0.0),
                                "grad_norm_fluct": 1.0, "val_acc_end": 0.4, "ppo_kl": 0.001,
                                "erc_clipfrac": 0.02 if arm == "dapo_erc" else float("nan"), "wall_s": 1.0,
                                "identity": {"trainer": "ERCPPOTrainerSync" if arm == "dapo_erc" else "PPOTrainerSync",
                                             "use_v1": True, "trainer_mode": "sync", "replay_buffer": "ReplayBuffer",
                                             "erc": arm == "dapo_erc", "loss_mode": "grpo_erc" if arm == "dapo_erc"
                                             else "vanilla"}}
    return records


def test_summary_pairs_the_arms_by_seed(tmp_path):
    s = _settings("--cells", "2@1e-4", "--seeds", "3", "--out", str(tmp_path))
    summary = sweep.summarize(_records(s), s).set_index("metric")
    row = summary.loc["entropy_fluct"]
    assert row["dapo"] == pytest.approx(0.6) and row["dapo_erc"] == pytest.approx(0.5)
    assert row["diff"] == pytest.approx(-0.1) and row["diff_ci"] == pytest.approx(0.0, abs=1e-12)
    assert row["dapo_erc_lower"] == 3 and row["pairs"] == 3
    assert summary.loc["erc_clipfrac", "pairs"] == 0  # the baseline logs no ERC metric: nothing to pair
    assert math.isnan(summary.loc["erc_clipfrac", "dapo"]) and summary.loc["erc_clipfrac", "dapo_erc"] == 0.02
    table = sweep.markdown_table(sweep.summarize(_records(s), s), s)
    assert "| 2 | 0.0001 | entropy fluctuation | 0.6 ± 0.25 | 0.5 ± 0.25 | -0.1 ± 0 | 3/3 |" in table
    assert "| 2 | 0.0001 | ERC clip fraction | - | 0.02 ± 0 | - | - |" in table


def test_resume_trains_nothing_already_recorded_and_draws_the_figure(tmp_path, monkeypatch):
    s = _settings("--cells", "2@1e-4,8@1e-4", "--seeds", "2", "--out", str(tmp_path))
    records = _records(s)
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    monkeypatch.setattr(sweep, "_train_one", lambda *a: pytest.fail(f"trained again: {a[1:]}"))
    result = sweep.run(s)
    assert set(result["summary"]["metric"]) == {m for m, _ in sweep.REPORTED}
    assert matplotlib.image.imread(result["figure"]).shape[0] > 100
    assert (tmp_path / "summary.md").read_text().startswith("| updates/rollout |")


def test_resuming_with_other_run_settings_is_refused(tmp_path, monkeypatch):
    s = _settings("--cells", "2@1e-4", "--seeds", "2", "--out", str(tmp_path))
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _records(s).values()))
    monkeypatch.setattr(sweep, "_train_one", lambda *a: pytest.fail("trained"))
    longer = _settings("--cells", "2@1e-4", "--seeds", "2", "--steps", "20", "--out", str(tmp_path))
    with pytest.raises(SystemExit, match="other settings \\(steps: 10 there, 20 now\\)"):
        sweep.run_sweep(longer)


def test_t_quantile_is_never_narrower_than_students():
    assert sweep.t_975(4) == 2.776 and sweep.t_975(11) == 2.201 and sweep.t_975(22) == 2.086


def test_demo_and_sweep_do_not_import_each_other():
    """What both commands use lives in erc_verl.demo.commands."""
    import ast
    import inspect

    from erc_verl.demo import demo

    for module, other in ((demo, sweep), (sweep, demo)):
        tree = ast.parse(inspect.getsource(module))
        imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
        imported |= {f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
                     for alias in node.names}
        assert not any(name.startswith(other.__name__) for name in imported), (module.__name__, imported)


def test_runs_on_different_trainers_are_not_compared(tmp_path, monkeypatch):
    """The sweep's table pairs arms only when every run used the same trainer mode and replay buffer."""
    s = _settings("--cells", "2@1e-4", "--seeds", "2", "--out", str(tmp_path))
    records = _records(s)
    records[sweep.run_key(2, 1e-4, 1, "dapo_erc")]["identity"]["trainer_mode"] = "colocate_async"
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    monkeypatch.setattr(sweep, "_train_one", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="the runs used different trainers .*'trainer_mode': 'colocate_async'"):
        sweep.run(s)


def test_records_without_a_run_identity_are_refused(tmp_path, monkeypatch):
    s = _settings("--cells", "2@1e-4", "--seeds", "2", "--out", str(tmp_path))
    records = [{k: v for k, v in r.items() if k != "identity"} for r in _records(s).values()]
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    monkeypatch.setattr(sweep, "_train_one", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit, match="written by an older erc-verl"):
        sweep.run_sweep(s)
