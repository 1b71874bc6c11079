"""Figures for ERC runs: training curves (paper figure 2) and token-level diagnostics (figures 1a, 3, 4,
and the clip-fraction comparison of section 5), drawn from the files :mod:`erc_verl.seams.diagnostics` writes.

Figures are built with matplotlib's object API (``Figure``, ``fig.subplots``, ``fig.savefig``): no pyplot state
and no backend switch, so importing this module leaves a notebook's backend alone. Scatter plots draw at most
``max_points`` tokens per panel, chosen at random with a fixed seed, so large runs stay readable.
"""

from __future__ import annotations

import glob
import json
import logging
import os
from typing import Mapping, Optional, Sequence

import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from erc_verl.demo import metrics
from erc_verl.seams.diagnostics import FILE_PREFIX, FILE_SUFFIX

logger = logging.getLogger(__name__)

# Paper colours: blue kept, red clipped by the upper bound, yellow by the lower bound (figure 3),
# orange for "clipped by ERC" in figure 4.
KEPT, UPPER, LOWER, CLIPPED = "#1f77b4", "#d62728", "#e6b400", "#ff7f0e"
RATIO_FLOOR = 1e-3  # entropy ratios are drawn on a log axis; clamp the rare exact zeros


def load_token_records(directory: str) -> pd.DataFrame:
    """All ``tokens-*.jsonl`` files under ``directory`` (recursively) as one frame.

    A truncated last line (a process killed mid-write) is skipped, not fatal.
    """
    paths = sorted(glob.glob(os.path.join(directory, "**", f"{FILE_PREFIX}*{FILE_SUFFIX}"), recursive=True))
    if not paths:
        raise FileNotFoundError(
            f"no diagnostics files ({FILE_PREFIX}*{FILE_SUFFIX}) under {directory!r}; enable them with "
            "actor_rollout_ref.actor.erc_diagnostics.dir=<dir> or run `erc-verl demo`."
        )
    records, bad = [], 0
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    bad += 1
    if bad:
        logger.warning("skipped %d unreadable line(s) under %s", bad, directory)
    if not records:
        raise ValueError(f"diagnostics files under {directory!r} hold no records.")
    df = pd.DataFrame.from_records(records)
    df["erc_direction"] = df["erc_direction"].fillna("")
    return df


def _subsample(df: pd.DataFrame, max_points: int, seed: int) -> pd.DataFrame:
    return df if len(df) <= max_points else df.sample(n=max_points, random_state=seed)


def panels(count: int, width: float = 5.0, height: float = 4.2):
    """A figure with ``count`` panels side by side, and their axes."""
    fig = Figure(figsize=(width * count, height))
    return fig, fig.subplots(1, count, squeeze=False)[0]


RATIO_TICKS = (0.01, 0.1, 0.2, 0.5, 0.7, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 5.0, 10.0, 100.0)


def _ratio_axis(ax, erc_low: Optional[float], erc_high: Optional[float]):
    """Log scale (ratios 2 and 1/2 are equally far from 1), plain-number ticks; call after plotting."""
    ax.set_yscale("log")
    lo, hi = ax.get_ylim()
    ax.yaxis.set_major_locator(matplotlib.ticker.FixedLocator([t for t in RATIO_TICKS if lo <= t <= hi]))
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    for bound in (erc_low, erc_high):
        if bound:
            ax.axhline(bound, color="k", lw=0.8, ls="--")
    ax.set_ylabel("entropy ratio  H(π_θ) / H(π_old)")


def save(fig: Figure, path: str) -> str:
    """Lay out and write ``fig`` (the file's extension picks the format); returns ``path``."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_prob_vs_entropy_ratio(frames: Mapping[str, pd.DataFrame], path: str, erc_low=None, erc_high=None,
                               max_points: int = 20_000, seed: int = 0) -> str:
    """Figure 1a: sampled-token probability vs entropy ratio; dashed lines mark the ERC band."""
    fig, axes = panels(len(frames))
    for ax, (label, df) in zip(axes, frames.items()):
        d = _subsample(df, max_points, seed)
        ax.scatter(d["prob"], d["entropy_ratio"].clip(lower=RATIO_FLOOR), s=3, alpha=0.35, color=KEPT, lw=0)
        _ratio_axis(ax, erc_low, erc_high)
        ax.set_xlabel("sampled-token probability π_θ(y_t)")
        ax.set_title(f"{label}: probability vs entropy ratio (n={len(df)})")
    return save(fig, path)


def plot_clipping_regions(frames: Mapping[str, pd.DataFrame], path: str, clip_low: float = 0.2,
                          clip_high: float = 0.28, erc_low=None, erc_high=None, max_points: int = 20_000,
                          seed: int = 0) -> str:
    """Figure 3: kept tokens vs tokens ERC clipped above / below the band.

    Top row: old vs new probability of the sampled token with the PPO trust region
    ``(1-eps_low) pi_old .. (1+eps_high) pi_old``, to show where ERC acts relative to PPO-clip.
    Bottom row: probability vs entropy ratio, the band the gate actually tests.
    """
    fig = Figure(figsize=(5.0 * len(frames), 8.4))
    axes = fig.subplots(2, len(frames), squeeze=False)
    groups = (("kept", KEPT, lambda d: d["erc_direction"] == ""),
              ("ERC clipped: above", UPPER, lambda d: d["erc_direction"] == "upper"),
              ("ERC clipped: below", LOWER, lambda d: d["erc_direction"] == "lower"))
    for col, (label, df) in enumerate(frames.items()):
        d = _subsample(df, max_points, seed)
        top, bottom = axes[0][col], axes[1][col]
        for name, color, select in groups:
            part = d[select(d)]
            n_all = int(select(df).sum())
            kw = dict(s=3 if name == "kept" else 6, alpha=0.35 if name == "kept" else 0.7, color=color, lw=0)
            top.scatter(part["old_prob"], part["prob"], label=f"{name} ({n_all})", **kw)
            bottom.scatter(part["prob"], part["entropy_ratio"].clip(lower=RATIO_FLOOR), **kw)
        grid = np.linspace(0, 1, 101)
        top.plot(grid, np.clip((1 + clip_high) * grid, 0, 1), "k--", lw=0.8)
        top.plot(grid, (1 - clip_low) * grid, "k--", lw=0.8)
        top.set_xlabel("π_old(y_t)")
        top.set_ylabel("π_θ(y_t)")
        top.set_title(f"{label}: clipping regions")
        top.legend(loc="upper left", fontsize=8, markerscale=3)
        _ratio_axis(bottom, erc_low, erc_high)
        bottom.set_xlabel("sampled-token probability π_θ(y_t)")
    return save(fig, path)


def plot_prob_vs_entropy(frames: Mapping[str, pd.DataFrame], path: str, max_points: int = 20_000,
                         seed: int = 0) -> str:
    """Figure 4: sampled-token probability vs the entropy of its distribution, ERC-clipped vs kept."""
    fig, axes = panels(len(frames))
    for ax, (label, df) in zip(axes, frames.items()):
        d = _subsample(df, max_points, seed)
        kept, clipped = d[~d["erc_clipped"]], d[d["erc_clipped"]]
        ax.scatter(kept["prob"], kept["entropy"], s=3, alpha=0.35, color=KEPT, lw=0,
                   label=f"kept ({int((~df['erc_clipped']).sum())})")
        ax.scatter(clipped["prob"], clipped["entropy"], s=6, alpha=0.7, color=CLIPPED, lw=0,
                   label=f"ERC clipped ({int(df['erc_clipped'].sum())})")
        ax.set_xlabel("sampled-token probability π_θ(y_t)")
        ax.set_ylabel("entropy H(π_θ, t)")
        ax.set_title(f"{label}: probability vs entropy")
        ax.legend(loc="upper right", fontsize=8, markerscale=3)
    return save(fig, path)


def clip_fractions(df: pd.DataFrame) -> dict[str, float]:
    """Fractions of sampled tokens clipped by PPO-clip only, ERC only, both, and either."""
    ppo, erc = df["ppo_clipped"].astype(bool), df["erc_clipped"].astype(bool)
    n = max(len(df), 1)
    return {
        "PPO-clip only": float((ppo & ~erc).sum() / n),
        "ERC only": float((erc & ~ppo).sum() / n),
        "both": float((ppo & erc).sum() / n),
        "either": float((ppo | erc).sum() / n),
    }


def plot_clip_fractions(frames: Mapping[str, pd.DataFrame], path: str) -> str:
    """Section 5: how many tokens each mechanism clips, alone and together, per run."""
    table = pd.DataFrame({label: clip_fractions(df) for label, df in frames.items()})
    fig = Figure(figsize=(max(5.0, 1.6 * len(frames) + 3.5), 4.2))
    ax = fig.subplots()
    width = 0.8 / max(len(frames), 1)
    x = np.arange(len(table.index))
    for i, label in enumerate(table.columns):
        bars = ax.bar(x + i * width - 0.4 + width / 2, table[label].values, width, label=label)
        ax.bar_label(bars, labels=[f"{v:.1%}" for v in table[label].values], fontsize=7, padding=1)
    ax.set_xticks(x, table.index)
    ax.yaxis.set_major_formatter(matplotlib.ticker.PercentFormatter(1.0, decimals=1))
    ax.set_ylabel("share of sampled response tokens")
    ax.set_title("Tokens clipped by PPO-clip vs ERC")
    ax.legend(fontsize=8)
    return save(fig, path)


def make_diagnostics_figures(directories: Sequence[str], labels: Optional[Sequence[str]], out_dir: str,
                             erc_low: Optional[float] = 0.95, erc_high: Optional[float] = 1.05,
                             clip_low: float = 0.2, clip_high: float = 0.28, max_points: int = 20_000,
                             seed: int = 0) -> list[str]:
    """Load each directory and write fig1a/fig3/fig4/clip_fractions PNGs (one panel per directory)."""
    labels = list(labels) if labels else [os.path.basename(os.path.normpath(d)) or d for d in directories]
    if len(labels) != len(directories):
        raise ValueError(f"got {len(labels)} labels for {len(directories)} directories; pass one label per directory.")
    frames = {label: load_token_records(d) for label, d in zip(labels, directories)}
    os.makedirs(out_dir, exist_ok=True)
    return [
        plot_prob_vs_entropy_ratio(frames, os.path.join(out_dir, "fig1a_prob_vs_entropy_ratio.png"),
                                   erc_low, erc_high, max_points, seed),
        plot_clipping_regions(frames, os.path.join(out_dir, "fig3_clipping_regions.png"), clip_low, clip_high,
                              erc_low, erc_high, max_points, seed),
        plot_prob_vs_entropy(frames, os.path.join(out_dir, "fig4_prob_vs_entropy.png"), max_points, seed),
        plot_clip_fractions(frames, os.path.join(out_dir, "clip_fractions.png")),
    ]


CURVES = (
    (metrics.REWARD, "reward (line: rollout batch, dots: validation)"),
    (metrics.ENTROPY, "entropy (update tokens)"),
    (metrics.GRAD_NORM, "gradient norm (mean over the step's updates)"),
    (metrics.PG_CLIPFRAC, "PPO clip fraction"),
    (metrics.ERC_CLIPFRAC, "ERC clip fraction (ERC arms)"),
    (metrics.RATIO_STD, "std of entropy ratio (ERC arms)"),
)


def plot_training_curves(rows_by_arm: Mapping[str, Sequence[Mapping]], path: str, title: str = "") -> str:
    """Figure 2-style curves per arm from verl's logged metrics (one row per step, as its file logger writes)."""
    fig = Figure(figsize=(15, 7.5))
    axes = fig.subplots(2, 3)
    for index, (arm, rows) in enumerate(rows_by_arm.items()):
        color = f"C{index}"  # one colour per arm in every panel, also where only ERC arms have a curve
        for ax, (key, name) in zip(axes.flat, CURVES):
            steps, values = metrics.series(rows, key)
            if len(steps):
                ax.plot(steps, values, label=arm, lw=1.3, color=color)
            val_key = metrics.val_accuracy_key(rows) if key == metrics.REWARD else None
            if val_key:
                val_steps, val = metrics.series(rows, val_key)
                ax.plot(val_steps, val, ls=":", marker="o", ms=3, lw=1, label=f"{arm} (validation)", color=color)
            ax.set_title(name, fontsize=10)
            ax.set_xlabel("RL step")
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    return save(fig, path)
