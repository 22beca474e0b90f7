"""The CLI's generated flags: every subcommand's --help renders (help texts may hold a literal %)."""

from __future__ import annotations

import pytest

from mmsae.cli import STAGES, main


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_every_subcommand_help_renders(stage: str, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([stage, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: mmsae " + stage)
    assert "%%" not in out  # escaped once for argparse, shown as a single %


def test_percent_in_help_is_shown_verbatim(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "5% of the steps" in " ".join(capsys.readouterr().out.split())
