#!/usr/bin/env python
"""Maintainer tool: rewrite the optimizer table in the project's README.md from the registry.

    python scripts/update_readme_table.py           # rewrite the block between the markers
    python scripts/update_readme_table.py --check   # exit 1 (and say so) when it is stale

The README is the one beside this script's directory (the repository root), whatever the current
directory. ``tests/test_registry.py`` fails when the table and the registry differ.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"
README_START = "<!-- registry-table:start"
README_END = "<!-- registry-table:end -->"


def table_block(text: str) -> str:
    """The table between the markers of ``text`` (stripped)."""
    if README_START not in text or README_END not in text:
        raise ValueError(f"README has no {README_START} ... {README_END} block")
    return text.split(README_START, 1)[1].split("\n", 1)[1].split(README_END, 1)[0].strip()


def replace_readme_table(text: str, table: str) -> str:
    """``text`` with the block between the registry-table markers replaced by ``table``."""
    table_block(text)  # raises without the markers
    head, rest = text.split(README_START, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}{marker_line}\n{table}\n{README_END}{tail}"


def main(argv: list[str] | None = None) -> int:
    from hf_tuningfree.optim import registry_table

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--readme", type=Path, default=README, help=f"default {README}")
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when stale")
    args = parser.parse_args(argv)
    text = args.readme.read_text(encoding="utf-8")
    table = registry_table()
    if table_block(text) == table:
        print(f"{args.readme}: the optimizer table is up to date")
        return 0
    if args.check:
        print(f"{args.readme}: the optimizer table is stale; run {Path(__file__).name}")
        return 1
    args.readme.write_text(replace_readme_table(text, table), encoding="utf-8")
    print(f"{args.readme}: updated the optimizer table")
    return 0


if __name__ == "__main__":
    sys.exit(main())
