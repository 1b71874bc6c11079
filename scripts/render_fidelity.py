#!/usr/bin/env python
"""Write docs/fidelity.md's table from recipe/fidelity.yaml, the one source that tests/recipe/test_recipes.py
checks against the recipes; the doc is never edited by hand between its two markers.

    python scripts/render_fidelity.py            # rewrite the table in docs/fidelity.md
    python scripts/render_fidelity.py --check    # exit 1 if docs/fidelity.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SOURCE = REPO / "recipe" / "fidelity.yaml"
DOC = REPO / "docs" / "fidelity.md"
BEGIN = "<!-- fidelity table: generated from recipe/fidelity.yaml by scripts/render_fidelity.py -->"
END = "<!-- end of the generated table -->"


def settings(source: Path = SOURCE) -> list[dict]:
    """The entries of recipe/fidelity.yaml, in order."""
    return yaml.safe_load(source.read_text())["settings"]


def table(entries: list[dict]) -> str:
    """The markdown table, one row per entry."""
    lines = ["| reference key | reference | ours | why |", "|---|---|---|---|"]
    for entry in entries:
        name = f"`{entry['key']}`" if entry["key"] else entry["label"]
        lines.append(f"| {name} | {entry['reference']} | {entry['ours']} | {entry['why']} |")
    return "\n".join(lines)


def render(doc_text: str, entries: list[dict]) -> str:
    """``doc_text`` with the region between the markers replaced by the table."""
    head, begin, rest = doc_text.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{DOC.relative_to(REPO)} must hold the markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n{table(entries)}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write docs/fidelity.md's table from recipe/fidelity.yaml.")
    parser.add_argument("--check", action="store_true", help="exit 1 if the doc differs from what would be written")
    args = parser.parse_args(argv)
    current = DOC.read_text()
    rendered = render(current, settings())
    if args.check:
        if rendered != current:
            print(f"{DOC.relative_to(REPO)} is stale: run python scripts/render_fidelity.py", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(rendered)
    return 0


if __name__ == "__main__":
    sys.exit(main())
