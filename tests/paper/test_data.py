"""Tests for erc_verl.paper.data and scripts/prepare_data.py: verl row format, local inputs, and RLHFDataset loading."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from erc_verl.paper import data as D

REPO = Path(__file__).resolve().parents[2]
# The first row of a verl math RL set (AIME 2024, as the reference recipes' data ships it): the format we match.
REFERENCE_ROW = {
    "data_source": "math_longcot_math_verify",
    "prompt": [{"content": "Find the largest possible real part of \\[(75+117i)z+\\frac{96+144i}{z}\\]where $z$ is a "
                           "complex number with $|z|=4$.", "role": "user"}],
    "ability": "MATH",
    "reward_model": {"ground_truth": "540", "style": "rule-lighteval/MATH_v2"},
    "__index_level_0__": 7.0,
}

QA = [
    {"problem": "What is $1+1$?", "answer": "2", "id": 1},
    {"problem": r"Compute $\frac{1}{2}+\frac{1}{2}$.", "answer": 1.0, "id": 2},
    {"problem": "Find $x$ with $2x=1$.", "answer": r"$\frac{1}{2}$", "id": 3},
]


def _write(tmp_path: Path, name: str, records: list[dict]) -> Path:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    elif name.endswith(".json"):
        path.write_text(json.dumps(records))
    else:  # parquet columns need one type: store answers as strings, as hub parquet files do
        frame = pd.DataFrame(records)
        if "answer" in frame:
            frame["answer"] = frame["answer"].map(lambda a: None if a is None else str(a))
        frame.to_parquet(path, index=False)
    return path


def _check_row(row: dict, data_source: str, index: int, split: str) -> None:
    assert set(row) == {"data_source", "prompt", "ability", "reward_model", "extra_info"}
    assert row["data_source"] == data_source
    assert row["ability"] == "math"
    prompt = list(row["prompt"])
    assert len(prompt) == 1 and prompt[0]["role"] == "user"
    assert prompt[0]["content"].endswith(D.BOXED_INSTRUCTION)
    assert row["reward_model"]["style"] == "rule"
    assert isinstance(row["reward_model"]["ground_truth"], str) and row["reward_model"]["ground_truth"]
    assert row["extra_info"]["split"] == split
    assert row["extra_info"]["index"] == index


# ----------------------------------------------------------------------------- rows


def test_make_row_matches_verl_format():
    row = D.make_row("What is 2+2?", "4", "aime2024", 7, "test")
    _check_row(row, "aime2024", 7, "test")
    assert row["prompt"][0]["content"] == "What is 2+2?\n" + D.BOXED_INSTRUCTION
    assert row["extra_info"]["question"] == "What is 2+2?"


def test_raw_template_keeps_bare_question():
    row = D.make_row("Q?", "1", "x", 0, "test", template=D.RAW_PROMPT_TEMPLATE)
    assert row["prompt"][0]["content"] == "Q?"


def test_template_without_placeholder_is_rejected():
    with pytest.raises(D.DataFormatError, match="question"):
        D.make_row("Q?", "1", "x", 0, "test", template="no placeholder")


@pytest.mark.parametrize(
    "value, expected",
    [
        ("540", "540"),
        (" 540 ", "540"),
        (540, "540"),
        (540.0, "540"),
        (0.5, "0.5"),
        (r"$\frac{1}{2}$", r"\frac{1}{2}"),
        ([r"$3$", r"$\sqrt{2}$"], r"3, \sqrt{2}"),
        (None, None),
        ("", None),
        (float("nan"), None),
        ([], None),
    ],
)
def test_normalize_ground_truth(value, expected):
    assert D.normalize_ground_truth(value) == expected


def test_build_rows_numbers_and_normalizes():
    rows, skipped = D.build_rows(QA, "aime2024", "test")
    assert skipped == 0
    assert [r["reward_model"]["ground_truth"] for r in rows] == ["2", "1", r"\frac{1}{2}"]
    for i, row in enumerate(rows):
        _check_row(row, "aime2024", i, "test")


def test_build_rows_skips_incomplete_rows_and_counts_them():
    records = QA + [{"problem": "No answer here", "answer": None}, {"problem": "  ", "answer": "3"}]
    rows, skipped = D.build_rows(records, "x", "test")
    assert len(rows) == 3 and skipped == 2
    assert [r["extra_info"]["index"] for r in rows] == [0, 1, 2]


def test_explicit_keys_and_errors_name_the_columns():
    records = [{"Q": "What?", "A": "1"}]
    rows, _ = D.build_rows(records, "x", "test", question_key="Q", answer_key="A")
    assert rows[0]["reward_model"]["ground_truth"] == "1"
    with pytest.raises(D.DataFormatError, match=r"no column 'question'.*\['A', 'Q'\].*--question-key"):
        D.build_rows(records, "x", "test", question_key="question", answer_key="A")
    with pytest.raises(D.DataFormatError, match="cannot tell which column holds the question"):
        D.build_rows(records, "x", "test")
    with pytest.raises(D.DataFormatError, match="no rows"):
        D.build_rows([], "x", "test")
    with pytest.raises(D.DataFormatError, match="none of the 1 rows"):
        D.build_rows([{"problem": "q", "answer": ""}], "x", "test")


def test_verl_format_input_is_retemplated():
    verl_rows = [
        {
            "data_source": "math_longcot_math_verify",
            "prompt": [{"content": "Let $n=9867$. Units digit of $n^3-n^2$?", "role": "user"}],
            "ability": "math",
            "reward_model": {"ground_truth": "4", "style": "rule"},
            "__index_level_0__": "29999",
        }
    ]
    rows, _ = D.build_rows(verl_rows, "train", "train")
    _check_row(rows[0], "train", 0, "train")
    assert rows[0]["prompt"][0]["content"].startswith("Let $n=9867$.")
    assert rows[0]["reward_model"]["ground_truth"] == "4"


def test_olympiadbench_style_list_answers():
    records = [{"question": "Find all x.", "final_answer": ["$1$", "$2$"], "is_multiple_answer": True}]
    rows, _ = D.build_rows(records, "olympiadbench", "test", "question", "final_answer")
    assert rows[0]["reward_model"]["ground_truth"] == "1, 2"


# ----------------------------------------------------------------------------- files


@pytest.mark.parametrize("name", ["in.jsonl", "in.json", "in.parquet"])
def test_read_records_formats(tmp_path, name):
    path = _write(tmp_path, name, QA)
    records = D.read_records(str(path))
    assert [r["problem"] for r in records] == [r["problem"] for r in QA]


def test_read_records_errors(tmp_path):
    with pytest.raises(D.DataFormatError, match="not found"):
        D.read_records(str(tmp_path / "missing.jsonl"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(D.DataFormatError, match="empty"):
        D.read_records(str(empty))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "a", "answer": "1"}\n{oops\n')
    with pytest.raises(D.DataFormatError, match=r"bad.jsonl:2: not valid JSON"):
        D.read_records(str(bad))
    csv = tmp_path / "x.csv"
    csv.write_text("a,b\n")
    with pytest.raises(D.DataFormatError, match="unsupported input format"):
        D.read_records(str(csv))


def test_json_lines_with_json_suffix(tmp_path):
    path = tmp_path / "lines.json"
    path.write_text("".join(json.dumps(r) + "\n" for r in QA))
    assert len(D.read_records(str(path))) == 3


def test_specs_cover_the_paper_benchmarks():
    assert set(D.BENCHMARK_SPECS) == {"aime2024", "aime2025", "hmmt2025", "math500", "amc23", "olympiadbench"}
    assert D.TRAIN_SPEC.hub_id == "Kwai-Klear/KlearReasoner-MathSub-30K"
    assert D.BENCHMARK_SPECS["olympiadbench"].config == "OE_TO_maths_en_COMP"


# ----------------------------------------------------------------------------- CLI


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_data_script", REPO / "scripts" / "prepare_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cli_from_file_writes_parquet(tmp_path, capsys):
    src = _write(tmp_path, "aime.jsonl", QA + [{"problem": "skip me", "answer": None}])
    out = tmp_path / "out"
    assert _load_script().main(["--out-dir", str(out), "--from-file", str(src), "--dataset-name", "aime2024"]) == 0
    stdout = capsys.readouterr().out
    assert "aime2024: 3 rows" in stdout and "1 rows skipped" in stdout
    df = pd.read_parquet(out / "aime2024.parquet")
    assert len(df) == 3
    for i, row in enumerate(df.to_dict(orient="records")):
        _check_row(row, "aime2024", i, "test")


def test_cli_errors_are_clear(tmp_path, capsys):
    script = _load_script()
    src = _write(tmp_path, "x.jsonl", [{"Q": "a", "A": "1"}])
    assert script.main(["--out-dir", str(tmp_path), "--from-file", str(src), "--dataset-name", "amc23"]) == 2
    err = capsys.readouterr().err
    assert "cannot tell which column holds the question" in err and "--question-key" in err
    with pytest.raises(SystemExit):
        script.main(["--from-file", str(src)])
    assert "--dataset-name" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.parquet"))


@pytest.mark.integration
def test_cli_runs_as_a_script(tmp_path):
    src = _write(tmp_path, "m.json", QA)
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "prepare_data.py"),
            "--out-dir",
            str(tmp_path),
            "--from-file",
            str(src),
            "--dataset-name",
            "math500",
            "--max-rows",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    assert len(pd.read_parquet(tmp_path / "math500.parquet")) == 2


# ----------------------------------------------------------------------------- verl compatibility


def test_matches_reference_row_format():
    ref = REFERENCE_ROW
    rows, _ = D.build_rows([ref], "aime2024", "test")
    ours = rows[0]
    # Every field verl reads from the reference row is present with the same shape and types.
    for key in ("data_source", "prompt", "ability", "reward_model"):
        assert key in ours and type(ours[key]) is type(ref[key])
    assert set(ours["prompt"][0]) == set(ref["prompt"][0]) == {"role", "content"}
    assert set(ref["reward_model"]) <= set(ours["reward_model"])
    assert ours["reward_model"]["ground_truth"] == ref["reward_model"]["ground_truth"]
    assert ours["prompt"][0]["content"].startswith(ref["prompt"][0]["content"])


def _tiny_chat_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "[PAD]": 1, "[EOS]": 2, "<user>": 3, "<assistant>": 4}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")
    tok.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return tok


def test_verl_rlhf_dataset_loads_the_parquet(tmp_path):
    from omegaconf import OmegaConf
    from verl.utils.dataset.rl_dataset import RLHFDataset

    rows, _ = D.build_rows(QA, "aime2024", "test")
    path = D.write_parquet(rows, str(tmp_path / "aime2024.parquet"))
    config = OmegaConf.create(
        {
            "prompt_key": "prompt",
            "max_prompt_length": 256,
            "filter_overlong_prompts": True,
            "filter_overlong_prompts_workers": 1,
            "truncation": "error",
            "cache_dir": str(tmp_path / "cache"),
        }
    )
    ds = RLHFDataset(data_files=[path], tokenizer=_tiny_chat_tokenizer(), config=config)
    assert len(ds) == 3
    item = ds[1]
    assert item["data_source"] == "aime2024"
    assert item["raw_prompt"][0]["role"] == "user"
    assert item["raw_prompt"][0]["content"].endswith(D.BOXED_INSTRUCTION)
    assert item["reward_model"]["ground_truth"] == "1"
    assert item["index"] == 1  # verl takes the prompt index from extra_info.index

    # The overlong-prompt filter really ran on our rows with this tokenizer (else nothing would be dropped).
    config.max_prompt_length = 8
    assert len(RLHFDataset(data_files=[path], tokenizer=_tiny_chat_tokenizer(), config=config)) == 0
    assert os.path.exists(path)


def test_cli_hub_path_with_stubbed_hub(tmp_path, monkeypatch, capsys):
    # No network: the hub calls are replaced, so this checks which ids/configs/splits/files are asked for
    # and that each source's columns turn into verl rows.
    import types

    import huggingface_hub

    train_json = tmp_path / "train_math_30K.json"
    train_json.write_text(
        json.dumps(
            [
                {
                    "data_source": "math_longcot_math_verify",
                    "prompt": [{"content": "Units digit of 9867^3?", "role": "user"}],
                    "ability": "math",
                    "reward_model": {"ground_truth": "3", "style": "rule"},
                    "__index_level_0__": "0",
                }
            ]
        )
    )
    downloads, loads = [], []

    def fake_download(repo_id, filename, repo_type):
        downloads.append((repo_id, filename, repo_type))
        return str(train_json)

    def fake_load_dataset(path, name=None, split=None):
        loads.append((path, name, split))
        return [{"question": "Find x.", "final_answer": ["$1$", "$2$"], "image_1": None}]

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=fake_load_dataset))
    out = tmp_path / "out"
    assert _load_script().main(["--out-dir", str(out), "--only", "train", "olympiadbench"]) == 0
    assert downloads == [("Kwai-Klear/KlearReasoner-MathSub-30K", "train_math_30K.json", "dataset")]
    assert loads == [("Hothan/OlympiadBench", "OE_TO_maths_en_COMP", "train")]
    train = pd.read_parquet(out / "train.parquet").to_dict(orient="records")
    _check_row(train[0], "train", 0, "train")
    assert train[0]["reward_model"]["ground_truth"] == "3"
    olympiad = pd.read_parquet(out / "olympiadbench.parquet").to_dict(orient="records")
    _check_row(olympiad[0], "olympiadbench", 0, "test")
    assert olympiad[0]["reward_model"]["ground_truth"] == "1, 2"
    assert "train: 1 rows" in capsys.readouterr().out
