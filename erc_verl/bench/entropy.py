"""Time the log-prob and entropy functions on one (tokens x vocab) logits tensor (``torch.utils.benchmark``).

Log-prob pass of the update, forward and backward (what the actor step pays for the head):
  verl_log_probs            verl.utils.torch_functional.logprobs_from_logits (DAPO; verl's torch kernel here)
  verl_log_probs+entropy    the same plus ERC's graph-free entropy as a separate pass (where flash-attn keeps
                            verl's kernel)
  erc_one_pass              erc_verl.algorithm.entropy.log_probs_and_entropy (ERC without flash-attn)

Entropy alone, graph-free:
  verl                      verl's entropy_from_logits (whole tensor)
  verl_chunked              verl's entropy_from_logits_with_chunking, rows per chunk as ERC's chunks
  erc                       erc_verl.algorithm.entropy.entropy_from_logits_no_grad

Each row gives the median of ``torch.utils.benchmark``'s blocked runs and the largest deviation from a float64
reference on the first 64 rows (log-prob or entropy). On CPU the measuring runs in a fresh interpreter with glibc
keeping freed memory (``erc_verl.bench.fresh``, as ``bench_overhead``'s timing process): otherwise each backward's
(tokens x vocab) gradient is mapped afresh and page faults dominate what is timed.

Example:
  python scripts/bench_entropy.py --tokens 512 --vocab 151936
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from typing import Literal, Optional

from erc_verl.flags import add_dataclass_flags, config_from_args, flag, option
from erc_verl.bench.fresh import MALLOC_ENV, run_fresh
from erc_verl.bench.overhead import device_name


@dataclass
class EntropyBenchConfig:
    """What ``scripts/bench_entropy.py`` times: one logits tensor, each function on it; checked where it is built."""

    tokens: int = option(512, "rows of the logits tensor")
    vocab: int = option(151_936, "vocabulary size (Qwen2's by default)")
    dtype: Literal["float32", "bfloat16"] = option("float32", "dtype of the logits")
    device: Literal["cpu", "cuda"] = option("cpu", "where the logits live")
    scale: float = option(3.0, "logit standard deviation")
    min_run_time: float = option(2.0, "seconds per row (torch.utils.benchmark blocked_autorange)")
    threads: Optional[int] = option(None, "torch threads (default: torch's)")

    def __post_init__(self):
        for name, low in (("tokens", 1), ("vocab", 2), ("min_run_time", 0), ("threads", 1)):
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ValueError(f"{flag(name)} must be >= {low}, got {getattr(self, name)}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_dataclass_flags(p, EntropyBenchConfig)
    cfg = config_from_args(p, EntropyBenchConfig, p.parse_args(argv))
    if cfg.device == "cpu":  # glibc keeping freed memory, which it reads once, at start: a fresh interpreter
        report = run_fresh("erc_verl.bench.entropy:measure", dataclasses.asdict(cfg),
                           malloc_env=MALLOC_ENV["cached"])
    else:
        report = measure(dataclasses.asdict(cfg))
    print(report["header"])
    for name, median, error in report["rows"]:
        print(f"  {name:<33} {median * 1e3:8.1f} ms   max |error| {error:.1e}")


def measure(cfg_json: dict) -> dict:
    """Every function timed on one logits tensor: a header line and (name, median seconds, max error) rows."""
    import torch
    from torch.utils import benchmark

    from verl.utils import torch_functional as verl_F

    from erc_verl.algorithm.entropy import default_chunk_rows, entropy_from_logits_no_grad, log_probs_and_entropy

    args = EntropyBenchConfig(**cfg_json)

    threads = args.threads or torch.get_num_threads()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(args.tokens, args.vocab, generator=g) * args.scale).to(args.device, dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), generator=g).to(args.device)
    upstream = torch.randn(args.tokens, generator=g).to(args.device)
    leaf = logits.clone().requires_grad_()
    rows = default_chunk_rows(logits)

    def verl_log_probs_and_entropy(x, y):
        entropy_from_logits_no_grad(x)
        return verl_F.logprobs_from_logits(x, y)

    def one_pass(x, y):
        return log_probs_and_entropy(x, y)[0]

    passes = {"verl_log_probs": verl_F.logprobs_from_logits, "verl_log_probs+entropy": verl_log_probs_and_entropy,
              "erc_one_pass": one_pass}
    entropies = {
        "verl": verl_F.entropy_from_logits,
        "verl_chunked": lambda x: verl_F.entropy_from_logits_with_chunking(x, chunk_size=rows),
        "erc": entropy_from_logits_no_grad,
    }

    def step(fn):
        leaf.grad = None
        fn(leaf, labels).backward(upstream)

    head = logits[:64].double().log_softmax(-1)
    exact_log_probs = head.gather(-1, labels[:64, None]).squeeze(-1)
    exact_entropy = -(head.exp() * head).sum(-1)
    timers = [(f"{name} (fwd+bwd)", benchmark.Timer("step(fn)", globals={"step": step, "fn": fn},
                                                    num_threads=threads, label="update pass"),
               (fn(logits[:64], labels[:64]).detach().double() - exact_log_probs).abs().max().item())
              for name, fn in passes.items()]
    with torch.no_grad():
        timers += [(name, benchmark.Timer("fn(x)", globals={"fn": fn, "x": logits}, num_threads=threads,
                                          label="entropy alone"),
                    (fn(logits[:64]).double() - exact_entropy).abs().max().item())
                   for name, fn in entropies.items()]
    header = (f"logits {args.tokens} x {args.vocab} {args.dtype} on {device_name(args.device)}, {threads} "
              f"thread(s), {rows} rows per chunk; median of torch.utils.benchmark "
              f"blocked_autorange({args.min_run_time} s)")
    results = []
    for name, timer, error in timers:
        grad = torch.enable_grad() if "fwd+bwd" in name else torch.no_grad()
        with grad:
            results.append((name, timer.blocked_autorange(min_run_time=args.min_run_time).median, error))
    return {"header": header, "rows": results}


if __name__ == "__main__":
    main()
