"""Tests for erc_verl.paper.evaluation / generation and scripts/evaluate.py: avg@k, the Table 1 layout, bad inputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from erc_verl.paper import data as D
from erc_verl.paper import evaluation as E
from erc_verl.paper import generation as G

REPO = Path(__file__).resolve().parents[2]


def _jsonl(path: Path, lines: list) -> Path:
    path.write_text("".join((json.dumps(x) if not isinstance(x, str) else x) + "\n" for x in lines))
    return path


def _boxed(x) -> str:
    return f"... so the answer is \\boxed{{{x}}}"


def _script():
    spec = importlib.util.spec_from_file_location("evaluate_script", REPO / "scripts" / "evaluate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- avg@k


def test_avg_at_k_is_mean_of_per_problem_means():
    s = E.avg_at_k([1.0, 0.5, 0.0, 0.25], [4, 4, 4, 4])
    assert s.accuracy == pytest.approx(0.4375)
    assert (s.n_problems, s.n_samples, s.k_min, s.k_max) == (4, 16, 4, 4)
    uneven = E.avg_at_k([1.0, 0.0], [1, 3])  # problems weigh equally, not samples
    assert uneven.accuracy == pytest.approx(0.5) and (uneven.k_min, uneven.k_max) == (1, 3)
    with pytest.raises(E.GenerationsError):
        E.avg_at_k([], [])


def test_score_files_with_real_reward(tmp_path):
    path = _jsonl(
        tmp_path / "gen.jsonl",
        [
            # problem 0: 3 of 4 right (\dfrac and 0.5 count as 1/2); problem 1: 1 of 4 right
            {
                "benchmark": "math500",
                "index": 0,
                "ground_truth": r"\frac{1}{2}",
                "responses": [_boxed(r"\dfrac{1}{2}"), _boxed("0.5"), _boxed("2"), _boxed(r"\frac12")],
            },
            {
                "benchmark": "math500",
                "index": 1,
                "ground_truth": "540",
                "responses": [_boxed("540"), "no box", _boxed("541"), _boxed("54")],
            },
            {
                "data_source": "aime2024",
                "reward_model": {"ground_truth": "7"},
                "extra_info": {"index": 3},
                "responses": [_boxed(7), _boxed(7)],
            },
        ],
    )
    scores, warnings = E.score_files([str(path)])
    assert warnings == []
    assert scores["math500"].accuracy == pytest.approx((0.75 + 0.25) / 2)
    assert scores["math500"].k == 4 and scores["math500"].n_problems == 2
    assert scores["aime2024"].accuracy == 1.0


def test_one_sample_per_line_is_grouped_by_problem(tmp_path):
    lines = [
        {"benchmark": "amc23", "index": i % 2, "ground_truth": "3", "response": _boxed(3 if i < 3 else 4)}
        for i in range(4)
    ]
    # problem 0 gets samples 0,2 (right, right); problem 1 gets 1,3 (right, wrong)
    scores, _ = E.score_files([str(_jsonl(tmp_path / "g.jsonl", lines))])
    assert scores["amc23"].accuracy == pytest.approx((1.0 + 0.5) / 2)
    assert scores["amc23"].n_samples == 4 and scores["amc23"].k == 2


def test_runs_split_over_files_and_directories(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    _jsonl(run / "a.jsonl", [{"benchmark": "aime2024", "index": 0, "ground_truth": "1", "responses": [_boxed(1)]}])
    _jsonl(run / "b.jsonl", [{"benchmark": "aime2025", "index": 0, "ground_truth": "1", "responses": [_boxed(2)]}])
    (run / "notes.txt").write_text("ignored")
    scores, _ = E.score_files([str(run)])
    assert {k: v.accuracy for k, v in scores.items()} == {"aime2024": 1.0, "aime2025": 0.0}


def test_custom_score_fn_is_used(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"benchmark": "x", "index": 0, "ground_truth": "1", "responses": ["a", "bb"]}])
    scores, _ = E.score_files([str(path)], score_fn=lambda **kw: float(len(kw["solution_str"]) == 2))
    assert scores["x"].accuracy == 0.5


# ----------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "line, message",
    [
        ({"index": 0, "ground_truth": "1", "responses": ["x"]}, "missing 'benchmark'"),
        ({"benchmark": "aime2024", "index": 0, "responses": ["x"]}, "missing 'ground_truth'"),
        ({"benchmark": "aime2024", "index": 0, "ground_truth": "1"}, "missing 'responses'"),
        ({"benchmark": "aime2024", "index": 0, "ground_truth": "1", "responses": []}, "'responses' is empty"),
        ({"benchmark": "aime2024", "index": 0, "ground_truth": "1", "responses": [1, 2]}, "list of strings"),
        ({"benchmark": "aime2024", "ground_truth": "1", "response": "x"}, "need 'index'"),
        ([1, 2, 3], "expected a JSON object"),
        ('{"benchmark": "aime2024", "index": 0, "ground_tr', "not valid JSON"),
    ],
)
def test_bad_lines_fail_with_file_line_and_reason(tmp_path, line, message):
    good = {"benchmark": "aime2024", "index": 9, "ground_truth": "1", "responses": [_boxed(1)]}
    path = _jsonl(tmp_path / "gen.jsonl", [good, line])
    with pytest.raises(E.GenerationsError, match=message) as exc:
        E.score_files([str(path)])
    assert f"{path}:2" in str(exc.value) and "--skip-bad-lines" in str(exc.value)
    scores, warnings = E.score_files([str(path)], skip_bad_lines=True)
    assert scores["aime2024"].accuracy == 1.0 and len(warnings) == 1 and f"{path}:2" in warnings[0]


def test_empty_and_missing_inputs(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(E.GenerationsError, match=r"empty.jsonl: no generation lines"):
        E.score_files([str(empty)])
    with pytest.raises(E.GenerationsError, match="no such file"):
        E.score_files([str(tmp_path / "nope.jsonl")])
    (tmp_path / "d").mkdir()
    with pytest.raises(E.GenerationsError, match="no \\*.jsonl"):
        E.score_files([str(tmp_path / "d")])
    only_bad = _jsonl(tmp_path / "bad.jsonl", ["{not json"])
    with pytest.raises(E.GenerationsError, match="no generation lines"):
        E.score_files([str(only_bad)], skip_bad_lines=True)


def test_conflicting_ground_truths_are_reported(tmp_path):
    path = _jsonl(
        tmp_path / "g.jsonl",
        [
            {"benchmark": "aime2024", "index": 0, "ground_truth": "1", "responses": ["a"]},
            {"benchmark": "aime2024", "index": 0, "ground_truth": "2", "responses": ["b"]},
        ],
    )
    with pytest.raises(E.GenerationsError, match="two different runs mixed"):
        E.score_files([str(path)])


# ----------------------------------------------------------------------------- table


def _scores(**acc) -> dict[str, E.BenchmarkScore]:
    return {b: E.BenchmarkScore(a, 30, 30 * 32, 32, 32) for b, a in acc.items()}


def test_table_layout_and_numbers():
    full = _scores(aime2024=0.621, aime2025=0.484, hmmt2025=0.287, math500=0.951, amc23=0.919, olympiadbench=0.709)
    row = E.run_to_row("ERC-DAPO", full)
    assert row.values["AIME24"] == pytest.approx(62.1) and not row.partial_avg
    assert row.values["Avg."] == pytest.approx((62.1 + 48.4 + 28.7 + 95.1 + 91.9 + 70.9) / 6)
    table = E.format_table([row])
    header, rule, line = table.splitlines()
    assert header.split() == ["Method", "AIME24", "AIME25", "HMMT25", "MATH500", "AMC23", "Olympiad", "Avg."]
    assert set(rule) == {"-"}
    assert line.split() == ["ERC-DAPO", "62.1", "48.4", "28.7", "95.1", "91.9", "70.9", "66.2"]
    assert len({len(header), len(line)}) == 1  # columns are aligned


def test_partial_runs_and_extra_benchmarks():
    row = E.run_to_row(
        "quick", {"AIME24": E.BenchmarkScore(0.5, 30, 30, 1, 1), "gsm8k": E.BenchmarkScore(0.9, 1, 1, 1, 1)}
    )
    table = E.format_table([row])
    header = table.splitlines()[0].split()
    assert header == ["Method", "AIME24", "AIME25", "HMMT25", "MATH500", "AMC23", "Olympiad", "gsm8k", "Avg."]
    cells = table.splitlines()[2].split()
    assert cells == ["quick", "50.0", "-", "-", "-", "-", "-", "90.0", "50.0*"]  # Avg. over the paper's six only
    assert "Avg. over the benchmarks present" in table
    with pytest.raises(E.GenerationsError, match="same column"):
        E.run_to_row("dup", {"aime24": E.BenchmarkScore(1, 1, 1, 1, 1), "aime2024": E.BenchmarkScore(1, 1, 1, 1, 1)})


def test_markdown_table():
    md = E.format_table([E.run_to_row("r", _scores(aime2024=0.25))], markdown=True).splitlines()
    assert md[0].startswith("| Method | AIME24 |") and md[1].startswith("|---|---:")
    assert md[2].startswith("| r | 25.0 | - |")


def test_paper_numbers_are_consistent():
    # Each published Avg. is the mean of its six columns (to rounding), which catches typos in the constants.
    for size, rows in E.PAPER_RESULTS.items():
        for name, vals in rows:
            six = [vals[c] for c in E.TABLE_COLUMNS]
            assert abs(sum(six) / 6 - vals["Avg."]) <= 0.051, (size, name)
    assert E.PAPER_RESULTS["1.5b"][-1][1]["AIME24"] == 44.2
    assert E.PAPER_RESULTS["7b"][-1][0].startswith("+ ERC-GPPO") and E.PAPER_RESULTS["7b"][-1][1]["Avg."] == 66.3
    lines = E.format_table(E.paper_rows("7b")).splitlines()
    assert lines[2].split()[-7:] == ["54.5", "39.1", "26.2", "93.6", "90.6", "67.0", "61.8"]
    with pytest.raises(ValueError, match="unknown paper model size"):
        E.paper_rows("13b")


def test_protocol_notes_flag_non_paper_k():
    notes = E.protocol_notes(
        "run", {"aime2024": E.BenchmarkScore(0.5, 30, 120, 4, 4), "math500": E.BenchmarkScore(0.5, 500, 2000, 4, 4)}
    )
    assert notes == ["run: AIME24 scored as avg@4 (paper: avg@32)"]


@pytest.mark.parametrize("name", ["aime24", "AIME2024", "aime_2024", "AIME24"])
def test_benchmark_aliases(name):
    assert E.canonical_benchmark(name).column == "AIME24"


def test_protocol_matches_paper_section_4_1():
    proto = {b.column: (b.k, b.max_tokens) for b in E.BENCHMARKS}
    assert proto == {
        "AIME24": (32, 32768),
        "AIME25": (32, 32768),
        "HMMT25": (32, 16384),
        "MATH500": (4, 16384),
        "AMC23": (32, 16384),
        "Olympiad": (4, 16384),
    }
    assert E.SAMPLING == {"temperature": 0.6, "top_p": 0.95}
    assert {b.key for b in E.BENCHMARKS} == set(D.BENCHMARK_SPECS)  # data files and table agree on names


# ----------------------------------------------------------------------------- CLI score


def test_cli_score_side_by_side(tmp_path, capsys):
    a = _jsonl(
        tmp_path / "dapo.jsonl",
        [
            {"benchmark": "aime2024", "index": i, "ground_truth": "1", "responses": [_boxed(1)] * 2 + [_boxed(0)] * 2}
            for i in range(3)
        ],
    )
    b = _jsonl(
        tmp_path / "erc.jsonl",
        [
            {"benchmark": "aime2024", "index": i, "ground_truth": "1", "responses": [_boxed(1)] * 3 + [_boxed(0)]}
            for i in range(3)
        ],
    )
    out_json = tmp_path / "res" / "scores.json"
    rc = _script().main(["score", str(a), f"ERC={b}", "--compare-paper", "1.5b", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[2].startswith("DS-R1-Distill-Qwen-1.5B (paper)")
    dapo = next(line for line in lines if line.startswith("dapo "))
    erc = next(line for line in lines if line.startswith("ERC "))
    assert dapo.split()[1] == "50.0" and erc.split()[1] == "75.0"
    assert "note: dapo: AIME24 scored as avg@4 (paper: avg@32)" in out
    saved = json.loads(out_json.read_text())
    assert saved["runs"]["ERC"]["benchmarks"]["AIME24"]["avg_at_k"] == pytest.approx(75.0)
    assert saved["runs"]["ERC"]["avg_is_partial"] is True
    assert saved["protocol"]["AIME25"] == {"k": 32, "max_tokens": 32768}
    assert "+ ERC-DAPO (paper)" in saved["paper"]


def test_cli_score_errors(tmp_path, capsys):
    script = _script()
    empty = tmp_path / "e.jsonl"
    empty.write_text("")
    assert script.main(["score", str(empty)]) == 2
    assert "no generation lines" in capsys.readouterr().err
    g = _jsonl(tmp_path / "g.jsonl", [{"benchmark": "aime2024", "index": 0, "ground_truth": "1", "responses": ["x"]}])
    assert script.main(["score", f"A={g}", f"A={g}"]) == 2
    assert "unique" in capsys.readouterr().err


# ----------------------------------------------------------------------------- generation (no GPU)


def test_checkpoint_checks(tmp_path):
    shard = tmp_path / "global_step_10" / "actor"
    shard.mkdir(parents=True)
    (shard / "model_world_size_8_rank_0.pt").write_bytes(b"")
    with pytest.raises(G.CheckpointError, match="verl.model_merger merge --backend fsdp"):
        G.check_hf_checkpoint(str(shard))
    with pytest.raises(G.CheckpointError, match="verl FSDP checkpoint"):
        G.check_hf_checkpoint(str(tmp_path / "global_step_10"))
    with pytest.raises(G.CheckpointError, match="no config.json"):
        G.check_hf_checkpoint(str(tmp_path))
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    with pytest.raises(G.CheckpointError, match="no \\*.safetensors"):
        G.check_hf_checkpoint(str(hf))
    (hf / "model.safetensors").write_bytes(b"")
    G.check_hf_checkpoint(str(hf))
    G.check_hf_checkpoint("deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B")  # hub ids are left to vLLM


def _model_dir(tmp_path: Path) -> Path:
    model = tmp_path / "model"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    return model


def _hydra_values(argv: list[str]) -> dict[str, str]:
    """The value each key ends up with (Hydra applies overrides in order: the last one wins)."""
    return dict(a.split("=", 1) for a in argv[3:])


def test_verl_command_is_a_val_only_run_on_every_gpu():
    argv = G.verl_command("m", "/d/aime2024.parquet", "/o/aime2024.verl", n=32, max_tokens=32768, nnodes=2,
                          gpus_per_node=8, tensor_parallel_size=2, overrides=["data.max_prompt_length=4096"])
    assert argv[:3] == [sys.executable, "-m", "erc_verl.main_ppo"]
    v = _hydra_values(argv)
    assert v["trainer.val_only"] == "True" and v["trainer.val_before_train"] == "True"
    assert v["data.val_files"] == "/d/aime2024.parquet" and v["trainer.validation_data_dir"] == "/o/aime2024.verl"
    assert v["actor_rollout_ref.rollout.val_kwargs.n"] == "32" and v["data.max_response_length"] == "32768"
    assert v["actor_rollout_ref.rollout.val_kwargs.temperature"] == "0.6"
    assert v["actor_rollout_ref.rollout.val_kwargs.top_p"] == "0.95"
    assert v["actor_rollout_ref.rollout.val_kwargs.do_sample"] == "True"
    assert (v["trainer.nnodes"], v["trainer.n_gpus_per_node"]) == ("2", "8")
    assert v["actor_rollout_ref.rollout.tensor_model_parallel_size"] == "2"  # 8 vLLM replicas over 16 GPUs
    assert v["reward.custom_reward_function.path"] == "pkg://erc_verl.paper.reward"
    assert argv[-1] == "data.max_prompt_length=4096"  # the user's overrides come last, so they win


def test_generate_runs_one_verl_run_per_benchmark_with_its_k_and_budget(tmp_path, monkeypatch):
    # subprocess.call stands in for the verl runs (GPU; the CPU run is tests/e2e/test_evaluation_e2e.py):
    # it checks each command and writes the dump verl would write.
    data_dir = tmp_path / "data"
    for bench in ("aime2024", "math500"):
        rows, _ = D.build_rows([{"problem": f"Q{i}", "answer": str(i)} for i in range(3)], bench, "test")
        D.write_parquet(rows, str(data_dir / f"{bench}.parquet"))
    runs = []

    def fake_verl(argv):
        v = _hydra_values(argv)
        runs.append((v["actor_rollout_ref.rollout.val_kwargs.n"], v["data.max_response_length"]))
        dump = Path(v["trainer.validation_data_dir"])
        dump.mkdir(parents=True)
        n = int(v["actor_rollout_ref.rollout.val_kwargs.n"])
        with open(dump / "0.jsonl", "w") as f:
            for i in range(3):
                for j in range(n):
                    f.write(json.dumps({"input": f"Q{i}", "output": _boxed(i if j == 0 else "x"), "gts": str(i),
                                        "score": float(j == 0), "uid": f"u{i}_{j}_0"}) + "\n")
        return 0

    monkeypatch.setattr(G.subprocess, "call", fake_verl)
    out = tmp_path / "gen"
    args = ["generate", "--model", str(_model_dir(tmp_path)), "--data-dir", str(data_dir), "--out", str(out),
            "--benchmarks", "aime2024", "math500"]
    assert _script().main(args) == 0
    assert runs == [("32", "32768"), ("4", "16384")]
    scores, _ = E.score_files([str(out)])
    assert scores["aime2024"].accuracy == pytest.approx(1 / 32) and scores["aime2024"].k == 32
    assert scores["math500"].accuracy == pytest.approx(1 / 4) and scores["math500"].pass_at_k == 1.0

    assert _script().main(args) == 2  # an existing output is never overwritten
    assert _script().main([*args, "--resume"]) == 0 and len(runs) == 2  # --resume: nothing left to sample


def test_generate_reports_missing_data_file(tmp_path, capsys):
    rc = _script().main(["generate", "--model", str(_model_dir(tmp_path)), "--data-dir", str(tmp_path / "none"),
                         "--out", str(tmp_path / "o"), "--benchmarks", "hmmt25"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "hmmt2025.parquet not found" in err and "prepare_data.py --out-dir" in err and "--only hmmt2025" in err


def test_pass_at_k_and_spread():
    assert E.pass_at_k(4, 0, 4) == 0.0 and E.pass_at_k(4, 1, 4) == 1.0
    assert E.pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2)
    std, passed = E.spread_and_pass([[1, 0, 0, 0], [1, 1, 0, 0]])
    # sample slots: accuracies 1.0, 0.5, 0.0, 0.0 -> sample std
    assert std == pytest.approx(float(np.std([1.0, 0.5, 0.0, 0.0], ddof=1)))
    assert passed == 1.0
    assert E.spread_and_pass([[1], [0]]) == (None, 0.5)  # one sample: no spread
