"""The koppel commands that read the store or files: what they show, and one-line errors."""

import json
import subprocess
import sys

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


def test_commands_that_read_a_store_say_so_in_one_line_when_there_is_none(tmp_path, capsys):
    missing = f"sqlite:///{tmp_path}/nowhere/k.db"
    assert main(["messages", "--store", missing]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: no store at ") and "Traceback" not in err
    assert not (tmp_path / "nowhere").exists()  # nothing created by accident


def test_run_with_a_store_it_cannot_create_fails_in_one_line(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "channels" / "a.yaml").write_text("name: a\nsource:\n  listen: tcp:0:interface=127.0.0.1\n")
    (tmp_path / "file").write_text("a file where the store's directory should be")
    # a child process: `run` configures logging for the whole process it runs in
    done = subprocess.run(
        [sys.executable, "-m", "engine.cli", "run", "--channels", str(tmp_path / "channels"),
         "--mappings", str(tmp_path / "mappings"), "--store", f"sqlite:///{tmp_path}/file/k.db",
         "--metrics", "off", "--admin", "off", "--pid-file", str(tmp_path / "koppel.pid")],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 1
    err = done.stderr
    assert err.startswith(f"--store sqlite:///{tmp_path}/file/k.db: cannot ") and "Traceback" not in err


def test_a_file_named_on_the_command_line_that_is_not_there_is_one_line(tmp_path, capsys):
    missing = str(tmp_path / "nothing.hl7")
    for argv in (["send", "--to", "127.0.0.1:1", missing], ["bench", "--to", "127.0.0.1:1", missing],
                 ["map", "--channel", "zorgdomein-in", missing]):
        assert main(argv) == 1, argv
        assert capsys.readouterr().err == f"error: {missing}: No such file or directory\n", argv


def test_messages_filters_by_type_and_day_in_amsterdam_time(tmp_path, capsys):
    import datetime as dt
    from zoneinfo import ZoneInfo

    def at(text: str) -> float:
        return dt.datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("Europe/Amsterdam")).timestamp()

    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    store.write([Append(message=received("D1", received_at=at("2026-12-06T23:59:00"), message_type="ORU^R01")),
                 Append(message=received("D2", received_at=at("2026-12-07T00:00:00"), message_type="ORU^R01")),
                 Append(message=received("D3", received_at=at("2026-12-07T23:59:59"), message_type="SRM^S01")),
                 Append(message=received("D4", received_at=at("2026-12-08T00:00:01"), message_type="ORU^R01"))])
    store.close()

    def ids(*args: str) -> list[str]:
        assert main(["messages", "--store", url, "--json", *args]) == 0
        return sorted(row["control_id"] for row in json.loads(capsys.readouterr().out))

    assert ids("--from", "2026-12-07", "--to", "2026-12-07") == ["D2", "D3"]  # the whole day, no more
    assert ids("--type", "ORU^R01") == ["D1", "D2", "D4"]
    assert ids("--type", "ORU^R01", "--from", "2026-12-07") == ["D2", "D4"]
    assert main(["messages", "--store", url, "--from", "7-12-2026"]) == 2
    assert "not a date (YYYY-MM-DD)" in capsys.readouterr().err
