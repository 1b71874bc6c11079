#!/usr/bin/env python
"""Plot ERC token diagnostics: paper figures 1a, 3, 4 and the clip-fraction comparison of section 5.

Input: one or more directories holding ``tokens-*.jsonl`` files, written by a training run with
``actor_rollout_ref.actor.erc_diagnostics.dir=<dir>`` or by ``erc-verl demo`` (``<out>/<arm>/diagnostics``).
Several directories are drawn side by side (one panel each) and compared in the clip-fraction chart.

    python scripts/plot_erc_diagnostics.py runs/dapo/diag runs/dapo_erc/diag --labels DAPO ERC-DAPO --out plots/
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="diagnostics directories (searched recursively for tokens-*.jsonl)")
    p.add_argument("--labels", nargs="+", help="one label per directory (default: directory names)")
    p.add_argument("--out", required=True, help="output directory for the PNGs")
    p.add_argument("--erc-low", type=float, default=0.95, help="ERC band drawn as reference lines (entropy_mask_low)")
    p.add_argument("--erc-high", type=float, default=1.05, help="entropy_mask_high")
    p.add_argument("--clip-low", type=float, default=0.2, help="PPO clip_ratio_low, for the trust-region lines")
    p.add_argument("--clip-high", type=float, default=0.28, help="PPO clip_ratio_high")
    p.add_argument("--max-points", type=int, default=20_000, help="scatter points drawn per panel (random subset)")
    p.add_argument("--seed", type=int, default=0, help="seed of that subset")
    args = p.parse_args(argv)
    if args.labels and len(args.labels) != len(args.dirs):
        p.error(f"--labels got {len(args.labels)} labels for {len(args.dirs)} directories; give one per directory.")
    if args.max_points <= 0:
        p.error("--max-points must be positive.")

    from erc_verl.demo.plots import make_diagnostics_figures

    try:
        paths = make_diagnostics_figures(args.dirs, args.labels, args.out, erc_low=args.erc_low, erc_high=args.erc_high,
                                         clip_low=args.clip_low, clip_high=args.clip_high,
                                         max_points=args.max_points, seed=args.seed)
    except (FileNotFoundError, ValueError) as e:
        p.error(str(e))
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
