"""Cost of ERC's current-policy entropy in one actor micro-step (forward, loss, backward).

Three variants run through verl's real ``FSDPEngineWithLMHead.forward_step`` (``erc_verl.bench.engine_rig``:
verl's class around a plain module, no FSDP wrapping):

  dapo           verl's ``ppo_loss`` with ``loss_mode=vanilla`` (DAPO clip-higher 0.2/0.28), no entropy
                 (micro-batch ``calculate_entropy=False``), on a stock engine.
  erc            ERC as the plugin runs it: ``erc_verl.seams.engine.enable_detached_entropy`` on the engine (without
                 flash-attn, as here and on the GPU kit: log-probs and entropy in one pass), the micro-batch flagged
                 with ``DETACHED_ENTROPY_KEY``, ``erc_verl.seams.actor_loss.ppo_loss_with_entropy``, ``grpo_erc``.
  graph_entropy  ERC with the entropy computed under autograd (what the reference does and what verl does with
                 ``calculate_entropy=True``): stock engine, micro-batch ``calculate_entropy=True``, no detached
                 flag, same loss (``ppo_loss_with_entropy``, ``grpo_erc``).

Time: ``torch.utils.benchmark.Timer``, one per variant, in one fresh process sharing one model and micro-batch:
``--warmup`` steps per variant, then ``--reps`` rounds round-robin (dapo erc graph_entropy dapo erc ...), each a
``blocked_autorange(min_run_time=0)``: its block-size probe (one untimed step) then one timed step, so every timed
step follows a step of the same variant. The table quotes the ``Measurement`` medians over the rounds.
``loss.backward()`` is inside the timed region; parameter ``.grad`` is reset to None in the Timer's ``setup``,
outside it (as ``optimizer.zero_grad`` does).
Memory: fresh processes (``erc_verl.bench.fresh``), ``--mem-runs`` per variant, all finished before the timing process
starts; ratios use each variant's median peak (every run is kept in the JSON). On CPU each process
reports ``ru_maxrss`` (its whole peak resident set, nothing subtracted) after its steps, with the RSS right after
building model and batch beside it as ``base``. On CUDA each reports ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (weights included, nothing subtracted).

CPU memory: with glibc's default (dynamic) mmap threshold, freed blocks below 32 MiB stay in the heap and the
peak RSS of identical processes differs at random, by as much as the target (docs/performance.md). The memory processes therefore run with ``MALLOC_MMAP_THRESHOLD_=131072`` (glibc's
initial value, pinned): every block >= 128 KiB is its own mapping and goes back to the OS when the tensor is
freed, so peak RSS follows live tensors (identical processes then agree to ~1 MiB). That changes where memory
comes from, not what is counted; nothing is subtracted. ``--mem-malloc default`` keeps glibc's default.

CPU time: the (tokens x vocab) logits and their gradient (311 MB each at --quick) are above glibc's largest mmap
threshold (32 MiB), so with the default allocator every step maps them afresh and the kernel faults in and zeroes
their pages, a system time that varies step to step (docs/performance.md has the measurement). The timing process therefore runs with
glibc keeping freed memory for reuse (``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**40``), as CUDA's caching
allocator does on a GPU: after warm-up the steps fault nothing and the time is the step's compute.
``--time-malloc default`` times with glibc's default instead. Wall times on a shared CPU machine are still noisy:
the table shows each variant's spread and process CPU time, and warns when the steps got less CPU than they asked
for (``--threads 1 --timer cpu`` is the most contention-proof setting).

The model is ``erc_verl.demo.task.tiny_qwen2``: an HF Qwen2 with random weights built from a config (nothing
downloaded), here with the real 151,936-token vocabulary, so the (tokens x vocab) logits dominate activation memory.
Input is packed exactly as verl packs it (``use_remove_padding=True``: ``left_right_2_no_padding`` then
``prepare_model_inputs`` -> one (1, tokens) row).

Examples:
  python scripts/bench_overhead.py --quick --json bench_quick.json
  python scripts/bench_overhead.py --quick --sweep 256,512,1024
  python scripts/bench_overhead.py --preset r1-distill-1.5b --device cuda --json r1.json
  python scripts/bench_overhead.py --vocab 512 --hidden-size 32 --layers 1 --tokens 64 --reps 1 --warmup 0
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as _dt
import gc
import json
import os
import platform
import resource
import statistics
import sys
import time
import timeit
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from functools import partial
from typing import Literal, Optional

from erc_verl.bench.fresh import MALLOC_ENV, run_fresh
from erc_verl.flags import add_dataclass_flags, comma_list, flag, option

VARIANTS = ("dapo", "erc", "graph_entropy")
REAL_VOCAB = 151_936

# Targets for ERC against DAPO (defined for --quick on CPU): at most 2% more step time, 1% more peak memory.
TARGET_TIME_RATIO_ERC = 1.02
TARGET_MEM_RATIO_ERC = 1.01
# Peak RSS of identical CPU processes (mmap threshold pinned) agrees to about 1 MiB; CUDA's allocator is exact.
RSS_NOISE_BYTES = 2 << 20

QUICK = dict(hidden_size=256, layers=2, heads=4, kv_heads=2, intermediate_size=512, tokens=512, seqs=4,
             reps=5, warmup=1, mem_steps=1)
PRESETS = {
    # DeepSeek-R1-Distill-Qwen-1.5B shapes (config.json of the HF repo); weights stay random. bf16 parameters stand
    # in for verl's FSDP mixed precision (bf16 compute, hence bf16 logits); gradient checkpointing as verl's actor
    # recipes enable it, so the (tokens x vocab) logits rather than per-layer activations dominate the peak.
    "r1-distill-1.5b": dict(hidden_size=1536, layers=28, heads=12, kv_heads=2, intermediate_size=8960,
                            vocab=REAL_VOCAB, tokens=8192, seqs=4, rope_theta=10000.0, rms_norm_eps=1e-6,
                            max_position_embeddings=131072, dtype="bfloat16", gradient_checkpointing=True,
                            reps=5, warmup=2, mem_runs=1),
}


def comma_separated_ints(text: str) -> tuple[int, ...]:
    return tuple(int(t) for t in text.split(",") if t)


@dataclass
class OverheadConfig:
    """What the benchmark measures and how. Explicit flags override ``--preset`` / ``--quick``, which override
    these defaults; ``resolved()`` fills the derived fields and is the one place flags are validated."""

    quick: bool = option(False, "the small CPU shape the targets are defined for: "
                         + ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    preset: Optional[str] = option(None, "model/token shapes of a real model (random weights)",
                                   choices=tuple(sorted(PRESETS)))
    device: Literal["cpu", "cuda"] = option("cpu", "where the model and the micro-batch live")
    hidden_size: int = option(256, "Qwen2 hidden size")
    layers: int = option(2, "Qwen2 decoder layers")
    heads: int = option(4, "attention heads")
    kv_heads: int = option(2, "key/value heads (grouped-query attention)")
    intermediate_size: Optional[int] = option(None, "MLP size (default 2 x hidden size)")
    vocab: int = option(REAL_VOCAB, "vocabulary size (Qwen2's real one: the logits dominate activation memory)")
    tokens: int = option(512, "packed tokens in the micro-batch (prompt + response)")
    seqs: int = option(4, "sequences in the micro-batch (tokens split evenly)")
    response_frac: float = option(0.75, "response share of each sequence")
    sweep: tuple[int, ...] = option((), "comma-separated token counts, e.g. 256,512,1024 (replaces --tokens)",
                                    parse=comma_separated_ints)
    rope_theta: float = option(10000.0, "Qwen2 RoPE base")
    rms_norm_eps: float = option(1e-6, "Qwen2 RMSNorm epsilon")
    max_position_embeddings: Optional[int] = option(None, "Qwen2 context size (default: max(4096, tokens))")
    dtype: Literal["float32", "bfloat16", "float16"] = option("float32", "parameter (and so logits) dtype")
    gradient_checkpointing: bool = option(False, "non-reentrant gradient checkpointing, as verl's actor enables it")
    reps: int = option(7, "timed rounds (each times every variant once)")
    warmup: int = option(2, "untimed steps per variant before the timed rounds (and in each memory process)")
    mem_steps: int = option(2, "steps after warm-up in each memory process")
    mem_runs: int = option(2, "fresh memory processes per variant (the median peak is used)")
    mem_jobs: Optional[int] = option(None, "memory processes run at once (default: 2 on cpu, 1 on cuda)")
    mem_malloc: Literal["pinned", "default"] = option(
        "pinned", "CPU memory processes: glibc's mmap threshold pinned at 128 KiB, or glibc's dynamic default "
        "(noisier peak RSS)")
    time_malloc: Literal["cached", "default"] = option(
        "cached", "CPU timing process: glibc keeps freed memory for reuse, as a caching allocator does, or glibc's "
        "default (every step re-faults its logits-sized buffers: noisy)")
    entropy_compile: Literal["auto", "on", "off"] = option(
        "auto", "torch.compile verl's entropy function as verl's engine does (auto: on for cuda, off for cpu)")
    entropy_chunking: bool = option(False, "engine config entropy_from_logits_with_chunking")
    entropy_chunk_size: int = option(2048, "engine config entropy_from_logits_chunk_size (rows)")
    seed: int = option(0, "seed of the random weights and the micro-batch")
    threads: Optional[int] = option(None, "torch.set_num_threads (default: torch's)")
    timer: Literal["wall", "cpu"] = option(
        "wall", "which medians the ratios and the check use (cpu = process CPU time, CPU only)")
    variants: tuple[str, ...] = option(VARIANTS, "variants to run, comma-separated (dapo always runs)",
                                       parse=comma_list)
    memory: bool = option(True, "run the per-variant memory processes")
    json: Optional[str] = option(None, "write the results as JSON to this path")
    check: bool = option(False, "exit 1 when the acceptance check fails")

    @property
    def token_list(self) -> list[int]:
        return sorted(set(self.sweep or (self.tokens,)))

    def resolved(self) -> "OverheadConfig":
        """Derived fields filled in; a ``ValueError`` naming the flag for any bad value or combination."""
        for name in ("hidden_size", "layers", "heads", "kv_heads", "vocab", "seqs", "reps", "mem_runs",
                     "entropy_chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1")
        for name in ("warmup", "mem_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{flag(name)} must be >= 0")
        for name in ("threads", "mem_jobs", "intermediate_size", "max_position_embeddings"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{flag(name)} must be >= 1")
        if not 0 < self.response_frac < 1:
            raise ValueError("--response-frac must lie strictly between 0 and 1")
        if self.timer == "cpu" and self.device != "cpu":
            raise ValueError("--timer cpu measures host CPU time; use the default wall timer with --device cuda")
        unknown = set(self.variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"--variants: unknown {sorted(unknown)}; choose from {','.join(VARIANTS)}")
        for tokens in self.token_list:
            if tokens % self.seqs or tokens // self.seqs < 2:
                raise ValueError(f"--tokens/--sweep value {tokens} must be a multiple of --seqs {self.seqs} "
                                 "(>= 2 each)")
        return dataclasses.replace(
            self,
            variants=tuple(v for v in VARIANTS if v == "dapo" or v in self.variants),
            intermediate_size=self.intermediate_size or 2 * self.hidden_size,
            max_position_embeddings=self.max_position_embeddings or max(4096, *self.token_list),
            # Memory processes may overlap on CPU (each measures only itself); on a GPU they would share the device.
            mem_jobs=self.mem_jobs or (1 if self.device == "cuda" else min(2, os.cpu_count() or 1)),
            # verl's FSDP engine wraps its entropy function in torch.compile by default (use_torch_compile=True); do
            # that on CUDA. On CPU (where verl's engine does not run in production) it needs inductor's C++
            # toolchain, ~15 s of compilation per process and ~200 MiB of compiler RSS: opt in with "on".
            entropy_compile=(self.entropy_compile if self.entropy_compile != "auto"
                             else "on" if self.device == "cuda" else "off"),
        )

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "token_list": self.token_list}

    @classmethod
    def from_json(cls, data: dict) -> "OverheadConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items() if k in names})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__[__doc__.index("Examples:"):],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_flags(parser, OverheadConfig)
    return parser


def resolve_config(flags: dict) -> OverheadConfig:
    """Defaults < ``--quick`` < ``--preset`` < the flags given (``flags``: only those)."""
    values = dict(QUICK) if flags.get("quick") else {}
    values.update(PRESETS.get(flags.get("preset"), {}))
    values.update(flags)
    return OverheadConfig(**values).resolved()


def parse_args(argv=None) -> OverheadConfig:
    """The resolved config of a command line; bad flags end with the usage and exit code 2."""
    parser = build_parser()
    try:
        return resolve_config(vars(parser.parse_args(argv)))
    except ValueError as e:
        parser.error(str(e))


# ----------------------------------------------------------------------------------------------- setup


def torch_dtype(name: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
            "float64": torch.float64}[name]


def build_model(cfg: OverheadConfig):
    """The benchmark's Qwen2 (``erc_verl.demo.task.tiny_qwen2`` at the configured shape), in training mode."""
    from erc_verl.demo.task import tiny_qwen2

    model = tiny_qwen2(vocab_size=cfg.vocab, hidden_size=cfg.hidden_size, num_layers=cfg.layers,
                       num_heads=cfg.heads, num_kv_heads=cfg.kv_heads, intermediate_size=cfg.intermediate_size,
                       seed=cfg.seed, device=cfg.device, dtype=torch_dtype(cfg.dtype), rope_theta=cfg.rope_theta,
                       rms_norm_eps=cfg.rms_norm_eps, max_position_embeddings=cfg.max_position_embeddings)
    if cfg.gradient_checkpointing:
        # verl enables this for actors via actor_rollout_ref.model.enable_gradient_checkpointing (non-reentrant).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def build_batch(cfg: OverheadConfig, tokens: int):
    """A verl update micro-batch of ``seqs`` full sequences, ``tokens`` tokens in all, packed by verl's
    ``left_right_2_no_padding`` with the non-tensor keys verl's engine adds before the loss (fixed lengths, so the
    packed micro-batch holds exactly ``tokens`` tokens).

    old_log_probs / old_entropy are what a near-uniform random-weight policy gives (-log V, log V), jittered,
    so the ERC gate keeps some tokens and drops others; the cost does not depend on which.
    """
    import math

    import torch
    from tensordict import TensorDict

    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.padding import left_right_2_no_padding

    seqs, vocab = cfg.seqs, cfg.vocab
    seq_len = tokens // seqs
    response_len = min(seq_len - 1, max(1, round(seq_len * cfg.response_frac)))
    prompt_len = seq_len - response_len
    g = torch.Generator().manual_seed(cfg.seed + tokens)
    prompts = torch.randint(1, vocab, (seqs, prompt_len), generator=g)
    responses = torch.randint(1, vocab, (seqs, response_len), generator=g)
    attention_mask = torch.ones(seqs, seq_len, dtype=torch.long)
    log_v = math.log(vocab)
    fields = dict(
        prompts=prompts,
        responses=responses,
        input_ids=torch.cat([prompts, responses], dim=1),
        attention_mask=attention_mask,
        position_ids=torch.arange(seq_len).expand(seqs, -1).contiguous(),
        response_mask=torch.ones(seqs, response_len, dtype=torch.long),
        old_log_probs=-log_v + 0.05 * torch.randn(seqs, response_len, generator=g),
        advantages=torch.randn(seqs, 1, generator=g).expand(-1, response_len).contiguous(),
        old_entropy=log_v * (1 + 0.05 * torch.randn(seqs, response_len, generator=g)),
    )
    td = left_right_2_no_padding(TensorDict(fields, batch_size=[seqs]))
    tu.assign_non_tensor(
        td,
        dp_size=1,
        batch_num_tokens=seqs * response_len,
        global_batch_size=seqs,
        use_remove_padding=True,
        use_fused_kernels=False,
        temperature=1.0,
    )
    assert int(td["input_ids"].offsets()[-1]) == tokens
    return td


def actor_config(cfg: OverheadConfig, loss_mode: str):
    common = dict(
        ppo_mini_batch_size=cfg.seqs,
        ppo_micro_batch_size_per_gpu=cfg.seqs,
        rollout_n=1,
        clip_ratio_low=0.2,
        clip_ratio_high=0.28,  # DAPO clip-higher
        loss_agg_mode="token-mean",
        entropy_coeff=0.0,
        use_kl_loss=False,
        policy_loss={"loss_mode": loss_mode},
    )
    if loss_mode == "vanilla":
        from verl.workers.config import FSDPActorConfig

        return FSDPActorConfig(**common)
    from erc_verl.algorithm.config import ERCFSDPActorConfig

    return ERCFSDPActorConfig(**common, entropy_mask_low=0.95, entropy_mask_high=1.05)


def make_engine(cfg: OverheadConfig, model, *, seam: bool):
    """verl's FSDPEngineWithLMHead (``engine_rig.cpu_lm_engine``); entropy function chosen and compiled as verl's
    ``FSDPEngine.__init__`` does; ERC seam installed with the plugin's own ``enable_detached_entropy``."""
    import torch

    from verl.utils import torch_functional as verl_F

    from erc_verl.bench.engine_rig import cpu_lm_engine
    from erc_verl.seams.engine import enable_detached_entropy

    compiled = cfg.entropy_compile == "on"
    engine = cpu_lm_engine(model, entropy_from_logits_with_chunking=cfg.entropy_chunking,
                           entropy_from_logits_chunk_size=cfg.entropy_chunk_size, use_torch_compile=compiled)
    if compiled:
        fn = verl_F.entropy_from_logits_with_chunking if cfg.entropy_chunking else verl_F.entropy_from_logits
        engine.compute_entropy_from_logits = torch.compile(fn, dynamic=True)
    if seam:
        enable_detached_entropy(engine)
    return engine


def make_variant(cfg: OverheadConfig, name: str, model, td):
    """(engine, micro-batch, loss function) of one variant; the micro-batch is a shallow copy with its flags."""
    from verl.utils import tensordict_utils as tu
    from verl.workers.utils.losses import ppo_loss as verl_ppo_loss

    from erc_verl.seams.actor_loss import ppo_loss_with_entropy
    from erc_verl.seams.engine import DETACHED_ENTROPY_KEY

    micro_batch = td.copy()
    if name == "dapo":
        engine = make_engine(cfg, model, seam=False)
        tu.assign_non_tensor(micro_batch, calculate_entropy=False)
        loss_fn = partial(verl_ppo_loss, config=actor_config(cfg, "vanilla"))
    elif name == "erc":
        engine = make_engine(cfg, model, seam=True)
        tu.assign_non_tensor(micro_batch, calculate_entropy=False, **{DETACHED_ENTROPY_KEY: True})
        loss_fn = partial(ppo_loss_with_entropy, config=actor_config(cfg, "grpo_erc"))
    elif name == "graph_entropy":
        engine = make_engine(cfg, model, seam=False)
        tu.assign_non_tensor(micro_batch, calculate_entropy=True)
        loss_fn = partial(ppo_loss_with_entropy, config=actor_config(cfg, "grpo_erc"))
    else:
        raise ValueError(f"unknown variant {name!r}; choose from {VARIANTS}")
    return engine, micro_batch, loss_fn


def device_context(cfg: OverheadConfig):
    if cfg.device == "cpu":
        from erc_verl.bench.engine_rig import engine_on_cpu

        return engine_on_cpu()
    return nullcontext()


def synchronize(cfg: OverheadConfig) -> None:
    if cfg.device == "cuda":
        import torch

        torch.cuda.synchronize()


def clear_grads(model) -> None:
    """What ``optimizer.zero_grad`` does between steps (outside what is timed)."""
    for p in model.parameters():
        p.grad = None


def micro_step(cfg: OverheadConfig, engine, micro_batch, loss_fn) -> None:
    """One actor micro-step as verl's forward_backward_batch runs it: forward_step (model, outputs, loss), backward."""
    with device_context(cfg):
        loss, output = engine.forward_step(micro_batch, loss_function=loss_fn, forward_only=False)
    loss.backward()
    del loss, output


def setup_torch(cfg: OverheadConfig) -> None:
    import torch

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")


# ----------------------------------------------------------------------------------------------- memory


def current_rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def memory_process(cfg_json: dict, variant: str, tokens: int) -> dict:
    """In a fresh interpreter: build, run warm-up + mem_steps micro-steps of one variant, report its peak memory."""
    cfg = OverheadConfig.from_json(cfg_json)
    setup_torch(cfg)
    import torch

    model = build_model(cfg)
    td = build_batch(cfg, tokens).to(cfg.device)
    engine, micro_batch, loss_fn = make_variant(cfg, variant, model, td)
    gc.collect()
    result = dict(variant=variant, tokens=tokens, rss_after_build=current_rss_bytes(),
                  maxrss_after_build=peak_rss_bytes(), malloc_mmap_threshold=os.environ.get("MALLOC_MMAP_THRESHOLD_"))
    if cfg.device == "cuda":
        torch.cuda.synchronize()
        result["cuda_allocated_after_build"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    for _ in range(max(1, cfg.warmup) + cfg.mem_steps):
        clear_grads(model)
        micro_step(cfg, engine, micro_batch, loss_fn)
    synchronize(cfg)
    result["maxrss"] = peak_rss_bytes()
    result["peak_reached_in_steps"] = result["maxrss"] > result["maxrss_after_build"]
    if cfg.device == "cuda":
        result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        result["peak"] = result["cuda_max_allocated"]
        result["base"] = result["cuda_allocated_after_build"]
        result["metric"] = "torch.cuda.max_memory_allocated"
    else:
        result["peak"] = result["maxrss"]
        result["base"] = result["rss_after_build"]
        result["metric"] = "ru_maxrss"
    return result


def malloc_env(cfg: OverheadConfig, setting: str) -> dict[str, str]:
    """The glibc malloc setting named (see the module docstring); CPU only."""
    return MALLOC_ENV[setting] if cfg.device == "cpu" else {}


def measure_memory(cfg: OverheadConfig, variant: str, tokens: int) -> dict:
    return run_fresh("erc_verl.bench.overhead:memory_process", cfg.as_json(), variant, tokens,
                     malloc_env=malloc_env(cfg, cfg.mem_malloc))


# ----------------------------------------------------------------------------------------------- timing


class StepClock:
    """The clock ``torch.utils.benchmark`` reads at both ends of a timed block: wall time (after a CUDA sync on a
    GPU), with the process CPU time noted at the same instants so that each timed step also has its CPU time.
    CPU time is what the step cost this process's threads and is far less sensitive than wall time to other jobs
    on a shared CPU machine (with --threads 1 it excludes time spent descheduled; with more, spin-waits count)."""

    def __init__(self, cfg: OverheadConfig):
        self.cfg = cfg
        self.cpu = [0.0, 0.0]

    def __call__(self) -> float:
        synchronize(self.cfg)
        self.cpu = [self.cpu[1], time.process_time()]
        return timeit.default_timer()

    def last_block_cpu_s(self) -> float:
        return self.cpu[1] - self.cpu[0]


def time_variants(cfg: OverheadConfig, model, tokens: int) -> dict[str, dict]:
    """Every variant timed by its own ``torch.utils.benchmark.Timer``, rounds interleaved (see the docstring)."""
    import torch
    from torch.utils import benchmark

    td = build_batch(cfg, tokens).to(cfg.device)
    timers = {}
    for name in cfg.variants:
        clock = StepClock(cfg)
        step = partial(micro_step, cfg, *make_variant(cfg, name, model, td))
        timer = benchmark.Timer("step()", setup="clear_grads(model)", timer=clock, num_threads=torch.get_num_threads(),
                                globals={"step": step, "clear_grads": clear_grads, "model": model},
                                label="actor micro-step", sub_label=f"{tokens} tokens", description=name)
        timers[name] = (timer, clock, step)
    for _ in range(cfg.warmup):
        for _, _, step in timers.values():
            clear_grads(model)
            step()
    runs = {name: {"measurements": [], "cpu": []} for name in cfg.variants}
    for _ in range(cfg.reps):
        for name, (timer, clock, _) in timers.items():  # round-robin: A B C A B C ...
            gc.collect()
            runs[name]["measurements"].append(timer.blocked_autorange(min_run_time=0))
            runs[name]["cpu"].append(clock.last_block_cpu_s())
    raw = {}
    for name, run in runs.items():
        (merged,) = benchmark.Measurement.merge(run["measurements"])
        raw[name] = {"wall": [m.median for m in run["measurements"]], "cpu": run["cpu"],
                     "median_wall_s": merged.median, "iqr_wall_s": merged.iqr}
    return raw


def timing_process(cfg_json: dict) -> dict:
    """In a fresh interpreter: one model, every token count timed, variants interleaved."""
    cfg = OverheadConfig.from_json(cfg_json)
    setup_torch(cfg)
    import torch

    model = build_model(cfg)
    load_before = os.getloadavg()
    raw = {}
    for tokens in cfg.token_list:
        raw[tokens] = time_variants(cfg, model, tokens)
        print(f"  timing process: tokens={tokens} done", file=sys.stderr, flush=True)
    return {"raw": raw, "threads": torch.get_num_threads(), "loadavg_before_after": [load_before, os.getloadavg()],
            "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}}


# ----------------------------------------------------------------------------------------------- report


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.0f}"


def spread(values: list[float]) -> float:
    """(max - min) / median: how much the repetitions disagree."""
    return (max(values) - min(values)) / statistics.median(values)


def summarize(cfg: OverheadConfig, tokens: int, raw: dict, mem: dict) -> dict:
    timer = cfg.timer
    entry: dict = {"tokens": tokens, "vocab": cfg.vocab, "timer": timer, "variants": {}}
    for name in VARIANTS:
        if name not in raw:
            continue
        wall, cpu = raw[name]["wall"], raw[name]["cpu"]
        v = {
            # the timer the ratios and the check use
            "median_s": raw[name]["median_wall_s"] if timer == "wall" else statistics.median(cpu),
            "median_wall_s": raw[name]["median_wall_s"],  # torch.utils.benchmark's Measurement.median
            "iqr_wall_s": raw[name]["iqr_wall_s"],
            "min_wall_s": min(wall),
            "spread_wall": spread(wall),
            "median_cpu_s": statistics.median(cpu),
            "min_cpu_s": min(cpu),
            "spread_cpu": spread(cpu),
            "raw_wall_s": wall,
            "raw_cpu_s": cpu,
        }
        if name in mem:
            runs = mem[name]  # one fresh process each; the median is robust to an outlier either way
            peaks = [m["peak"] for m in runs]
            v.update(peak_mem_bytes=int(statistics.median(peaks)), peak_mem_runs_bytes=peaks,
                     base_mem_bytes=int(statistics.median(m["base"] for m in runs)), mem_metric=runs[0]["metric"],
                     peak_reached_in_steps=all(m["peak_reached_in_steps"] for m in runs), workers=runs)
        entry["variants"][name] = v
    base = entry["variants"]["dapo"]
    for name in ("erc", "graph_entropy"):
        v = entry["variants"].get(name)
        has_mem = bool(v) and "peak_mem_bytes" in v and "peak_mem_bytes" in base
        entry[f"time_ratio_{name}"] = v["median_s"] / base["median_s"] if v else None
        entry[f"time_ratio_wall_{name}"] = v["median_wall_s"] / base["median_wall_s"] if v else None
        entry[f"time_ratio_cpu_{name}"] = v["median_cpu_s"] / base["median_cpu_s"] if v else None
        # Median over rounds of (this variant's step / dapo's step in the same round): cancels slow drifts of the
        # machine (frequency, other jobs' memory traffic) that the ratio of medians does not.
        key = "raw_wall_s" if timer == "wall" else "raw_cpu_s"
        entry[f"time_ratio_paired_{name}"] = (
            statistics.median(a / b for a, b in zip(v[key], base[key])) if v else None)
        entry[f"mem_ratio_{name}"] = v["peak_mem_bytes"] / base["peak_mem_bytes"] if has_mem else None
        grown = has_mem and base["peak_mem_bytes"] > base["base_mem_bytes"]
        entry[f"mem_above_base_ratio_{name}"] = (
            (v["peak_mem_bytes"] - v["base_mem_bytes"]) / (base["peak_mem_bytes"] - base["base_mem_bytes"])
            if grown else None)
    return entry


def check(entry: dict, device: str) -> dict:
    erc, graph = entry["variants"]["erc"], entry["variants"].get("graph_entropy")
    tr, mr = entry["time_ratio_erc"], entry["mem_ratio_erc"]
    criteria = {
        f"erc time <= {TARGET_TIME_RATIO_ERC:.2f} x dapo ({entry['timer']} median)": (
            tr is not None and tr <= TARGET_TIME_RATIO_ERC),
        f"erc peak mem <= {TARGET_MEM_RATIO_ERC:.2f} x dapo": mr is not None and mr <= TARGET_MEM_RATIO_ERC,
    }
    if graph is not None:
        noise = RSS_NOISE_BYTES if device == "cpu" else 0
        criteria[f"erc peak mem <= graph_entropy peak mem (+{noise >> 20} MiB RSS noise)"] = (
            "peak_mem_bytes" in erc and "peak_mem_bytes" in graph
            and erc["peak_mem_bytes"] <= graph["peak_mem_bytes"] + noise)
    return {"pass": all(criteria.values()), "criteria": criteria}


def device_name(device: str) -> str:
    """The GPU's name, or the CPU model as the kernel reports it (``platform.processor()`` is often just the
    architecture)."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def print_table(cfg: OverheadConfig, entries: list[dict], out=sys.stdout) -> None:
    metric = "cuda max_memory_allocated" if cfg.device == "cuda" else "peak RSS (ru_maxrss)"
    cpu_cols = cfg.device == "cpu"
    header = (f"\n{'tokens':>6}  {'variant':<13} {'wall med ms':>11} {'min ms':>8} {'spread':>6} {'wall x':>6} "
              f"{'paired x':>8}")
    if cpu_cols:
        header += f"  {'cpu med ms':>10} {'cpu x':>6}"
    header += f"  {'peak MiB':>8} {'base MiB':>8} {'mem x':>6} {'(peak-base) x':>13}"
    print(f"\nmachine: {device_name(cfg.device)}, {os.cpu_count()} cpu(s), {cfg.threads or 'default'} torch "
          "thread(s)", file=out)
    print(header, file=out)
    for e in entries:
        dapo = e["variants"]["dapo"]
        for name, v in e["variants"].items():
            line = (f"{e['tokens']:>6}  {name:<13} {v['median_wall_s'] * 1e3:>11.1f} {v['min_wall_s'] * 1e3:>8.1f} "
                    f"{v['spread_wall']:>6.2f} {v['median_wall_s'] / dapo['median_wall_s']:>6.3f} "
                    f"{e.get(f'time_ratio_paired_{name}') or 1.0:>8.3f}")
            if cpu_cols:
                line += f"  {v['median_cpu_s'] * 1e3:>10.1f} {v['median_cpu_s'] / dapo['median_cpu_s']:>6.3f}"
            peak, base = v.get("peak_mem_bytes"), v.get("base_mem_bytes")
            mx = f"{peak / dapo['peak_mem_bytes']:.3f}" if peak is not None else "-"
            dx = "-"
            if peak is not None and dapo["peak_mem_bytes"] > dapo["base_mem_bytes"]:
                dx = f"{(peak - base) / (dapo['peak_mem_bytes'] - dapo['base_mem_bytes']):.3f}"
            print(line + f"  {mib(peak):>8} {mib(base):>8} {mx:>6} {dx:>13}", file=out)
    print(f"time: torch.utils.benchmark medians of {cfg.reps} interleaved rounds after {cfg.warmup} warm-up "
          f"step(s); spread = "
          f"(max-min)/median of wall; 'x' = / dapo; 'paired x' = median over rounds of step / dapo's step in the "
          f"same round ({cfg.timer} time).", file=out)
    alloc = f", glibc mmap threshold {cfg.mem_malloc}" if cfg.device == "cpu" else ""
    print(f"memory: {metric}{alloc}, median peak of {cfg.mem_runs} fresh process(es) per variant (all runs in "
          "the JSON); base = after model+batch build; 'mem x' = peak / dapo peak (nothing subtracted); "
          "'(peak-base) x' = growth during the steps / dapo's.", file=out)
    if any(len(v.get("peak_mem_runs_bytes", [])) > 1 for e in entries for v in e["variants"].values()):
        for e in entries:
            print(f"  peaks per process, tokens={e['tokens']}: " + "; ".join(
                f"{n} " + "/".join(mib(p) for p in v["peak_mem_runs_bytes"])
                for n, v in e["variants"].items() if "peak_mem_runs_bytes" in v) + " MiB", file=out)


def contention_note(cfg: OverheadConfig, entries: list[dict], threads: int) -> tuple[float | None, str | None]:
    """CPU time / (wall time x threads) over all timed steps: ~1 on an idle machine, lower when other processes
    took the cores (descheduled threads accumulate no CPU time)."""
    if cfg.device != "cpu":
        return None, None
    wall = sum(sum(v["raw_wall_s"]) for e in entries for v in e["variants"].values())
    cpu = sum(sum(v["raw_cpu_s"]) for e in entries for v in e["variants"].values())
    utilization = cpu / (wall * threads) if wall > 0 else None
    if utilization is not None and utilization < 0.85:
        return utilization, (
            f"WARNING: the timed steps got {utilization:.0%} of {threads} thread(s) of CPU: other processes competed "
            "for the cores, wall times are noisy (see 'spread'); compare the cpu columns, or rerun on an idle "
            "machine or with --threads 1 --timer cpu.")
    return utilization, None



def main(argv=None) -> int:
    cfg = parse_args(argv)
    started = time.time()
    print(f"config: {json.dumps(cfg.as_json())}", flush=True)

    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda requested but torch.cuda.is_available() is False")

    # Memory first, in fresh processes, then timing in another (only one model on a shared GPU at a time).
    mem: dict[int, dict[str, list]] = {t: {} for t in cfg.token_list}
    if cfg.memory:
        jobs = [(tokens, name) for tokens in cfg.token_list for _ in range(cfg.mem_runs) for name in cfg.variants]
        with ThreadPoolExecutor(max_workers=cfg.mem_jobs) as pool:
            for (tokens, name), result in zip(jobs, pool.map(lambda job: measure_memory(cfg, job[1], job[0]), jobs)):
                mem[tokens].setdefault(name, []).append(result)
                print(f"  memory process {name:<13} tokens={tokens}: peak {mib(result['peak'])} MiB "
                      f"(base {mib(result['base'])} MiB)", flush=True)

    timing = run_fresh("erc_verl.bench.overhead:timing_process", cfg.as_json(),
                       malloc_env=malloc_env(cfg, cfg.time_malloc), live_output=True)
    entries = []
    for tokens in cfg.token_list:
        raw = timing["raw"][str(tokens)]
        entries.append(summarize(cfg, tokens, raw, mem[tokens]))
        print(f"  timed tokens={tokens}: " + ", ".join(
            f"{n} {t['median_wall_s'] * 1e3:.1f} ms" for n, t in raw.items()), flush=True)

    import torch
    import transformers

    import verl
    from verl.utils import torch_functional as verl_F

    print_table(cfg, entries)
    threads = timing["threads"]
    utilization, note = contention_note(cfg, entries, threads)
    if utilization is not None:
        print(f"cpu utilization of the timed steps: {utilization:.0%} of {threads} thread(s)")
    if note:
        print(note)
    head = entries[-1]  # the largest token count
    result = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": cfg.device,
        "device_name": device_name(cfg.device),
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "loadavg_before_after_timing": timing["loadavg_before_after"],
        "timing_malloc_env": timing["malloc_env"],
        "cpu_utilization": utilization,
        "contention_note": note,
        "flash_attn_cross_entropy": verl_F.FLAH_ATTN_CROSS_ENTROPY_LOSS_AVAILABLE,
        "versions": {"torch": torch.__version__, "verl": verl.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "config": cfg.as_json(),
        "memory_metric": "torch.cuda.max_memory_allocated" if cfg.device == "cuda" else "ru_maxrss",
        **{k: head[k] for k in head if k != "variants"},
        "variants": head["variants"],
        "sweep": entries if len(entries) > 1 else None,
    }
    if "erc" in cfg.variants and cfg.memory:
        result["check"] = c = check(head, cfg.device)
        scope = "" if (cfg.quick and cfg.device == "cpu") else " [the targets are defined for --quick on cpu]"
        keys = ("time_ratio_erc", "time_ratio_paired_erc", "mem_ratio_erc", "time_ratio_graph_entropy",
                "mem_ratio_graph_entropy")
        ratios = ", ".join(f"{k} {head[k]:.3f}" for k in keys if head.get(k) is not None)
        print(f"\n{'PASS' if c['pass'] else 'FAIL'} (tokens={head['tokens']}, {cfg.timer} time): {ratios} | "
              + "; ".join(f"{k}: {'ok' if ok else 'NO'}" for k, ok in c["criteria"].items()) + scope)
    result["wall_s"] = time.time() - started
    print(f"wall {result['wall_s']:.0f} s")
    if cfg.json:
        with open(cfg.json, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {cfg.json}")
    if cfg.check and not result.get("check", {}).get("pass", False):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
