"""koppel messages lists stored messages with what became of them, never their bodies."""

import json

from engine.cli import main
from engine.store import Append, SetProcessing, open_store
from tests.factories import received


def test_messages_shows_processing_outcomes_and_no_bodies(tmp_path, capsys):
    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    first, second = store.write([Append(message=received("C1")), Append(message=received("C2"))])
    store.write([SetProcessing(message_id=second.message_id, outcome="error",
                               detail="mappings/x.yaml:3: zd_number (ARQ-1): missing (required)")])
    raw = store.get_message(first.message_id).raw
    store.close()
    assert main(["messages", "--store", url]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("ID\tRECEIVED")
    assert "mappings/x.yaml:3" in out and "C1" in out and "C2" in out
    assert raw.decode("latin-1") not in out
    assert main(["messages", "--store", url, "--json", "--control-id", "C2"]) == 0
    (row,) = json.loads(capsys.readouterr().out)
    assert (row["control_id"], row["processing"]) == ("C2", "error")
    assert "raw" not in row
