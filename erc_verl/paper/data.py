r"""Build verl RL parquet files for the ERC paper's training set and benchmarks.

verl's ``RLHFDataset`` reads parquet rows with ``data_source``, ``prompt`` (a chat list),
``ability``, ``reward_model.ground_truth`` and ``extra_info`` (``index`` is used for grouping).
Rows are built here from public sources (Hugging Face hub, loaded on the user's machine) or from
local JSON / JSONL / parquet files, so nothing is downloaded at test time and no data ships with
the project.

Every prompt is the question followed by :data:`BOXED_INSTRUCTION`, because the reward
(:mod:`erc_verl.paper.reward`) and the paper's evaluation read the answer from the last ``\boxed{}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

#: Appended to every question: the answer is extracted from ``\boxed{}`` (paper section 4.1).
BOXED_INSTRUCTION = r"Please reason step by step, and put your final answer within \boxed{}."
#: Prompt used by default: the question, a newline, then the instruction.
PROMPT_TEMPLATE = "{question}\n" + BOXED_INSTRUCTION
#: The question alone, as in the ERC authors' own parquet files (the distilled models box answers anyway).
RAW_PROMPT_TEMPLATE = "{question}"
PROMPT_TEMPLATES = {"boxed": PROMPT_TEMPLATE, "raw": RAW_PROMPT_TEMPLATE}

ABILITY = "math"
REWARD_STYLE = "rule"

#: Columns tried, in order, when the caller does not name the question / answer column.
QUESTION_KEYS = ("problem", "question", "Problem", "Question", "query", "input")
ANSWER_KEYS = ("answer", "final_answer", "Answer", "ground_truth", "gt", "expected_answer", "target")


@dataclass(frozen=True)
class DatasetSpec:
    """Where a dataset lives on the hub and which columns hold the question and the answer.

    ``filename`` set means: download that one file and parse it here (robust to mixed-type columns
    that trip ``datasets``' schema inference); otherwise ``datasets.load_dataset`` is used.
    """

    name: str
    hub_id: str
    split: str
    question_key: str | None
    answer_key: str | None
    config: str | None = None
    filename: str | None = None
    data_split: str = "test"


TRAIN_SPEC = DatasetSpec(
    name="train",
    hub_id="Kwai-Klear/KlearReasoner-MathSub-30K",
    split="train",
    question_key=None,  # rows are already in verl format: prompt[-1].content / reward_model.ground_truth
    answer_key=None,
    filename="train_math_30K.json",
    data_split="train",
)

BENCHMARK_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec("aime2024", "HuggingFaceH4/aime_2024", "train", "problem", "answer"),
        DatasetSpec("aime2025", "MathArena/aime_2025", "train", "problem", "answer"),
        DatasetSpec("hmmt2025", "MathArena/hmmt_feb_2025", "train", "problem", "answer"),
        DatasetSpec("math500", "HuggingFaceH4/MATH-500", "test", "problem", "answer"),
        DatasetSpec("amc23", "math-ai/amc23", "test", "question", "answer"),
        DatasetSpec(
            "olympiadbench", "Hothan/OlympiadBench", "train", "question", "final_answer", "OE_TO_maths_en_COMP"
        ),
    )
}
ALL_SPECS: dict[str, DatasetSpec] = {"train": TRAIN_SPEC, **BENCHMARK_SPECS}


class DataFormatError(ValueError):
    """Input rows cannot be turned into verl RL rows; the message names the input and the fix."""


# ----------------------------------------------------------------------------- reading


def read_records(path: str) -> list[dict]:
    """Rows of a local ``.json`` (array, ``{"data": [...]}`` or JSON lines), ``.jsonl`` or ``.parquet`` file."""
    if not os.path.isfile(path):
        raise DataFormatError(f"input file not found: {path}")
    lower = path.lower()
    if lower.endswith(".parquet"):
        import pandas as pd

        return pd.read_parquet(path).to_dict(orient="records")
    if lower.endswith(".jsonl") or lower.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            text = f.read()
        if not text.strip():
            raise DataFormatError(f"{path} is empty")
        if lower.endswith(".json"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError:
                obj = None  # maybe JSON lines with a .json name
            else:
                if isinstance(obj, dict) and isinstance(obj.get("data"), list):
                    obj = obj["data"]
                if isinstance(obj, list) and all(isinstance(r, dict) for r in obj):
                    return obj
                if isinstance(obj, dict):
                    return [obj]
                raise DataFormatError(f"{path}: expected a JSON array of objects, got {type(obj).__name__}")
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataFormatError(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove that line") from e
            if not isinstance(row, dict):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
        return rows
    raise DataFormatError(f"unsupported input format for {path}: use .json, .jsonl or .parquet")


def load_hub_records(spec: DatasetSpec) -> list[dict]:
    """Rows of ``spec`` from the Hugging Face hub (network; never called by the tests)."""
    if spec.filename:
        from huggingface_hub import hf_hub_download

        local = hf_hub_download(repo_id=spec.hub_id, filename=spec.filename, repo_type="dataset")
        return read_records(local)
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets ships with verl
        raise DataFormatError("loading from the hub needs `pip install datasets`") from e
    ds = datasets.load_dataset(spec.hub_id, spec.config, split=spec.split)
    return [dict(r) for r in ds]


# ----------------------------------------------------------------------------- normalising


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def normalize_ground_truth(value: Any) -> str | None:
    """Ground truth as the string the reward expects; lists (OlympiadBench) are joined with ", "."""
    if hasattr(value, "tolist") and not isinstance(value, str):  # numpy arrays and scalars
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        parts = [normalize_ground_truth(v) for v in value]
        parts = [p for p in parts if p]
        return ", ".join(parts) if parts else None
    if _is_missing(value) or isinstance(value, bool):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value).strip()
    while len(text) >= 2 and text.startswith("$") and text.endswith("$"):
        text = text[1:-1].strip()
    return text or None


def _chat_question(prompt: Any) -> str | None:
    """Content of the last user message of a verl-style chat prompt."""
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        for msg in reversed(list(prompt)):
            if isinstance(msg, Mapping) and msg.get("role", "user") == "user" and isinstance(msg.get("content"), str):
                return msg["content"]
    return None


def _is_verl_row(row: Mapping) -> bool:
    rm = row.get("reward_model")
    return isinstance(rm, Mapping) and "ground_truth" in rm and "prompt" in row


def _resolve_key(
    records: Sequence[Mapping], wanted: str | None, candidates: Iterable[str], what: str, source: str
) -> str:
    present = {k for r in records[:100] for k in r.keys()}
    if wanted is not None:
        if wanted not in present:
            raise DataFormatError(
                f"{source}: no column {wanted!r} for the {what}; columns are {sorted(present)}. "
                f"Pass --{what}-key with one of them."
            )
        return wanted
    for key in candidates:
        if key in present:
            return key
    raise DataFormatError(
        f"{source}: cannot tell which column holds the {what} (tried {list(candidates)}); columns are "
        f"{sorted(present)}. Pass --{what}-key."
    )


def iter_question_answers(
    records: Sequence[Mapping],
    question_key: str | None = None,
    answer_key: str | None = None,
    source: str = "input",
) -> Iterator[tuple[int, str | None, str | None, Mapping]]:
    """``(position, question, ground_truth, record)`` for every record; None marks a missing value.

    Records already in verl format (``prompt`` chat list + ``reward_model``) are understood without
    column names, so such files can be re-templated.
    """
    if not records:
        raise DataFormatError(f"{source}: no rows")
    verl_format = question_key is None and answer_key is None and all(_is_verl_row(r) for r in records[:100])
    if verl_format:
        for i, r in enumerate(records):
            q = _chat_question(r.get("prompt"))
            rm = r.get("reward_model") if isinstance(r.get("reward_model"), Mapping) else {}
            yield i, (q.strip() if q and q.strip() else None), normalize_ground_truth(rm.get("ground_truth")), r
        return
    qk = _resolve_key(records, question_key, QUESTION_KEYS, "question", source)
    ak = _resolve_key(records, answer_key, ANSWER_KEYS, "answer", source)
    for i, r in enumerate(records):
        q = r.get(qk)
        q = q.strip() if isinstance(q, str) and q.strip() else None
        yield i, q, normalize_ground_truth(r.get(ak)), r


# ----------------------------------------------------------------------------- building rows


def make_row(
    question: str,
    ground_truth: str,
    data_source: str,
    index: int,
    split: str,
    template: str = PROMPT_TEMPLATE,
    source: str = "",
) -> dict:
    """One verl RL row. ``extra_info`` keeps the raw question so evaluation can show it."""
    if "{question}" not in template:
        raise DataFormatError(f"prompt template must contain '{{question}}': {template!r}")
    return {
        "data_source": data_source,
        "prompt": [{"role": "user", "content": template.replace("{question}", question)}],
        "ability": ABILITY,
        "reward_model": {"style": REWARD_STYLE, "ground_truth": ground_truth},
        "extra_info": {"split": split, "index": int(index), "question": question, "source": source},
    }


def build_rows(
    records: Sequence[Mapping],
    data_source: str,
    split: str,
    question_key: str | None = None,
    answer_key: str | None = None,
    template: str = PROMPT_TEMPLATE,
    source: str = "input",
    max_rows: int | None = None,
) -> tuple[list[dict], int]:
    """verl rows for ``records`` and how many records were skipped for a missing question or answer."""
    rows: list[dict] = []
    skipped = 0
    for _, question, answer, _ in iter_question_answers(records, question_key, answer_key, source):
        if question is None or answer is None:
            skipped += 1
            continue
        rows.append(make_row(question, answer, data_source, len(rows), split, template, source))
        if max_rows is not None and len(rows) >= max_rows:
            break
    if not rows:
        raise DataFormatError(
            f"{source}: none of the {len(records)} rows has both a question and an answer; check --question-key "
            "and --answer-key"
        )
    return rows, skipped


def write_parquet(rows: Sequence[dict], path: str) -> str:
    """Write rows where verl's ``data.train_files`` / ``data.val_files`` can read them."""
    import pandas as pd

    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    pd.DataFrame(list(rows)).to_parquet(path, index=False)
    return path


def output_path(out_dir: str, name: str) -> str:
    """``<out_dir>/train.parquet`` or ``<out_dir>/<benchmark>.parquet``."""
    return os.path.join(out_dir, f"{name}.parquet")
