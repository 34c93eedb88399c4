"""run_cli: a SIGTERM is exit 143 with one line, even when it lands inside code that catches Exception."""

from __future__ import annotations

import os
import signal

from kdlab.cli.common import EXIT_SIGTERM, run_cli


def test_a_sigterm_inside_an_except_exception_block_is_still_a_termination(capsys):
    seen = []

    def main(_argv):
        try:
            os.kill(os.getpid(), signal.SIGTERM)  # the handler raises inside this try
        except Exception as exc:  # e.g. an image reader reporting "not a readable image"
            seen.append(exc)
            return 2
        return 0

    assert run_cli(main, []) == EXIT_SIGTERM
    assert seen == []
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: terminated (SIGTERM)"]
