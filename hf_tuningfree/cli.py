"""``hf-tuningfree``: the command-line front door.

hf-tuningfree optimizers   # the registry as a markdown table
hf-tuningfree compare      # the main job: untuned optimizers vs tuned AdamW
hf-tuningfree toy          # ADOPT on the paper's counterexample

Each sub-command takes the same options as its module run directly (``python -m
hf_tuningfree.compare``, ``python -m hf_tuningfree.toy``): one parser definition serves both.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _optimizers(args: argparse.Namespace) -> int:
    from hf_tuningfree.optim import registry_table

    print(registry_table())
    return 0


def _toy(args: argparse.Namespace) -> int:
    from hf_tuningfree import toy

    toy.run(args)
    return 0


def _compare(args: argparse.Namespace) -> int:
    from hf_tuningfree.compare import cli as compare

    return compare.run_command(args, exiting=True)


def build_parser() -> argparse.ArgumentParser:
    from hf_tuningfree import toy
    from hf_tuningfree.compare import cli as compare

    parser = argparse.ArgumentParser(prog="hf-tuningfree", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("optimizers", help="list the registered optimizers")
    p.set_defaults(func=_optimizers)
    p = sub.add_parser(
        "compare",
        help="untuned optimizers vs AdamW over a learning-rate grid",
        description=compare.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    compare.add_arguments(p)
    p.set_defaults(func=_compare)
    p = sub.add_parser(
        "toy",
        help="ADOPT on the paper's counterexample",
        description=toy.__doc__.split("\n\n")[0],
    )
    toy.add_arguments(p)
    p.set_defaults(func=_toy)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
