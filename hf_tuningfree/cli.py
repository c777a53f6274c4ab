"""``hf-tuningfree``: the command-line front door.

hf-tuningfree optimizers            # the registry as a markdown table
hf-tuningfree optimizers --readme   # rewrite the table between the README's markers
hf-tuningfree compare               # the main job: untuned optimizers vs tuned AdamW
hf-tuningfree toy                   # ADOPT on the paper's counterexample
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

README_START = "<!-- registry-table:start"
README_END = "<!-- registry-table:end -->"


def replace_readme_table(text: str, table: str) -> str:
    """``text`` with the block between the registry-table markers replaced by ``table``."""
    if README_START not in text or README_END not in text:
        raise ValueError(f"README has no {README_START} ... {README_END} block")
    head, rest = text.split(README_START, 1)
    marker_line, _ = rest.split("\n", 1)
    _, tail = rest.split(README_END, 1)
    return f"{head}{README_START}{marker_line}\n{table}\n{README_END}{tail}"


def _optimizers(args: argparse.Namespace) -> int:
    from hf_tuningfree.optim import registry_table

    table = registry_table()
    if args.readme:
        path = Path(args.readme)
        path.write_text(replace_readme_table(path.read_text(encoding="utf-8"), table))
        print(f"updated the optimizer table in {path}")
    else:
        print(table)
    return 0


def _toy(args: argparse.Namespace) -> int:
    from hf_tuningfree import toy

    toy.main(args.rest)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from hf_tuningfree.compare.cli import run

    run(args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hf-tuningfree", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimizers", help="list the registered optimizers")
    p.add_argument("--readme", nargs="?", const="README.md", default=None,
                   help="rewrite the table in this README (default README.md)")  # fmt: skip
    p.set_defaults(func=_optimizers)
    from hf_tuningfree.compare import cli as compare

    p = sub.add_parser(
        "compare",
        help="untuned optimizers vs AdamW over a learning-rate grid",
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_arguments(p)
    p.set_defaults(func=_compare)
    p = sub.add_parser("toy", help="ADOPT on the paper's counterexample")
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_toy)
    args = parser.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
