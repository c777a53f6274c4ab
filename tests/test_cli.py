"""``hf-tuningfree``: every sub-command takes the options of its module run directly."""

from __future__ import annotations

import pytest

from hf_tuningfree import cli, toy
from hf_tuningfree.optim import registry_table


def test_toy_takes_its_options_through_the_front_door(capsys):
    assert cli.main(["toy", "--steps", "40", "--seeds", "8", "--k", "10"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ADOPT toy counterexample: k=10, beta2=0.999, lr 0.01/sqrt(1+0.01t), 40")
    assert out.count("| ADOPT") == 2 and "| Adam |" in out
    assert "mean x over time (at steps 4, 8, 12," in out
    # the module run directly prints the same table (timings aside)
    assert toy.main(["--steps", "40", "--seeds", "8", "--k", "10"]) == 0
    direct = capsys.readouterr().out
    strip = [line.rsplit("|", 2)[0] for line in out.splitlines()]
    assert strip == [line.rsplit("|", 2)[0] for line in direct.splitlines()]


def test_toy_help_lists_the_options_and_bad_values_are_argparse_errors(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["toy", "--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    for option in ("--steps", "--seeds", "--k"):
        assert option in help_text
    assert "rest" not in help_text
    with pytest.raises(SystemExit) as info:
        cli.main(["toy", "--steps", "0"])
    assert info.value.code == 2
    assert "argument --steps: must be a positive integer, got 0" in capsys.readouterr().err


def test_optimizers_prints_the_registry_table_and_writes_nothing(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "README.md").write_text("mine\n")
    assert cli.main(["optimizers"]) == 0
    assert capsys.readouterr().out.strip() == registry_table()
    with pytest.raises(SystemExit) as info:  # the maintainer tool lives in scripts/ now
        cli.main(["optimizers", "--readme"])
    assert info.value.code == 2
    assert "unrecognized arguments: --readme" in capsys.readouterr().err
    assert (tmp_path / "README.md").read_text() == "mine\n"
