"""The contract of every refusal of ``python -m core.tune``: exit status 2, one line on stderr, nothing on stdout."""
from __future__ import annotations

import core.tune as tune


def assert_refused(argv: list[str], words: str, capsys) -> None:
    """``argv`` exits with 2 and prints one error line containing ``words``, and nothing else."""
    assert tune.main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("python -m core.tune: error:") and words in lines[0], lines[0]
    assert captured.out == ""
