"""Score saved generations as avg@k per benchmark and print a Table-1-style comparison.

The paper (section 4.1) samples k responses per problem (k=32, except k=4 for MATH500 and
OlympiadBench) at temperature 0.6 / top-p 0.95, scores each with the ``\\boxed{}`` + math-verify
rule, and reports the mean accuracy in percent. Here avg@k of a benchmark is the mean over problems
of the per-problem mean score (equal to the mean over all samples when every problem has k samples). Each cell
also carries its spread: the standard deviation, over the k sample slots, of the accuracy a run with one
sample per problem would report (slot j = every problem's j-th sample); and pass@k, the share of problems
solved by at least one of k samples (the unbiased estimator of Chen et al. 2021, k = the fewest samples any
problem has).

Generations are JSON lines, one per problem (``responses``: list) or one per sample (``response``:
str), with ``benchmark`` (or ``data_source``), ``ground_truth`` (or ``reward_model.ground_truth``)
and ``index`` (or ``extra_info.index``, ``problem_id``; needed only for one-sample-per-line files, such as
:mod:`erc_verl.paper.generation` writes).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Benchmark:
    """One Table 1 column and the paper's sampling protocol for it."""

    key: str  # data file stem / data_source written by scripts/prepare_data.py
    column: str  # Table 1 header
    k: int  # samples per problem
    max_tokens: int  # generation budget
    aliases: tuple[str, ...] = ()


BENCHMARKS: tuple[Benchmark, ...] = (
    Benchmark("aime2024", "AIME24", 32, 32768, ("aime24", "aime2024", "aime_2024")),
    Benchmark("aime2025", "AIME25", 32, 32768, ("aime25", "aime2025", "aime_2025")),
    Benchmark("hmmt2025", "HMMT25", 32, 16384, ("hmmt25", "hmmt2025", "hmmtfeb2025", "hmmt_feb_2025")),
    Benchmark("math500", "MATH500", 4, 16384, ("math500", "math_500", "math-500")),
    Benchmark("amc23", "AMC23", 32, 16384, ("amc23", "amc2023", "amc_23")),
    Benchmark("olympiadbench", "Olympiad", 4, 16384, ("olympiad", "olympiadbench", "olympiad_bench")),
)
BENCHMARK_BY_KEY = {b.key: b for b in BENCHMARKS}
TABLE_COLUMNS = tuple(b.column for b in BENCHMARKS)
AVG_COLUMN = "Avg."
#: Sampling used for every benchmark in the paper.
SAMPLING = {"temperature": 0.6, "top_p": 0.95}

_ALIASES = {re.sub(r"[^a-z0-9]", "", a.lower()): b for b in BENCHMARKS for a in (*b.aliases, b.key, b.column)}


def _row(values: Sequence[float]) -> dict[str, float]:
    return dict(zip((*TABLE_COLUMNS, AVG_COLUMN), values, strict=True))


#: Published numbers (percent). Table 1: DAPO-family runs; Table 3: GPPO runs on the 7B model.
PAPER_RESULTS: dict[str, list[tuple[str, dict[str, float]]]] = {
    "1.5b": [
        ("DS-R1-Distill-Qwen-1.5B (paper)", _row([29.2, 24.1, 13.1, 86.0, 73.7, 51.8, 46.3])),
        ("+ GRPO (paper)", _row([33.4, 28.1, 16.6, 88.3, 79.3, 56.2, 50.3])),
        ("+ DAPO (paper)", _row([42.0, 30.3, 17.6, 89.4, 82.3, 58.6, 53.4])),
        ("+ ERC-DAPO (paper)", _row([44.2, 31.8, 19.2, 90.0, 84.3, 61.0, 55.1])),
    ],
    "7b": [
        ("DS-R1-Distill-Qwen-7B (paper)", _row([54.5, 39.1, 26.2, 93.6, 90.6, 67.0, 61.8])),
        ("+ GRPO (paper)", _row([55.3, 40.3, 24.5, 93.7, 88.8, 65.6, 61.4])),
        ("+ DAPO (paper)", _row([62.0, 45.9, 27.4, 94.1, 92.3, 69.9, 65.3])),
        ("+ ERC-DAPO (paper)", _row([62.1, 48.4, 28.7, 95.1, 91.9, 70.9, 66.2])),
        ("+ GPPO (paper, Table 3)", _row([57.3, 46.5, 24.0, 94.7, 92.0, 69.9, 64.1])),
        ("+ ERC-GPPO (paper, Table 3)", _row([63.5, 47.6, 28.0, 94.6, 93.5, 70.9, 66.3])),
    ],
}


class GenerationsError(ValueError):
    """Generations cannot be scored; the message names the file, line and the problem."""


def canonical_benchmark(name: str) -> Benchmark | None:
    """The paper benchmark that ``name`` refers to (``aime24``, ``AIME2024``, ``hmmt_feb_2025``...), or None."""
    return _ALIASES.get(re.sub(r"[^a-z0-9]", "", str(name).lower()))


def column_name(benchmark: str) -> str:
    b = canonical_benchmark(benchmark)
    return b.column if b else str(benchmark)


# ----------------------------------------------------------------------------- reading


@dataclass
class Problem:
    """All samples of one problem, merged across lines and files."""

    benchmark: str
    problem_id: str
    ground_truth: str
    responses: list[str] = field(default_factory=list)


def _field(obj: Mapping, *paths: str) -> Any:
    for path in paths:
        cur: Any = obj
        for part in path.split("."):
            if not isinstance(cur, Mapping) or part not in cur:
                cur = None
                break
            cur = cur[part]
        if cur is not None:
            return cur
    return None


def _parse_line(obj: Any, where: str, lineno: int) -> tuple[str, str, str, list[str]]:
    if not isinstance(obj, Mapping):
        raise GenerationsError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    bench = _field(obj, "benchmark", "data_source")
    if not isinstance(bench, str) or not bench.strip():
        raise GenerationsError(f"{where}: missing 'benchmark' (or 'data_source'): say which benchmark the line is for")
    gt = _field(obj, "ground_truth", "reward_model.ground_truth")
    if gt is None or (isinstance(gt, str) and not gt.strip()):
        raise GenerationsError(f"{where}: missing 'ground_truth' (or 'reward_model.ground_truth')")
    if "responses" in obj:
        responses = obj["responses"]
        if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
            raise GenerationsError(f"{where}: 'responses' must be a list of strings")
        if not responses:
            raise GenerationsError(f"{where}: 'responses' is empty")
    elif isinstance(obj.get("response"), str):
        responses = [obj["response"]]
    else:
        raise GenerationsError(f"{where}: missing 'responses' (list of strings) or 'response' (string)")
    pid = _field(obj, "index", "extra_info.index", "problem_id", "id")
    if pid is None:
        if "response" in obj and "responses" not in obj:
            raise GenerationsError(
                f"{where}: one-sample-per-line files need 'index' (or 'extra_info.index') to group samples by problem"
            )
        pid = f"line{lineno}"
    gt_str = gt if isinstance(gt, str) else json.dumps(gt) if isinstance(gt, (list, dict)) else str(gt)
    return bench.strip(), str(pid), gt_str, responses


def read_generations(paths: Iterable[str], skip_bad_lines: bool = False) -> tuple[list[Problem], list[str]]:
    """Problems from JSONL files (directories: every ``*.jsonl`` inside), plus warnings for skipped lines."""
    files: list[str] = []
    for path in paths:
        if os.path.isdir(path):
            found = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".jsonl"))
            if not found:
                raise GenerationsError(f"{path}: directory has no *.jsonl generation files")
            files.extend(found)
        elif os.path.isfile(path):
            files.append(path)
        else:
            raise GenerationsError(f"{path}: no such file or directory")
    problems: dict[tuple[str, str], Problem] = {}
    warnings: list[str] = []
    for path in files:
        n_lines = 0
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    try:
                        obj = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise GenerationsError(f"{where}: not valid JSON ({e.msg}); a truncated last line?") from e
                    bench, pid, gt, responses = _parse_line(obj, where, lineno)
                except GenerationsError as e:
                    if not skip_bad_lines:
                        raise GenerationsError(f"{e} (pass --skip-bad-lines to ignore such lines)") from e
                    warnings.append(f"skipped {e}")
                    continue
                n_lines += 1
                key = (bench, pid)
                prob = problems.get(key)
                if prob is None:
                    problems[key] = Problem(bench, pid, gt, list(responses))
                elif prob.ground_truth != gt:
                    raise GenerationsError(
                        f"{where}: problem {pid!r} of {bench!r} has ground truth {gt!r} here but "
                        f"{prob.ground_truth!r} earlier; are two different runs mixed in one input?"
                    )
                else:
                    prob.responses.extend(responses)
        if n_lines == 0:
            raise GenerationsError(f"{path}: no generation lines (empty file, or every line was bad)")
    return list(problems.values()), warnings


# ----------------------------------------------------------------------------- scoring


@dataclass(frozen=True)
class BenchmarkScore:
    """avg@k of one benchmark in one run (``accuracy`` in [0, 1])."""

    accuracy: float
    n_problems: int
    n_samples: int
    k_min: int
    k_max: int
    std_over_samples: float | None = None  # std of the one-sample accuracy over the k sample slots
    pass_at_k: float | None = None  # pass@k_min

    @property
    def k(self) -> int:
        return self.k_min


#: A verl reward function: a float, or verl's dict with ``score`` (what :func:`erc_verl.paper.reward.compute_score` returns).
ScoreFn = Callable[..., Any]


def _default_score_fn() -> ScoreFn:
    from erc_verl.paper.reward import compute_score

    return compute_score


def sample_scores(problems: Sequence[Problem], score_fn: ScoreFn | None = None) -> list[list[float]]:
    """The score of every sample of each problem, in sample order.

    Scored from as many threads as verl's reward workers use (``min(32, cpus + 4)``): each check of the
    reward runs in its own process, so the threads keep every core busy."""
    fn = score_fn or _default_score_fn()

    def one(job: tuple[Problem, str]) -> float:
        p, response = job
        x = fn(data_source=p.benchmark, solution_str=response, ground_truth=p.ground_truth)
        return float(x["score"] if isinstance(x, Mapping) else x)

    with ThreadPoolExecutor(max_workers=min(32, (os.cpu_count() or 1) + 4)) as pool:
        flat = iter(list(pool.map(one, [(p, r) for p in problems for r in p.responses])))
    return [[next(flat) for _ in p.responses] for p in problems]


def problem_scores(problems: Sequence[Problem], score_fn: ScoreFn | None = None) -> list[float]:
    """Mean score over the samples of each problem."""
    return [sum(s) / len(s) for s in sample_scores(problems, score_fn)]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that k of n samples, c of them correct, include a correct one (1 - C(n-c, k) / C(n, k))."""
    return 1.0 if n - c < k else 1.0 - math.comb(n - c, k) / math.comb(n, k)


def spread_and_pass(per_problem: Sequence[Sequence[float]]) -> tuple[float | None, float]:
    """``(std over the k sample slots of the one-sample accuracy, pass@k)``, k = the fewest samples of a problem."""
    k = min(len(s) for s in per_problem)
    slots = [sum(s[j] for s in per_problem) / len(per_problem) for j in range(k)]
    mean = sum(slots) / k
    std = math.sqrt(sum((x - mean) ** 2 for x in slots) / (k - 1)) if k > 1 else None
    passes = [pass_at_k(len(s), sum(1 for x in s if x > 0), k) for s in per_problem]
    return std, sum(passes) / len(passes)


def avg_at_k(per_problem: Sequence[float], samples: Sequence[int]) -> BenchmarkScore:
    if not per_problem:
        raise GenerationsError("no problems to score")
    return BenchmarkScore(
        accuracy=sum(per_problem) / len(per_problem),
        n_problems=len(per_problem),
        n_samples=sum(samples),
        k_min=min(samples),
        k_max=max(samples),
    )


def score_problems(problems: Sequence[Problem], score_fn: ScoreFn | None = None) -> dict[str, BenchmarkScore]:
    """avg@k per benchmark name (as written in the generations)."""
    by_bench: dict[str, list[Problem]] = {}
    for p in problems:
        by_bench.setdefault(p.benchmark, []).append(p)
    result = {}
    for bench, probs in by_bench.items():
        per_problem = sample_scores(probs, score_fn)
        score = avg_at_k([sum(s) / len(s) for s in per_problem], [len(p.responses) for p in probs])
        std, passed = spread_and_pass(per_problem)
        result[bench] = dataclasses.replace(score, std_over_samples=std, pass_at_k=passed)
    return result


def score_files(paths: Iterable[str], skip_bad_lines: bool = False, score_fn: ScoreFn | None = None):
    """``(scores per benchmark, warnings)`` for one run made of one or more JSONL files."""
    problems, warnings = read_generations(paths, skip_bad_lines)
    return score_problems(problems, score_fn), warnings


# ----------------------------------------------------------------------------- table


@dataclass
class TableRow:
    name: str
    values: dict[str, float | None]  # percent per column, Avg. included
    partial_avg: bool = False
    spread: dict[str, float] = field(default_factory=dict)  # percent per column: std over the k sample slots


def run_to_row(name: str, scores: Mapping[str, BenchmarkScore], metric: str = "avg") -> TableRow:
    """Percent per Table 1 column (extra benchmarks keep their own name); Avg. over the paper's six.

    ``metric``: ``avg`` (avg@k, with its spread) or ``pass`` (pass@k)."""
    values: dict[str, float | None] = {}
    spread: dict[str, float] = {}
    for bench, s in scores.items():
        col = column_name(bench)
        if col in values:
            raise GenerationsError(f"run {name!r}: two inputs map to the same column {col!r}; keep one")
        values[col] = 100.0 * (s.accuracy if metric == "avg" else s.pass_at_k)
        if metric == "avg" and s.std_over_samples is not None:
            spread[col] = 100.0 * s.std_over_samples
    present = [values[c] for c in TABLE_COLUMNS if values.get(c) is not None]
    values[AVG_COLUMN] = sum(present) / len(present) if present else None
    return TableRow(name, values, partial_avg=0 < len(present) < len(TABLE_COLUMNS), spread=spread)


def paper_rows(model_size: str) -> list[TableRow]:
    key = model_size.lower().replace(" ", "")
    if key not in PAPER_RESULTS:
        raise ValueError(f"unknown paper model size {model_size!r}; use one of {sorted(PAPER_RESULTS)}")
    return [TableRow(name, dict(vals)) for name, vals in PAPER_RESULTS[key]]


def _fmt(v: float | None) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"


def format_table(rows: Sequence[TableRow], markdown: bool = False) -> str:
    """Rows = runs, columns = AIME24 AIME25 HMMT25 MATH500 AMC23 Olympiad [extras] Avg., one decimal."""
    extras = sorted({c for r in rows for c in r.values if c not in TABLE_COLUMNS and c != AVG_COLUMN})
    columns = [*TABLE_COLUMNS, *extras, AVG_COLUMN]
    cells = []
    for r in rows:
        line = [_fmt(r.values.get(c)) + (f" ±{r.spread[c]:.1f}" if c in r.spread else "") for c in columns]
        if r.partial_avg and line[-1] != "-":
            line[-1] += "*"
        cells.append([r.name, *line])
    header = ["Method", *columns]
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * len(columns)) + "|"]
        out += ["| " + " | ".join(c) + " |" for c in cells]
    else:
        widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
        fmt_row = lambda row: "  ".join(  # noqa: E731
            (cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])) for i, cell in enumerate(row)
        )
        out = [fmt_row(header), "-" * len(fmt_row(header))] + [fmt_row(c) for c in cells]
    if any(r.partial_avg for r in rows):
        out.append("* Avg. over the benchmarks present in that run only (the paper averages all six).")
    if any(r.spread for r in rows):
        out.append("±: std over the k sample slots of the accuracy with one sample per problem.")
    return "\n".join(out)


def protocol_notes(name: str, scores: Mapping[str, BenchmarkScore]) -> list[str]:
    """Warnings where a run's k differs from the paper's, which makes its numbers not comparable."""
    notes = []
    for bench, s in scores.items():
        b = canonical_benchmark(bench)
        if b is None:
            continue
        if s.k_min != s.k_max:
            notes.append(f"{name}: {b.column} has {s.k_min}..{s.k_max} samples per problem (paper: {b.k})")
        elif s.k_min != b.k:
            notes.append(f"{name}: {b.column} scored as avg@{s.k_min} (paper: avg@{b.k})")
    return notes


def results_json(runs: Mapping[str, Mapping[str, BenchmarkScore]], compare_paper: str | None = None) -> dict:
    """Machine-readable scores (accuracy in percent) for ``--json``."""
    out: dict[str, Any] = {"protocol": {b.column: {"k": b.k, "max_tokens": b.max_tokens} for b in BENCHMARKS}}
    out["protocol"]["sampling"] = dict(SAMPLING)
    out["runs"] = {}
    for name, scores in runs.items():
        row = run_to_row(name, scores)
        out["runs"][name] = {
            "benchmarks": {
                column_name(bench): {
                    "avg_at_k": 100.0 * s.accuracy,
                    "std_over_samples": None if s.std_over_samples is None else 100.0 * s.std_over_samples,
                    "pass_at_k": None if s.pass_at_k is None else 100.0 * s.pass_at_k,
                    "k": s.k_min if s.k_min == s.k_max else [s.k_min, s.k_max],
                    "n_problems": s.n_problems,
                    "n_samples": s.n_samples,
                    "source_name": bench,
                }
                for bench, s in scores.items()
            },
            "avg": row.values[AVG_COLUMN],
            "avg_is_partial": row.partial_avg,
        }
    if compare_paper:
        out["paper"] = {r.name: r.values for r in paper_rows(compare_paper)}
    return out
