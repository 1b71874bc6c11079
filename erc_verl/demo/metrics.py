"""Reading verl's per-step metrics (its file logger's rows) for the demo's summary, curves and the sweep."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

REWARD = "critic/score/mean"           # mean sequence score of the rollout batch (math reward: accuracy)
ENTROPY = "actor/entropy"              # mean entropy of the update's response tokens (current policy)
GRAD_NORM = "actor/grad_norm"          # mean over the step's optimizer steps (mini-batches)
PG_CLIPFRAC = "actor/pg_clipfrac"      # tokens PPO-clip cut
PPO_KL = "actor/ppo_kl"                # mean old-to-current log-ratio (how far the updates drifted)
ERC_CLIPFRAC = "actor/erc_clipfrac"    # tokens the ERC gate cut (ERC arms only)
RATIO_STD = "actor/entropy_ratio_std"  # spread of H(pi_theta)/H(pi_old) over update tokens (ERC arms only)
VAL_PREFIX = "val-core/"               # verl's headline validation metrics, e.g. val-core/<source>/acc/mean@8


def val_accuracy_key(rows: Sequence[Mapping]) -> Optional[str]:
    """The validation accuracy metric verl logged (``val-core/<data source>/acc/mean@<n>``), if any."""
    keys = sorted({k for row in rows for k in row if k.startswith(VAL_PREFIX) and "/acc/mean@" in k})
    if len(keys) > 1:
        raise ValueError(f"several validation accuracies in one run: {keys}; the demo expects one data source.")
    return keys[0] if keys else None


def series(rows: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of the rows that logged ``key``."""
    pairs = [(row["step"], row[key]) for row in rows if key in row and row[key] is not None]
    steps, values = zip(*pairs) if pairs else ((), ())
    return np.asarray(steps, dtype=float), np.asarray(values, dtype=float)


def fluctuation(values: np.ndarray) -> float:
    """Std of step-to-step changes: how much a curve jumps, not where it drifts (the paper's 'fluctuation')."""
    return float(np.std(np.diff(values), ddof=1)) if len(values) >= 3 else math.nan


def run_summary(rows: Sequence[Mapping]) -> dict[str, float]:
    """One training run in numbers: reward, validation accuracy, entropy and grad-norm level and fluctuation,
    clipping. Metrics a run did not log (ERC's, in a baseline arm) are NaN."""
    _, reward = series(rows, REWARD)  # training steps only (a validation before RL logs step 0 without it)
    out: dict[str, float] = {"steps": float(len(reward))}
    tail = max(1, len(reward) // 5)
    out["reward_first"] = float(np.mean(reward[:tail])) if len(reward) else math.nan
    out["reward_last"] = float(np.mean(reward[-tail:])) if len(reward) else math.nan
    val_key = val_accuracy_key(rows)
    val_steps, val = series(rows, val_key) if val_key else (np.array([]), np.array([]))
    out["val_acc_start"] = float(val[0]) if len(val) and val_steps[0] == 0 else math.nan
    out["val_acc_end"] = float(val[-1]) if len(val) and val_steps[-1] > 0 else math.nan
    for name, key in (("entropy", ENTROPY), ("grad_norm", GRAD_NORM)):
        _, values = series(rows, key)
        out[f"{name}_mean"] = float(np.mean(values)) if len(values) else math.nan
        out[f"{name}_fluct"] = fluctuation(values)
    _, grad = series(rows, GRAD_NORM)
    out["grad_norm_max"] = float(np.max(grad)) if len(grad) else math.nan
    for name, key in (("ppo_kl", PPO_KL), ("pg_clipfrac", PG_CLIPFRAC), ("erc_clipfrac", ERC_CLIPFRAC),
                      ("entropy_ratio_std", RATIO_STD)):
        _, values = series(rows, key)
        out[name] = float(np.mean(values)) if len(values) else math.nan
    return out


SUMMARY_LEGEND = """\
reward_first/last: mean rollout reward over the first/last fifth of steps; val_acc_start/end: verl's validation
accuracy before RL and after the last step; *_fluct: std of step-to-step changes (the paper's 'fluctuation');
ppo_kl, pg_clipfrac, erc_clipfrac, entropy_ratio_std: step means of verl's actor metrics (ERC's only in ERC arms)."""
