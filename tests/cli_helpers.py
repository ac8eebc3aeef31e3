"""Helpers shared by the CLI tests."""

from __future__ import annotations

from relprop.cli import main


def one_line_error(capsys, args: list[str], rc: int = 2) -> str:
    """Run the CLI and return its one ``relprop: error:`` line; fail on a traceback or several lines."""
    got = main(args)
    err = capsys.readouterr().err.strip()
    assert got == rc, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith("relprop: error: ")]
    assert len(lines) == 1, err
    return lines[0]
