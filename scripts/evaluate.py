#!/usr/bin/env python
r"""Evaluate checkpoints the way the ERC paper does (section 4.1, Table 1).

1. generate: k samples per problem at temperature 0.6 / top-p 0.95; 32768 max tokens for AIME24/25 and 16384
   otherwise; k=32 except MATH500 and OlympiadBench (k=4). One validation-only verl run per benchmark on all
   the GPUs given (rollout replicas on Ray; see erc_verl/paper/generation.py); Hydra overrides after ``--``:

    python scripts/evaluate.py generate --model ckpts/erc_dapo/merged_hf --data-dir data/erc \
        --out generations/erc_dapo --nnodes 2 --gpus-per-node 8

2. score (CPU): avg@k per benchmark with its spread, and pass@k, printed as Table-1-style tables; several runs
   side by side:

    python scripts/evaluate.py score DAPO=generations/dapo ERC-DAPO=generations/erc_dapo \
        --compare-paper 7b --json results.json

A run is ``[NAME=]PATH[,PATH...]``; PATH may be a directory (all ``*.jsonl`` inside).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

try:
    from erc_verl.paper import evaluation as E
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from erc_verl.paper import evaluation as E


def _parse_run(spec: str) -> tuple[str, list[str]]:
    name, sep, paths = spec.partition("=")
    if not sep:
        name, paths = "", spec
    files = [p for p in paths.split(",") if p]
    if not files:
        raise argparse.ArgumentTypeError(f"run {spec!r} names no file; use NAME=PATH[,PATH...]")
    if not name:
        first = files[0].rstrip("/")
        name = os.path.basename(first) if os.path.isdir(first) else os.path.splitext(os.path.basename(first))[0]
    return name, files


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="sample responses with verl's rollout on every GPU given")
    g.add_argument("--model", required=True, help="Hugging Face model dir (merge verl checkpoints first) or hub id")
    g.add_argument("--data-dir", default="data/erc", help="folder with <benchmark>.parquet from prepare_data.py")
    g.add_argument("--out", required=True, help="output folder: <benchmark>.jsonl per benchmark")
    g.add_argument("--benchmarks", nargs="+", help="subset, e.g. aime2024 math500 (default: all six)")
    g.add_argument("--n", type=int, help="samples per problem for every benchmark (default: the paper's k)")
    g.add_argument("--max-tokens", type=int, help="generation budget for every benchmark (default: the paper's)")
    g.add_argument("--temperature", type=float, default=E.SAMPLING["temperature"])
    g.add_argument("--top-p", type=float, default=E.SAMPLING["top_p"])
    g.add_argument("--nnodes", type=int, default=1, help="nodes of the Ray cluster (scripts/ray_cluster.sh)")
    g.add_argument("--gpus-per-node", type=int, default=8)
    g.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per vLLM replica")
    g.add_argument("--resume", action="store_true", help="keep benchmarks already in --out, sample the others")
    g.add_argument("overrides", nargs="*", help="Hydra overrides for the verl run, after --")

    s = sub.add_parser("score", help="score saved generations and print the table (CPU)")
    s.add_argument("runs", nargs="+", type=_parse_run, metavar="[NAME=]PATH[,PATH...]")
    s.add_argument("--compare-paper", choices=sorted(E.PAPER_RESULTS), help="also print the paper's rows")
    s.add_argument("--json", dest="json_out", help="write scores to this JSON file")
    s.add_argument("--markdown", action="store_true", help="print a Markdown table")
    s.add_argument("--skip-bad-lines", action="store_true", help="skip malformed lines instead of failing")
    return p


def cmd_score(args: argparse.Namespace) -> int:
    names = [name for name, _ in args.runs]
    if len(set(names)) != len(names):
        print(f"error: run names must be unique, got {names}; name them with NAME=PATH", file=sys.stderr)
        return 2
    runs = {}
    for name, files in args.runs:
        scores, warnings = E.score_files(files, skip_bad_lines=args.skip_bad_lines)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        runs[name] = scores
    rows = E.paper_rows(args.compare_paper) if args.compare_paper else []
    rows += [E.run_to_row(name, scores) for name, scores in runs.items()]
    print(E.format_table(rows, markdown=args.markdown))
    print("\npass@k (k = the samples per problem):")
    print(E.format_table([E.run_to_row(name, scores, metric="pass") for name, scores in runs.items()],
                         markdown=args.markdown))
    for name, scores in runs.items():
        for note in E.protocol_notes(name, scores):
            print(f"note: {note}")
    if args.json_out:
        os.makedirs(os.path.dirname(os.path.abspath(args.json_out)), exist_ok=True)
        with open(args.json_out, "w", encoding="utf-8") as f:
            json.dump(E.results_json(runs, args.compare_paper), f, indent=2)
        print(f"wrote {args.json_out}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from erc_verl.paper.generation import generate

    generate(model=args.model, data_dir=args.data_dir, out_dir=args.out, benchmarks=args.benchmarks,
             n_override=args.n, max_tokens_override=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
             nnodes=args.nnodes, gpus_per_node=args.gpus_per_node, tensor_parallel_size=args.tensor_parallel_size,
             resume=args.resume, overrides=args.overrides)
    return 0


def main(argv: list[str] | None = None) -> int:
    from erc_verl.paper.generation import GenerationSetupError

    args = build_parser().parse_args(argv)
    try:
        return cmd_score(args) if args.command == "score" else cmd_generate(args)
    except (E.GenerationsError, GenerationSetupError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
