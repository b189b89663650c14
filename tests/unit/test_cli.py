"""The CLI dispatches every command; --help works everywhere; errors exit non-zero."""

from __future__ import annotations

import pytest

from pymigrate.cli import DELEGATES, main


@pytest.mark.parametrize("argv", [["--help"], ["agent", "--help"], ["cloud", "--help"],
                                  ["run", "--help"]])
def test_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "pymigrate" in capsys.readouterr().out


@pytest.mark.parametrize("name", sorted(DELEGATES))
def test_delegated_commands_have_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    try:
        rc = main([name, "--help"])
    except SystemExit as exc:
        rc = exc.code  # argparse-based delegates exit
    assert rc in (0, None)
    out = capsys.readouterr()
    assert "usage" in (out.out + out.err).lower()


def test_unknown_command_fails(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as ei:
        main(["teleport"])
    assert ei.value.code == 2
