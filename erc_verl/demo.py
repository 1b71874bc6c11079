"""``erc-verl demo``: a small but real RLVR run on CPU comparing DAPO with and without ERC.

A tiny random-init Qwen2 learns 3-operand single-digit arithmetic (``3+5-7=`` -> ``\\boxed{1}``,
scored by ``erc_verl.reward.compute_score``). After one shared supervised warm-up, every arm starts
from the same weights and sees the same prompts and sampling seeds; they differ only in the policy
loss taken from verl's registry (``vanilla`` vs ``grpo_erc``, optionally ``gppo`` / ``gppo_erc``).

Outputs under ``--out``: ``<arm>/metrics.jsonl`` (one row per RL step), ``<arm>/diagnostics/``
(sampled token records, see ``erc_verl.diagnostics``), ``training_curves.png``, the diagnostic
figures under ``figures/``, ``summary.csv`` and ``run.json``. The summary table is printed at the end.

This is a toy: it shows the mechanism end to end and how the arms differ *here*; it is not evidence
for or against the paper's claims at LLM scale.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np

# Preset sizes: --quick must stay well under 90 s on 2 busy cores (CI runs it); the default under 10 min.
PRESETS = {
    "quick": dict(steps=10, prompts=16, n=8, minibatches=4, warmup_steps=300),
    "default": dict(steps=60, prompts=64, n=8, minibatches=8, warmup_steps=300),
}
EVAL_PROBLEMS = 512


def build_parser(parser: Optional[argparse.ArgumentParser] = None) -> argparse.ArgumentParser:
    from erc_verl.demo_rl import ARMS

    p = parser or argparse.ArgumentParser(prog="erc-verl demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="./erc_demo", help="output directory (created; its files are overwritten)")
    p.add_argument("--arms", default="dapo,dapo_erc",
                   help=f"comma-separated arms to train, from: {', '.join(ARMS)} (default: dapo,dapo_erc)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small preset (~1 min) for smoke tests and CI")
    size = p.add_argument_group("size (defaults come from the preset)")
    size.add_argument("--steps", type=int, help="RL steps (rollout + mini-batch updates) per arm")
    size.add_argument("--prompts", type=int, help="prompts per RL batch")
    size.add_argument("--n", type=int, help="samples per prompt (GRPO group size)")
    size.add_argument("--minibatches", type=int, help="optimizer steps per RL batch (batch split by prompts)")
    size.add_argument("--warmup-steps", type=int, help="supervised warm-up steps before RL")
    algo = p.add_argument_group("algorithm")
    algo.add_argument("--lr", type=float, default=1e-4,
                      help="RL learning rate (AdamW); 1e-4 keeps PPO clipping near LLM-run levels (~0.3%%)")
    algo.add_argument("--erc-low", type=float, default=0.95, help="entropy_mask_low (paper: 0.95)")
    algo.add_argument("--erc-high", type=float, default=1.05, help="entropy_mask_high (paper: 1.05)")
    algo.add_argument("--clip-ratio-c", type=float, default=10.0, help="dual-clip bound for negative advantages")
    algo.add_argument("--grad-clip", type=float, default=1.0, help="gradient-norm clip (verl's default 1.0)")
    model = p.add_argument_group("model and run")
    model.add_argument("--hidden-size", type=int, default=64)
    model.add_argument("--layers", type=int, default=2)
    model.add_argument("--tokens-per-step", type=int, default=64, help="diagnostic tokens sampled per update")
    model.add_argument("--eval-every", type=int, default=5, help="greedy held-out accuracy every N steps")
    model.add_argument("--threads", type=int, default=1,
                       help="torch CPU threads (1: the model is tiny, and more threads slow down on busy cores)")
    model.add_argument("--no-progress", action="store_true", help="disable the tqdm progress bars")
    return p


@dataclass(frozen=True)
class DemoSettings:
    out: str
    arms: tuple[str, ...]
    seed: int
    steps: int
    prompts: int
    n: int
    minibatches: int
    warmup_steps: int
    lr: float
    erc_low: float
    erc_high: float
    clip_ratio_c: float
    grad_clip: float
    hidden_size: int
    layers: int
    tokens_per_step: int
    eval_every: int
    threads: int
    progress: bool


def settings_from_args(args: argparse.Namespace) -> DemoSettings:
    """Validate flags; errors name the flag and the fix."""
    from erc_verl.demo_rl import ARMS

    preset = PRESETS["quick" if args.quick else "default"]
    size = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in preset.items()}
    arms = tuple(a.strip() for a in args.arms.split(",") if a.strip())
    unknown = [a for a in arms if a not in ARMS]
    if not arms or unknown:
        raise SystemExit(f"erc-verl demo: unknown arm(s) {unknown or arms!r} in --arms; choose from {', '.join(ARMS)}.")
    if len(set(arms)) != len(arms):
        raise SystemExit(f"erc-verl demo: --arms lists an arm twice: {args.arms!r}.")
    for flag in ("steps", "prompts", "n", "minibatches"):
        if size[flag] <= 0:
            raise SystemExit(f"erc-verl demo: --{flag} must be positive, got {size[flag]}.")
    if size["warmup_steps"] < 0:
        raise SystemExit(f"erc-verl demo: --warmup-steps must be >= 0, got {size['warmup_steps']}.")
    if size["n"] < 2:
        raise SystemExit("erc-verl demo: --n must be >= 2: GRPO advantages compare samples of the same prompt.")
    if size["prompts"] % size["minibatches"]:
        raise SystemExit(
            f"erc-verl demo: --prompts ({size['prompts']}) must be a multiple of --minibatches ({size['minibatches']}); "
            "mini-batches hold whole prompt groups."
        )
    if not 0 <= args.erc_low < args.erc_high:
        raise SystemExit(f"erc-verl demo: need 0 <= --erc-low < --erc-high, got {args.erc_low} and {args.erc_high}.")
    if args.clip_ratio_c <= 1.0:
        raise SystemExit(f"erc-verl demo: --clip-ratio-c must be > 1 (dual clip), got {args.clip_ratio_c}.")
    for flag in ("lr", "grad_clip", "tokens_per_step", "eval_every", "threads", "hidden_size", "layers"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"erc-verl demo: --{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}.")
    if args.hidden_size % 32:
        raise SystemExit(f"erc-verl demo: --hidden-size must be a multiple of 32 (head size), got {args.hidden_size}.")
    _check_out_dir(args.out)
    return DemoSettings(out=args.out, arms=arms, seed=args.seed, **size, lr=args.lr, erc_low=args.erc_low,
                        erc_high=args.erc_high, clip_ratio_c=args.clip_ratio_c, grad_clip=args.grad_clip,
                        hidden_size=args.hidden_size, layers=args.layers, tokens_per_step=args.tokens_per_step,
                        eval_every=args.eval_every, threads=args.threads, progress=not args.no_progress)


def _check_out_dir(out: str) -> None:
    """--out must be, or become, a writable directory: refused now, in one line, not minutes into the run."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise SystemExit(f"erc-verl demo: --out {out} is a file, not a directory; choose another --out.")
    existing = os.path.abspath(out)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise SystemExit(f"erc-verl demo: --out {out} cannot be created: {existing} is a file; choose another --out.")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise SystemExit(f"erc-verl demo: --out {out}: {existing} is not writable; choose another --out.")


def _seed_everything(seed: int, threads: int):
    import random

    import torch

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _clear_token_files(directory: str):
    """Token files of an earlier demo run in the same --out would be mixed into the plots."""
    from erc_verl.diagnostics import FILE_PREFIX, FILE_SUFFIX

    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if name.startswith(FILE_PREFIX) and name.endswith(FILE_SUFFIX):
                os.remove(os.path.join(directory, name))


def train_arm(name: str, base_model, tokenizer, s: DemoSettings, score, eval_problems, progress) -> list[dict]:
    """Train one arm from a copy of the warmed-up model; writes and returns its metrics rows."""
    import torch

    from erc_verl.config import ERCDiagnosticsConfig
    from erc_verl.demo_rl import ARMS, actor_config, collect_rollout, greedy_accuracy, update_policy
    from erc_verl.demo_task import sample_problems
    from erc_verl.diagnostics import TokenDiagnostics

    arm_dir = os.path.join(s.out, name)
    diag_dir = os.path.join(arm_dir, "diagnostics")
    os.makedirs(diag_dir, exist_ok=True)
    _clear_token_files(diag_dir)
    diagnostics = TokenDiagnostics(
        ERCDiagnosticsConfig(dir=diag_dir, tokens_per_step=s.tokens_per_step, max_records=1_000_000, seed=s.seed)
    )
    config = actor_config(ARMS[name], prompts_per_minibatch=s.prompts // s.minibatches, n=s.n,
                          erc_low=s.erc_low, erc_high=s.erc_high, clip_ratio_c=s.clip_ratio_c)

    # Same weights, prompts and sampling stream in every arm.
    torch.manual_seed(s.seed + 1)
    model = copy.deepcopy(base_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=0.01)
    problem_rng = np.random.default_rng(s.seed + 2)
    sampler = torch.Generator().manual_seed(s.seed + 3)

    rows = []
    with open(os.path.join(arm_dir, "metrics.jsonl"), "w", encoding="utf-8") as out:
        for step in range(1, s.steps + 1):
            rollout = collect_rollout(model, tokenizer, sample_problems(problem_rng, s.prompts), s.n, sampler, score)
            mask = rollout.response_mask
            row = {
                "arm": name,
                "step": step,
                "reward": float(rollout.scores.mean()),
                "entropy": float((rollout.old_entropy * mask).sum() / mask.sum()),
                "response_length": float(mask.sum(dim=1).mean()),
            }
            row.update(update_policy(model, optimizer, rollout, config, s.minibatches, s.n, s.grad_clip, diagnostics))
            if step % s.eval_every == 0 or step == s.steps:
                row["eval_acc"] = greedy_accuracy(model, tokenizer, eval_problems, score)
            rows.append(row)
            out.write(json.dumps(row) + "\n")
            out.flush()
            if progress is not None:
                progress.update(1)
                progress.set_postfix(arm=name, reward=f"{row['reward']:.2f}", H=f"{row['entropy']:.3f}", refresh=False)
    diagnostics.close()
    return rows


def summarize(rows_by_arm: dict[str, list[dict]], initial_eval: float):
    """One row per arm: variability of entropy and grad norm (std of step-to-step changes), reward, clipping."""
    import pandas as pd

    table = []
    for arm, rows in rows_by_arm.items():
        df = pd.DataFrame(rows)
        tail = max(1, len(df) // 5)
        table.append({
            "arm": arm,
            "reward_first": df["reward"].head(tail).mean(),
            "reward_last": df["reward"].tail(tail).mean(),
            "eval_acc_start": initial_eval,
            "eval_acc_end": df["eval_acc"].dropna().iloc[-1],
            "entropy_mean": df["entropy"].mean(),
            "entropy_dstd": df["entropy"].diff().std(),
            "grad_norm_mean": df["grad_norm"].mean(),
            "grad_norm_std": df["grad_norm"].std(),
            "grad_norm_dstd": df["grad_norm"].diff().std(),
            "grad_norm_max": df["grad_norm_max"].max(),
            "ppo_kl_mean": df["ppo_kl"].mean(),
            "pg_clipfrac": df["pg_clipfrac"].mean(),
            "erc_clipfrac": df["erc_clipfrac"].mean(),
            "rho_std": df["entropy_ratio_std"].mean(),
            "rho_outside": df["entropy_ratio_outside_frac"].mean(),
        })
    return pd.DataFrame(table).set_index("arm")


SUMMARY_LEGEND = """\
reward_first/last: mean sampled reward over the first/last fifth of RL steps; eval_acc: greedy accuracy on
{n} held-out problems; *_dstd: std of step-to-step changes (the paper's 'fluctuation'); rho_std: std of the
entropy ratio over update tokens; rho_outside: fraction of tokens outside the ERC band (measured in every arm,
gated only in ERC arms); pg_clipfrac / erc_clipfrac: as logged by the loss (erc is 0 without the gate)."""


def run(s: DemoSettings) -> dict:
    """The whole demo; returns paths and timings (also written to run.json)."""
    t_start = time.perf_counter()
    _seed_everything(s.seed, s.threads)
    import torch
    from tqdm.auto import tqdm

    try:
        from erc_verl.reward import compute_score
    except ImportError as e:  # pragma: no cover - the package ships it
        raise SystemExit(f"erc-verl demo needs erc_verl.reward.compute_score ({e}); reinstall the package.") from e
    from erc_verl.demo_rl import cached_scorer, greedy_accuracy
    from erc_verl.demo_task import build_policy, build_tokenizer, sample_problems, warm_up
    from erc_verl.plots import make_diagnostics_figures, plot_training_curves

    os.makedirs(s.out, exist_ok=True)
    score = cached_scorer(compute_score)
    tokenizer = build_tokenizer()
    eval_problems = sample_problems(np.random.default_rng(10_000 + s.seed), EVAL_PROBLEMS)

    torch.manual_seed(s.seed)
    base = build_policy(len(tokenizer), s.hidden_size, s.layers, tokenizer)
    # In logs (no TTY) redraw rarely: every redraw is another line there.
    bar_kw = dict(disable=not s.progress, mininterval=0.2 if sys.stderr.isatty() else 10.0)
    bar = tqdm(total=s.warmup_steps, desc="warm-up", leave=False, **bar_kw)
    warm_losses = warm_up(base, tokenizer, np.random.default_rng(s.seed), s.warmup_steps, progress=bar)
    bar.close()
    initial_eval = greedy_accuracy(base, tokenizer, eval_problems, score)
    t_warm = time.perf_counter()

    rows_by_arm = {}
    bar = tqdm(total=s.steps * len(s.arms), desc="RL", **bar_kw)
    for arm in s.arms:
        rows_by_arm[arm] = train_arm(arm, base, tokenizer, s, score, eval_problems, bar)
    bar.close()
    t_rl = time.perf_counter()

    curves = os.path.join(s.out, "training_curves.png")
    plot_training_curves(rows_by_arm, curves, title=f"ERC demo (seed {s.seed})")
    figures = make_diagnostics_figures(
        [os.path.join(s.out, arm, "diagnostics") for arm in s.arms], list(s.arms), os.path.join(s.out, "figures"),
        erc_low=s.erc_low, erc_high=s.erc_high, seed=s.seed,
    )
    summary = summarize(rows_by_arm, initial_eval)
    summary.to_csv(os.path.join(s.out, "summary.csv"))
    t_end = time.perf_counter()

    info = {
        "settings": asdict(s),
        "warmup": {"final_loss": warm_losses[-1] if warm_losses else None, "eval_acc": initial_eval},
        "seconds": {"warmup": t_warm - t_start, "rl": t_rl - t_warm, "total": t_end - t_start},
        "outputs": {"training_curves": curves, "figures": figures,
                    "metrics": {arm: os.path.join(s.out, arm, "metrics.jsonl") for arm in s.arms}},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "verl": __import__("verl").__version__, "transformers": __import__("transformers").__version__},
    }
    with open(os.path.join(s.out, "run.json"), "w", encoding="utf-8") as f:
        json.dump(info, f, indent=2)

    import pandas as pd

    with pd.option_context("display.width", 200, "display.max_columns", 50, "display.float_format", "{:.4g}".format):
        print(f"\nERC demo summary ({s.steps} RL steps x {s.prompts} prompts x {s.n} samples, "
              f"{s.minibatches} mini-batches/step, lr {s.lr}, seed {s.seed}):")
        print(summary.T.to_string())
    print(SUMMARY_LEGEND.format(n=EVAL_PROBLEMS))
    print(f"\nwrote {s.out}  (warm-up {t_warm - t_start:.0f}s, RL {t_rl - t_warm:.0f}s, total {t_end - t_start:.0f}s)")
    return info


def main(argv: Optional[Sequence[str]] = None, parser: Optional[argparse.ArgumentParser] = None) -> int:
    args = build_parser(parser).parse_args(argv)
    run(settings_from_args(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
