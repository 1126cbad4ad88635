"""Review of the store, operator, CLI and shell changes: each test here failed on the code
before its fix. Deterministic (MemoryReactorClock, the store wrapped to fail); synthetic data."""

from __future__ import annotations

import os
import pathlib

from engine.store import Append, open_store
from tests.factories import received

# --------------------------------------------------------------------------- a new store's directory


def test_two_roles_creating_the_store_directory_at_once_both_start(tmp_path, monkeypatch):
    """`koppel run --role receive` and `--role deliver` started together on a bare machine
    (the default store sqlite:var/koppel.db): both see no var/, both create it. The one that
    comes second must use the directory the first made, not fail its start ('File exists')."""
    directory = tmp_path / "var"
    mkdir = pathlib.Path.mkdir

    def the_other_role_was_first(self, *args, **kwargs):
        if self == directory and not directory.exists():
            os.mkdir(directory, 0o700)  # the other process, between our check and our mkdir
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", the_other_role_was_first)
    store = open_store(f"sqlite:{directory}/koppel.db")
    try:
        store.write([Append(message=received("C1"))])
        assert [m.control_id for m in store.list_messages()] == ["C1"]
    finally:
        store.close()
