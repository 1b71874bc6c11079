"""Sample k responses per benchmark problem with vLLM, as in the paper's evaluation (section 4.1).

GPU only; vLLM is imported lazily so the rest of the package (and the CPU scoring path) works
without it. Output is the JSON-lines format :mod:`erc_verl.paper.evaluation` scores: one line per problem.
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Sequence
from typing import Any

from erc_verl.paper.evaluation import BENCHMARK_BY_KEY, SAMPLING, Benchmark, canonical_benchmark

#: Room reserved for the prompt on top of the generation budget when sizing vLLM's context.
PROMPT_BUDGET_TOKENS = 2048


class GenerationSetupError(ValueError):
    """Generation cannot start (model path, benchmark, data file, output file, vLLM); says how to fix it."""


class CheckpointError(GenerationSetupError):
    """The model path is not something vLLM can load."""


def check_hf_checkpoint(path: str) -> None:
    """Fail early, with the fix, when ``path`` is a raw verl FSDP checkpoint rather than an HF model dir."""
    if not os.path.isdir(path):
        if os.path.exists(path):
            raise CheckpointError(f"{path} is a file; pass the model directory (with config.json)")
        return  # a hub id: vLLM resolves it
    has_weights = bool(glob.glob(os.path.join(path, "*.safetensors")) or glob.glob(os.path.join(path, "*.bin")))
    is_verl_shard = bool(glob.glob(os.path.join(path, "model_world_size_*_rank_*.pt")))
    if is_verl_shard or (os.path.isdir(os.path.join(path, "actor")) and not has_weights):
        actor = path if is_verl_shard else os.path.join(path, "actor")
        raise CheckpointError(
            f"{path} is a verl FSDP checkpoint, which vLLM cannot load. Merge it into a Hugging Face model first:\n"
            f"  python -m verl.model_merger merge --backend fsdp --local_dir {actor} --target_dir {actor}/merged_hf\n"
            f"then pass --model {actor}/merged_hf"
        )
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise CheckpointError(f"{path} has no config.json; pass a Hugging Face model directory")
    if not has_weights:
        raise CheckpointError(f"{path} has no *.safetensors or *.bin weights; pass a complete Hugging Face model")


def import_vllm():
    """``(LLM, SamplingParams)`` or a clear error: generation needs a GPU machine with vLLM."""
    try:
        from vllm import LLM, SamplingParams
    except ImportError as e:
        raise GenerationSetupError(
            "`evaluate.py generate` needs vLLM (GPU only): pip install -e '.[vllm]'. "
            "Scoring saved generations (`evaluate.py score`) does not."
        ) from e
    return LLM, SamplingParams


def load_benchmark_rows(data_dir: str, bench: Benchmark, limit: int | None = None) -> list[dict]:
    """Rows of ``<data_dir>/<bench>.parquet`` as written by scripts/prepare_data.py."""
    import pandas as pd

    path = os.path.join(data_dir, f"{bench.key}.parquet")
    if not os.path.isfile(path):
        raise GenerationSetupError(
            f"{path} not found; build it with: python scripts/prepare_data.py --out-dir {data_dir} --only {bench.key}"
        )
    rows = pd.read_parquet(path).to_dict(orient="records")
    return rows[:limit] if limit else rows


def _messages(prompt: Any) -> list[dict]:
    if hasattr(prompt, "tolist"):
        prompt = prompt.tolist()
    return [{"role": m["role"], "content": m["content"]} for m in prompt]


def resolve_benchmarks(names: Sequence[str] | None) -> list[Benchmark]:
    if not names:
        return list(BENCHMARK_BY_KEY.values())
    out = []
    for n in names:
        b = canonical_benchmark(n)
        if b is None:
            raise GenerationSetupError(f"unknown benchmark {n!r}; use any of {sorted(BENCHMARK_BY_KEY)}")
        out.append(b)
    return out


def done_benchmarks(out_path: str) -> set[str]:
    """Benchmarks already present in an existing output file (for --resume)."""
    done = set()
    if os.path.isfile(out_path):
        with open(out_path, encoding="utf-8") as f:
            for line in f:
                try:
                    done.add(json.loads(line)["benchmark"])
                except (ValueError, KeyError, TypeError):
                    continue
    return done


def generate(
    model: str,
    data_dir: str,
    out_path: str,
    benchmarks: Sequence[str] | None = None,
    n_override: int | None = None,
    max_tokens_override: int | None = None,
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    seed: int = 0,
    tensor_parallel_size: int = 1,
    gpu_memory_utilization: float = 0.9,
    max_model_len: int | None = None,
    limit: int | None = None,
    resume: bool = False,
    dtype: str = "bfloat16",
) -> str:
    """Sample every selected benchmark and append one JSON line per problem to ``out_path``."""
    check_hf_checkpoint(model)
    benches = resolve_benchmarks(benchmarks)
    if os.path.exists(out_path) and not resume:
        raise GenerationSetupError(
            f"{out_path} exists; pass --resume to add missing benchmarks or choose another --out"
        )
    skip = done_benchmarks(out_path) if resume else set()
    todo = [b for b in benches if b.key not in skip]
    rows_by_bench = {b.key: load_benchmark_rows(data_dir, b, limit) for b in todo}
    if not todo:
        return out_path
    LLM, SamplingParams = import_vllm()
    longest = max(max_tokens_override or b.max_tokens for b in todo)
    llm = LLM(
        model=model,
        tensor_parallel_size=tensor_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization,
        max_model_len=max_model_len or longest + PROMPT_BUDGET_TOKENS,
        seed=seed,
        dtype=dtype,
    )
    tokenizer = llm.get_tokenizer()
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    for b in todo:
        rows = rows_by_bench[b.key]
        k = n_override or b.k
        max_tokens = max_tokens_override or b.max_tokens
        params = SamplingParams(n=k, temperature=temperature, top_p=top_p, max_tokens=max_tokens, seed=seed)
        prompts = [
            tokenizer.apply_chat_template(_messages(r["prompt"]), add_generation_prompt=True, tokenize=False)
            for r in rows
        ]
        outputs = llm.generate(prompts, params)
        sampling = {"n": k, "temperature": temperature, "top_p": top_p, "max_tokens": max_tokens, "seed": seed}
        with open(out_path, "a", encoding="utf-8") as f:
            for row, out in zip(rows, outputs, strict=True):
                extra = row.get("extra_info") or {}
                line = {
                    "benchmark": b.key,
                    "index": int(extra.get("index", 0)),
                    "ground_truth": row["reward_model"]["ground_truth"],
                    "prompt": _messages(row["prompt"]),
                    "responses": [o.text for o in out.outputs],
                    "finish_reasons": [o.finish_reason for o in out.outputs],
                    "num_tokens": [len(o.token_ids) for o in out.outputs],
                    "model": model,
                    "sampling": sampling,
                }
                f.write(json.dumps(line, ensure_ascii=False) + "\n")
        print(f"{b.key}: {len(rows)} problems x {k} samples -> {out_path}")
    return out_path
