"""Config, CLI and operator mistakes found in review: each is a located error or a clear
refusal now (each test failed before its fix)."""
from __future__ import annotations

from pathlib import Path

import pytest

from engine.bundle import load_bundle
from engine.cli import main
from engine.config import ConfigError, load_config
from tests.test_operator import World as OpWorld


def _chan(tmp_path, text):
    ch = tmp_path / "ch"; ch.mkdir(); (tmp_path / "m").mkdir()
    (ch / "a.yaml").write_text(text)
    return ch, tmp_path / "m"


def test_int_with_a_stray_underscore_is_a_located_problem_not_a_traceback(tmp_path):
    ch, m = _chan(tmp_path, "name: a\nsource:\n  listen: tcp:2575\n  max_connections: 1_\n")
    with pytest.raises(ConfigError) as error:
        load_config(ch, m)
    assert str(error.value).startswith(f"{ch / 'a.yaml'}:4:20: source.max_connections:")


@pytest.mark.parametrize("key, value", [
    ("endpoint", "tcp:host=127.0.0.1:port=6661:timeot=5"),  # Twisted: TypeError at every connect
])
def test_a_destination_endpoint_option_twisted_rejects_is_a_config_error(tmp_path, key, value):
    ch, m = _chan(tmp_path, f"name: a\nsource:\n  listen: tcp:2575\ndestinations:\n  d:\n    {key}: {value}\n"
                            "routes:\n  - to: [d]\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:6:\d+: destinations\.d\.endpoint: "):
        load_config(ch, m)


def test_a_listen_option_twisted_rejects_is_a_config_error(tmp_path):
    ch, m = _chan(tmp_path, "name: a\nsource:\n  listen: tcp:2575:interfce=0.0.0.0\n")
    with pytest.raises(ConfigError, match=r"a\.yaml:3:\d+: source\.listen: "):
        load_config(ch, m)


def test_unknown_outbound_destination_is_reported_once_with_line_and_column(tmp_path):
    import shutil
    from pathlib import Path
    src = Path(__file__).resolve().parent.parent / "mappings"
    shutil.copytree(src, tmp_path / "m")
    ch = tmp_path / "ch"; ch.mkdir()
    (ch / "a.yaml").write_text("name: a\nsource:\n  listen: tcp:2575\nroutes:\n"
                               "  - {when: {types: [SRM^S01]}, map: zorgdomein-srm}\n"
                               "  - {when: {types: [SRM^S04]}, map: zorgdomein-srm}\n")
    with pytest.raises(ConfigError) as error:
        load_bundle(ch, tmp_path / "m")
    lines = [str(p) for p in error.value.problems if "his-scheduling" in str(p)]
    # once per outbound entry that names it (the SIU^S12's and the SIU^S15's), not per route
    assert len(lines) == 2 and len({line.split(": ")[0] for line in lines}) == 2, lines
    assert all(":None:" not in line for line in lines)


def test_an_invalid_agendas_file_is_not_also_reported_as_missing(tmp_path):
    import shutil
    root = Path(__file__).resolve().parent.parent
    shutil.copytree(root / "channels", tmp_path / "ch")
    shutil.copytree(root / "mappings", tmp_path / "m")
    with open(tmp_path / "m" / "agendas.yaml", "a") as f:
        f.write("agendas: [\n")
    with pytest.raises(ConfigError) as error:
        load_bundle(tmp_path / "ch", tmp_path / "m")
    assert not [p for p in error.value.problems if "there is no agendas.yaml" in p.message]


def test_resend_to_a_queue_key_no_destination_serves_is_refused(tmp_path, monkeypatch, capsys):
    world = OpWorld(tmp_path, monkeypatch)
    before = len(world.store.queue_head("127.0.0.1:9999"))
    code, _, err = world.run(capsys, "resend", str(world.m1), "--to", "127.0.0.1:9999")
    assert code != 0 and "would never be sent" in err
    assert len(world.store.queue_head("127.0.0.1:9999")) == before


def test_a_bad_log_level_is_a_usage_error_not_a_traceback(tmp_path, capsys):
    assert main(["run", "--channels", str(tmp_path), "--mappings", str(tmp_path),
                 "--log-level", "verbose"]) == 2


def test_bench_with_zero_connections_fails(capsys):
    assert main(["bench", "--to", "127.0.0.1:1", "--connections", "0", "--messages", "10"]) != 0
