"""Review of commit ab2448d (stop resubmits refused marks, fifo skips unsettled entries, the
CLI's stdout flush, signals in store backup). Each test failed on that commit. Synthetic data only."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engine.cli import main
from tests.factories import store_with_messages

ROOT = Path(__file__).resolve().parent.parent


def test_a_command_with_no_stdout_still_succeeds(tmp_path, monkeypatch):
    """Python sets sys.stdout to None when the process starts with descriptor 1 closed (a
    scheduler or wrapper that runs `koppel ... >&-`). print() then writes nothing and the
    command worked; the new flush after the handler raised AttributeError: a traceback and
    exit status 1 for a command that had done its work."""
    url = store_with_messages(tmp_path, 3)
    monkeypatch.setattr(sys, "stdout", None)
    assert main(["messages", "--store", url]) == 0


def test_a_command_run_with_stdout_closed_exits_0(tmp_path):
    """The same, as an operator's shell runs it: stdout closed in the child."""
    url = store_with_messages(tmp_path, 3)
    result = subprocess.run(
        [sys.executable, "-c", "from engine.cli import main; raise SystemExit(main())",
         "messages", "--store", url],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=60,
        preexec_fn=lambda: os.close(1))
    assert result.stderr == ""
    assert result.returncode == 0
