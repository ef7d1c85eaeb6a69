"""The CLI in-process for tests: its exit code and output, and the one error line bad input must give."""
from __future__ import annotations

from sdparity.main import main as cli


def run_cli(argv, capsys) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = cli([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("sdparity: error: "), f"expected one error line, got {lines}"
    assert "Traceback" not in err
    return lines[0]
