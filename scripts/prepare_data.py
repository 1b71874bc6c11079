#!/usr/bin/env python
r"""Build the verl RL parquet files used by the ERC recipes.

From the Hugging Face hub (needs network; run on your machine):

    python scripts/prepare_data.py                                     # train + all 6 benchmarks
    python scripts/prepare_data.py --only aime2024 aime2025

From local files (offline), one dataset at a time:

    python scripts/prepare_data.py --from-file aime24.jsonl --dataset-name aime2024 \
        --question-key problem --answer-key answer

Writes ``<out-dir>/train.parquet`` and ``<out-dir>/<benchmark>.parquet``; the default out-dir
``data/erc`` is where the recipes look (their ``DATA_DIR``).
"""

from __future__ import annotations

import argparse
import os
import sys

try:
    from erc_verl.paper import data as D
except ImportError:  # running from a checkout without `pip install -e .`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from erc_verl.paper import data as D


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out-dir", default="data/erc", help="output folder (default: data/erc, the recipes' DATA_DIR)")
    p.add_argument(
        "--only",
        nargs="+",
        choices=sorted(D.ALL_SPECS),
        help="hub datasets to build (default: all of them)",
    )
    p.add_argument("--from-file", help="build one dataset from a local .json/.jsonl/.parquet file instead of the hub")
    p.add_argument(
        "--dataset-name",
        help="with --from-file: output name and data_source, e.g. train, aime2024, math500 (or any name)",
    )
    p.add_argument("--question-key", help="column holding the question (default: the dataset's or auto-detected)")
    p.add_argument("--answer-key", help="column holding the answer (default: the dataset's or auto-detected)")
    p.add_argument("--split", help="extra_info.split to record (default: train for 'train', else test)")
    p.add_argument(
        "--prompt-template",
        default="boxed",
        choices=sorted(D.PROMPT_TEMPLATES),
        help="'boxed' appends the step-by-step/\\boxed{} instruction (default); 'raw' keeps the bare question",
    )
    p.add_argument("--max-rows", type=int, help="keep only the first N rows (smoke tests)")
    args = p.parse_args(argv)
    if args.from_file and not args.dataset_name:
        p.error("--from-file needs --dataset-name (e.g. --dataset-name aime2024)")
    if args.from_file and args.only:
        p.error("use either --from-file or --only, not both")
    if args.max_rows is not None and args.max_rows <= 0:
        p.error("--max-rows must be positive")
    return args


def _build(records, name, split, qkey, akey, template, source, max_rows, out_dir) -> str:
    rows, skipped = D.build_rows(records, name, split, qkey, akey, template, source, max_rows)
    path = D.write_parquet(rows, D.output_path(out_dir, name))
    note = f" ({skipped} rows skipped: missing question or answer)" if skipped else ""
    print(f"{name}: {len(rows)} rows -> {path}{note}")
    return path


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    template = D.PROMPT_TEMPLATES[args.prompt_template]
    try:
        if args.from_file:
            name = args.dataset_name
            spec = D.ALL_SPECS.get(name)
            records = D.read_records(args.from_file)
            qkey = args.question_key
            akey = args.answer_key
            split = args.split or ("train" if name == "train" else "test")
            _build(
                records,
                name,
                split,
                qkey,
                akey,
                template,
                os.path.basename(args.from_file),
                args.max_rows,
                args.out_dir,
            )
            if spec is None:
                print(f"note: {name!r} is not one of {sorted(D.ALL_SPECS)}; it was still written.")
            return 0
        for name in args.only or list(D.ALL_SPECS):
            spec = D.ALL_SPECS[name]
            records = D.load_hub_records(spec)
            _build(
                records,
                name,
                args.split or spec.data_split,
                args.question_key or spec.question_key,
                args.answer_key or spec.answer_key,
                template,
                spec.hub_id,
                args.max_rows,
                args.out_dir,
            )
        return 0
    except D.DataFormatError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
