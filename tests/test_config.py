"""Channel YAML becomes frozen config, or fails at start-up naming file:line:col and the path."""

import dataclasses
import ipaddress
import textwrap
from pathlib import Path

import pytest

from engine.config import (
    AcceptConfig,
    AckConfig,
    ChannelConfig,
    ConfigError,
    ConfigProblem,
    DestinationConfig,
    EngineConfig,
    OnNakConfig,
    RetryConfig,
    RouteConfig,
    SourceConfig,
    load_config,
    queue_key_of,
    server_port_of,
)

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def dirs(tmp_path):
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    return tmp_path


def write(dirs, name, text):
    (dirs / "channels" / name).write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")


def load(dirs):
    return load_config(dirs / "channels", dirs / "mappings")


def problems(dirs):
    """The problem lines, with the temporary directory shown as channels/."""
    with pytest.raises(ConfigError) as caught:
        load(dirs)
    return [str(p).replace(str(dirs) + "/", "") for p in caught.value.problems]


MINIMAL = """
name: a
source:
  listen: tcp:0
"""

MINIMAL_B = MINIMAL.replace("name: a", "name: b")

FULL_A = """
name: zorgdomein-in
source:
  listen: tcp:2575:interface=127.0.0.1
  allow: [10.20.0.0/16, 127.0.0.1/32, "::1"]
  max_message_bytes: 512KiB
  idle_timeout: never
  frame_timeout: 1m30s
  charset: UNICODE UTF-8
  lenient_framing: true
  max_connections: 8
  keepalive: off
accept:
  types: [SRM^S01, ORU^R01, ORM]
  versions: [2.3, "2.4", "2.5.1"]
  processing_ids: [P, T]
duplicates:
  window: 0
ack:
  mode: on-store
  store_failure: AR
  rejected: AE
destinations:
  hix-agenda:
    endpoint: tcp:host=LocalHost:port=6661
    ack_timeout: 20s
    connect_timeout: 5s
    retry: {initial: 500ms, factor: 1.5, max: 10m, jitter: 0}
    give_up_after: never
    on_nak: {AE: dead-letter, CR: retry}
    max_queue: 1_000
    rewrite: {MSH-6: ZIEKENHUIS, MSH-5: HIX, MSH-11: ""}
    charset: 8859/15
    order: none
    parallel: 4
    connection: per-message
    keepalive: 2m
routes:
  - to: [hix-agenda, archive]
    when: {types: [SRM^S01]}
  - to: [archive]
"""

FULL_B = """
name: scheduler-in
source:
  listen: ssl:port=2576:privateKey=server.pem
destinations:
  archive:
    endpoint: tls:127.0.0.2:7000
routes:
  - to: [archive]
"""


def test_a_full_config_becomes_exactly_these_values(dirs, monkeypatch):
    monkeypatch.chdir(dirs)  # the TLS key file is named relative to the working directory
    (dirs / "server.pem").write_text("(a PEM key and certificate)")
    write(dirs, "a.yaml", FULL_A)
    write(dirs, "b.yaml", FULL_B)
    hix = DestinationConfig(
        name="hix-agenda",
        endpoint="tcp:host=LocalHost:port=6661",
        ack_timeout=20.0,
        connect_timeout=5.0,
        retry=RetryConfig(initial=0.5, factor=1.5, max=600.0, jitter=0.0),
        give_up_after=None,
        on_nak=OnNakConfig(AE="dead-letter", CE="retry", AR="dead-letter", CR="retry"),
        max_queue=1000,
        rewrite=(("MSH-5", "HIX"), ("MSH-6", "ZIEKENHUIS"), ("MSH-11", "")),
        charset="8859/15",
        order="none",
        parallel=4,
        connection="per-message",
        keepalive=120.0,
    )
    archive = DestinationConfig(name="archive", endpoint="tls:127.0.0.2:7000")
    expected = EngineConfig(
        channels=(
            ChannelConfig(
                name="zorgdomein-in",
                file=dirs / "channels" / "a.yaml",
                source=SourceConfig(
                    listen="tcp:2575:interface=127.0.0.1",
                    allow=(
                        ipaddress.ip_network("10.20.0.0/16"),
                        ipaddress.ip_network("127.0.0.1/32"),
                        ipaddress.ip_network("::1/128"),
                    ),
                    max_message_bytes=512 * 1024,
                    idle_timeout=None,
                    frame_timeout=90.0,
                    charset="UNICODE UTF-8",
                    lenient_framing=True,
                    max_connections=8,
                    keepalive=None,
                ),
                accept=AcceptConfig(
                    types=frozenset({"SRM^S01", "ORU^R01", "ORM"}),
                    versions=frozenset({"2.3", "2.4", "2.5.1"}),
                    processing_ids=frozenset({"P", "T"}),
                ),
                duplicate_window=0.0,
                ack=AckConfig(mode="on-store", store_failure="AR", rejected="AE"),
                routes=(
                    RouteConfig(to=("hix-agenda", "archive"), types=frozenset({"SRM^S01"})),
                    RouteConfig(to=("archive",)),
                ),
            ),
            ChannelConfig(
                name="scheduler-in",
                file=dirs / "channels" / "b.yaml",
                source=SourceConfig(listen="ssl:port=2576:privateKey=server.pem"),
                routes=(RouteConfig(to=("archive",)),),
            ),
        ),
        destinations=(archive, hix),
    )
    assert load(dirs) == expected
    assert hix.queue_key == "localhost:6661"
    assert archive.queue_key == "127.0.0.2:7000"
    assert load(dirs).channel("zorgdomein-in").source.port == 2575


def test_a_minimal_channel_gets_the_documented_defaults(dirs):
    write(dirs, "a.yaml", MINIMAL)
    (channel,) = load(dirs).channels
    source = channel.source
    assert source.allow is None
    assert source.max_message_bytes == 64 * 1024 * 1024
    assert source.idle_timeout == 600.0
    assert source.frame_timeout == 30.0
    assert source.charset == "8859/1"
    assert source.lenient_framing is False
    assert source.max_connections == 64
    assert channel.accept == AcceptConfig(types=None, versions=None, processing_ids=None)
    assert channel.duplicate_window == 24 * 3600.0
    assert channel.ack == AckConfig(mode="on-store", store_failure="AE", rejected="AR", accept_ack="as-asked")
    assert channel.routes == ()
    assert channel.file == dirs / "channels" / "a.yaml"


def test_a_destination_without_options_gets_the_documented_defaults(dirs):
    write(dirs, "a.yaml", MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:6661\n")
    (dest,) = load(dirs).destinations
    assert dest == DestinationConfig(name="d", endpoint="tcp:127.0.0.1:6661")
    assert (dest.ack_timeout, dest.connect_timeout, dest.give_up_after) == (30.0, 10.0, 72 * 3600.0)
    assert dest.retry == RetryConfig(initial=1.0, factor=2.0, max=300.0, jitter=0.2)
    assert [dest.on_nak.action(code) for code in ("AE", "CE", "AR", "CR")] == [
        "retry",
        "retry",
        "dead-letter",
        "dead-letter",
    ]
    assert (dest.max_queue, dest.rewrite, dest.charset, dest.order, dest.parallel, dest.connection) == (
        1_000_000, (), None, "fifo", 1, "keep")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # shape of the file
        ("", "a.yaml:1:1: (top): file is empty; expected a channel with name and source"),
        ("- name: a\n", "a.yaml:1:1: (top): expected a mapping with keys name, source, accept, duplicates, ack, destinations, routes, got a list"),
        ("name: a\nsource: {listen: tcp:0\n", "a.yaml:3:1: (yaml): YAML syntax: expected ',' or '}', but got '<stream end>' (while parsing a flow mapping)"),
        (MINIMAL + "---\nname: b\n", "a.yaml:4:1: (yaml): YAML syntax: but found another document (expected a single document in the stream)"),
        ("name: a\nsource:\n  listen: tcp:0\n    allow: [127.0.0.1]\n", "a.yaml:4:10: (yaml): YAML syntax: mapping values are not allowed here; usually a key indented deeper than the one before it, or a value holding ': ' that needs quotes"),
        (MINIMAL + "colour: blue\n", "a.yaml:4:1: colour: unknown key; expected one of: name, source, accept, duplicates, ack, destinations, routes"),
        (MINIMAL + "name: b\n", "a.yaml:4:1: name: duplicate key (first at line 1)"),
        ("source:\n  listen: tcp:0\n", "a.yaml:1:1: name: missing (required)"),
        ("name: a b\nsource:\n  listen: tcp:0\n", "a.yaml:1:7: name: 'a b' is not a valid name: use letters, digits, '-', '_', '.' (at most 64)"),
        # source
        ("name: a\nsource:\n  allow: [127.0.0.1]\n", "a.yaml:3:3: source.listen: missing (required)"),
        ("name: a\nsource: tcp:0\n", "a.yaml:2:9: source: expected a mapping with keys listen, allow, max_message_bytes, idle_timeout, frame_timeout, charset, lenient_framing, max_connections, keepalive, got 'tcp:0'"),
        (MINIMAL + "  max_mesage_bytes: 1MiB\n", "a.yaml:4:3: source.max_mesage_bytes: unknown key; did you mean max_message_bytes?"),
        ("name: a\nsource:\n  listen: udp:2575\n", "a.yaml:3:11: source.listen: listen endpoint 'udp:2575' must start with tcp: or ssl:, e.g. tcp:2575 or tcp:2575:interface=0.0.0.0"),
        ("name: a\nsource:\n  listen: tcp:interface=0.0.0.0\n", "a.yaml:3:11: source.listen: listen endpoint 'tcp:interface=0.0.0.0' has no port, e.g. tcp:2575 or tcp:2575:interface=0.0.0.0"),
        ("name: a\nsource:\n  listen: tcp:70000\n", "a.yaml:3:11: source.listen: port '70000' is not a number from 0 to 65535"),
        (MINIMAL + "  allow: [10.20.0.1/16]\n", "a.yaml:4:11: source.allow[0]: '10.20.0.1/16' has host bits set; did you mean 10.20.0.0/16?"),
        (MINIMAL + "  allow: [10.0.0.0/8, lab]\n", "a.yaml:4:23: source.allow[1]: 'lab' is not an IP network like 10.20.0.0/16 or an address"),
        (MINIMAL + "  allow: [10.0.0.0/8, 10.0.0.0/8]\n", "a.yaml:4:23: source.allow[1]: listed twice (also at [0])"),
        (MINIMAL + "  allow: []\n", "a.yaml:4:10: source.allow: an empty list would refuse every peer; leave the key out to allow any peer"),
        (MINIMAL + "  allow: 10.0.0.0/8\n", "a.yaml:4:10: source.allow: expected a list, e.g. [10.20.0.0/16, 127.0.0.1/32], got '10.0.0.0/8'"),
        (MINIMAL + "  max_message_bytes: 64MB\n  max_connections: 0\n", "a.yaml:5:20: source.max_connections: must be at least 1, got 0"),
        (MINIMAL + "  max_message_bytes: 64 furlongs\n", "a.yaml:4:22: source.max_message_bytes: invalid size '64 furlongs': unknown unit 'furlongs'; expected a whole number of bytes, optionally with a unit (B, kB, MB, GB, TB, KiB, MiB, GiB, TiB), e.g. 64MiB or 1000"),
        (MINIMAL + "  max_message_bytes: 0\n", "a.yaml:4:22: source.max_message_bytes: must be more than 0 bytes"),
        (MINIMAL + "  frame_timeout: never\n", "a.yaml:4:18: source.frame_timeout: invalid duration 'never': 'never' is not allowed here; expected a number of seconds or parts with units d, h, m, s, ms from largest to smallest, e.g. 30s, 10m, 1h30m, 500ms"),
        (MINIMAL + "  idle_timeout: 0s\n", "a.yaml:4:17: source.idle_timeout: must be more than 0 (use never to switch it off)"),
        (MINIMAL + "  idle_timeout:\n", "a.yaml:4:16: source.idle_timeout: needs a value"),
        (MINIMAL + "  charset: latin-1\n", "a.yaml:4:12: source.charset: unknown HL7 charset 'latin-1'; known: ASCII, BIG-5, ISO IR6, UNICODE, ISO IR14, ISO IR87, ISO IR100, ISO IR159, ISO IR192, KS X 1001, GB 18030-2000, UNICODE UTF-8, 8859/1, 8859/2, 8859/3, 8859/4, 8859/5, 8859/6, 8859/7, 8859/8, 8859/9, 8859/15"),
        (MINIMAL + "  lenient_framing: yes\n", "a.yaml:4:20: source.lenient_framing: expected true or false, got 'yes'"),
        (MINIMAL + "  max_connections: [1]\n", "a.yaml:4:20: source.max_connections: expected a single value, got a list"),
        # accept, duplicates, ack
        (MINIMAL + "accept:\n  types: [SRM^S01, srm^s02]\n", "a.yaml:5:20: accept.types[1]: 'srm^s02' is not a message type like SRM^S01 or SRM (any trigger)"),
        (MINIMAL + "accept:\n  types: []\n", "a.yaml:5:10: accept.types: an empty list would reject every message; leave the key out instead"),
        (MINIMAL + "accept:\n  versions: [2.5, v3]\n", "a.yaml:5:19: accept.versions[1]: 'v3' is not an HL7 v2 version like \"2.5.1\""),
        (MINIMAL + "accept:\n  processing_ids: [X]\n", "a.yaml:5:20: accept.processing_ids[0]: 'X' is not one of: P, T, D"),
        (MINIMAL + "duplicates:\n  window: -1h\n", "a.yaml:5:11: duplicates.window: invalid duration '-1h': must not be negative; expected a number of seconds or parts with units d, h, m, s, ms from largest to smallest, e.g. 30s, 10m, 1h30m, 500ms"),
        (MINIMAL + "ack:\n  mode: on-mapp\n", "a.yaml:5:9: ack.mode: 'on-mapp' is not one of: on-store, on-map"),
        (MINIMAL + "ack:\n  store_failure: CE\n", "a.yaml:5:18: ack.store_failure: 'CE' is not one of: AE, AR"),
        (MINIMAL + "ack:\n  rejected: CR\n", "a.yaml:5:13: ack.rejected: 'CR' is not one of: AE, AR"),
        (MINIMAL + "ack:\n  accept_ack: never\n", "a.yaml:5:15: ack.accept_ack: 'never' is not one of: as-asked, always"),
        # destinations
        (MINIMAL + "destinations:\n  d:\n    ack_timeout: 1s\n", "a.yaml:6:5: destinations.d.endpoint: missing (required)"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1\n", "a.yaml:6:15: destinations.d.endpoint: endpoint 'tcp:127.0.0.1' has no port, e.g. tcp:host=10.1.2.3:port=6661 or tls:host=his.example:port=6661"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: unix:/tmp/s\n", "a.yaml:6:15: destinations.d.endpoint: endpoint 'unix:/tmp/s' must start with tcp:, ssl: or tls:, e.g. tcp:host=10.1.2.3:port=6661 or tls:host=his.example:port=6661"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:port=6661\n", "a.yaml:6:15: destinations.d.endpoint: endpoint 'tcp:port=6661' has no host, e.g. tcp:host=10.1.2.3:port=6661 or tls:host=his.example:port=6661"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:host=127.0.0.1:port=0\n", "a.yaml:6:15: destinations.d.endpoint: port '0' is not a number from 1 to 65535"),
        (MINIMAL + "destinations:\n  d e:\n    endpoint: tcp:127.0.0.1:1\n", "a.yaml:5:3: destinations.d e: 'd e' is not a valid name: use letters, digits, '-', '_', '.' (at most 64)"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    on_nak: {AE: drop}\n", "a.yaml:7:18: destinations.d.on_nak.AE: 'drop' is not one of: retry, dead-letter"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    on_nak: {AA: retry}\n", "a.yaml:7:14: destinations.d.on_nak.AA: unknown key; expected one of: AE, CE, AR, CR"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    rewrite: {MSH-10: X}\n", "a.yaml:7:15: destinations.d.rewrite.MSH-10: cannot be rewritten: the control id must stay the one the ACK echoes in MSA-2"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    rewrite: {MSH-2: X}\n", "a.yaml:7:15: destinations.d.rewrite.MSH-2: expected a header field MSH-3 .. MSH-21"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    rewrite: {PID-3: X}\n", "a.yaml:7:15: destinations.d.rewrite.PID-3: expected a header field MSH-3 .. MSH-21"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    rewrite:\n      MSH-5:\n", "a.yaml:8:13: destinations.d.rewrite.MSH-5: needs a value (write \"\" to empty the field)"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    rewrite: {MSH-5: A|B}\n", "a.yaml:7:22: destinations.d.rewrite.MSH-5: must not contain '|' or line breaks"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    parallel: 4\n", "a.yaml:7:15: destinations.d.parallel: more than 1 needs order: none (fifo sends one at a time)"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    order: lifo\n", "a.yaml:7:12: destinations.d.order: 'lifo' is not one of: fifo, none"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    connection: close\n", "a.yaml:7:17: destinations.d.connection: 'close' is not one of: keep, per-message"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    keepalive: 500ms\n", "a.yaml:7:16: destinations.d.keepalive: must be at least 1s (the kernel counts whole seconds), or off"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    keepalive: 10h\n", "a.yaml:7:16: destinations.d.keepalive: must be at most 32767s (9h6m7s, the longest idle Linux takes), or off"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    keepalive: sometimes\n", "a.yaml:7:16: destinations.d.keepalive: invalid duration 'sometimes': expected a number of seconds or parts with units d, h, m, s, ms from largest to smallest, e.g. 30s, 10m, 1h30m, 500ms; or off"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    retry: {initial: 10m, max: 1m}\n", "a.yaml:7:32: destinations.d.retry.max: must be at least retry.initial"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    retry: {jitter: 1.5}\n", "a.yaml:7:21: destinations.d.retry.jitter: must be from 0 to 1, got 1.5"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    retry: {factor: 0.5}\n", "a.yaml:7:21: destinations.d.retry.factor: must be at least 1, got 0.5"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    charset: UTF-8\n", "a.yaml:7:14: destinations.d.charset: unknown HL7 charset 'UTF-8'; known: ASCII, BIG-5, ISO IR6, UNICODE, ISO IR14, ISO IR87, ISO IR100, ISO IR159, ISO IR192, KS X 1001, GB 18030-2000, UNICODE UTF-8, 8859/1, 8859/2, 8859/3, 8859/4, 8859/5, 8859/6, 8859/7, 8859/8, 8859/9, 8859/15"),
        (MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\n    max_queue: 1e6\n", "a.yaml:7:16: destinations.d.max_queue: expected a whole number, got '1e6'"),
        # routes
        (MINIMAL + "routes:\n  - to: [nowhere]\n", "a.yaml:5:10: routes[0].to[0]: unknown destination 'nowhere' (destinations: none are defined)"),
        (MINIMAL + "routes:\n  - to: []\n", "a.yaml:5:9: routes[0].to: needs at least one destination"),
        (MINIMAL + "routes:\n  - when: {types: [SRM]}\n", "a.yaml:5:5: routes[0].to: missing (required)"),
        (MINIMAL + "routes:\n  to: [x]\n", "a.yaml:5:3: routes: expected a list, e.g. [{to: [his]}], got a mapping"),
        (
            MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\nroutes:\n  - to: [d]\n    when: {types: [SRM^]}\n",
            "a.yaml:9:20: routes[0].when.types[0]: 'SRM^' is not a message type like SRM^S01 or SRM (any trigger)",
        ),
        (
            MINIMAL + "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:1\nroutes:\n  - to: [d]\n    if: {types: [SRM]}\n",
            "a.yaml:9:5: routes[0].if: unknown key; expected one of: to, when, map",
        ),
    ],
)
def test_each_kind_of_mistake_is_reported_with_file_line_col_path_and_cause(dirs, text, expected):
    write(dirs, "a.yaml", text)
    assert problems(dirs) == ["channels/" + expected]


def test_every_problem_in_every_file_is_reported_in_file_order(dirs):
    write(
        dirs,
        "a.yaml",
        """
        name: a
        source:
          listen: tcp:0
          max_message_bytes: lots
          idle_timeout: soon
        accept:
          types: [SRM^S01, bad]
        """,
    )
    write(dirs, "b.yaml", "name: b\nsource: {listen: tcp:0, charset: EBCDIC}\nroutes: [{to: [gone]}]\n")
    assert [p.split(": ", 2)[:2] for p in problems(dirs)] == [
        ["channels/a.yaml:4:22", "source.max_message_bytes"],
        ["channels/a.yaml:5:17", "source.idle_timeout"],
        ["channels/a.yaml:7:20", "accept.types[1]"],
        ["channels/b.yaml:2:34", "source.charset"],
        ["channels/b.yaml:3:16", "routes[0].to[0]"],
    ]


def test_config_error_lists_one_problem_per_line(dirs):
    write(dirs, "a.yaml", "name: a\nsource: {listen: tcp:0, max_connections: 0, frame_timeout: 0}\n")
    with pytest.raises(ConfigError) as caught:
        load(dirs)
    lines = str(caught.value).splitlines()
    assert len(lines) == 2
    assert lines == [str(p) for p in caught.value.problems]
    assert lines[0].endswith("a.yaml:2:42: source.max_connections: must be at least 1, got 0")
    assert lines[1].endswith("a.yaml:2:60: source.frame_timeout: must be more than 0")


def test_a_problem_prints_as_file_line_col_path_message():
    problem = ConfigProblem(file="channels/x.yaml", line=3, col=7, path="source.listen", message="bad")
    assert str(problem) == "channels/x.yaml:3:7: source.listen: bad"


def test_a_yaml_syntax_error_becomes_a_located_problem(dirs):
    write(dirs, "a.yaml", "name: a\nsource:\n  listen: tcp:0\n   bad: indent\n")
    (line,) = problems(dirs)
    assert line.startswith("channels/a.yaml:4:")
    assert ": (yaml): YAML syntax: " in line


def test_bytes_that_are_not_utf8_are_a_located_problem(dirs):
    (dirs / "channels" / "a.yaml").write_bytes(b"name: a\nsource:\n  listen: tcp:0 # caf\xe9\n")
    assert problems(dirs) == ["channels/a.yaml:3:22: (file): not valid UTF-8"]


def test_an_empty_channels_directory_is_an_error(dirs):
    assert problems(dirs) == ["channels: (channels): no channel files (*.yaml); at least one channel is needed"]


def test_missing_directories_are_errors(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "nope", tmp_path / "nomap")
    assert [str(p).replace(str(tmp_path) + "/", "") for p in caught.value.problems] == [
        "nope: (channels): not a directory",
        "nomap: (mappings): not a directory",
    ]


def test_a_yml_file_is_reported_rather_than_silently_ignored(dirs):
    write(dirs, "a.yaml", MINIMAL)
    write(dirs, "b.yml", MINIMAL)
    assert problems(dirs) == ["channels/b.yml: (file): channel files must end in .yaml; this one would be ignored"]


def test_channels_come_in_file_name_order_and_hidden_files_are_skipped(dirs):
    write(dirs, "b.yaml", "name: first-by-name\nsource: {listen: tcp:0}\n")
    write(dirs, "a.yaml", "name: zzz\nsource: {listen: tcp:0}\n")
    write(dirs, ".#a.yaml", "garbage: [")
    assert [c.name for c in load(dirs).channels] == ["zzz", "first-by-name"]


@pytest.mark.parametrize(
    ("endpoint", "key"),
    [
        ("tcp:host=127.0.0.1:port=6661", "127.0.0.1:6661"),
        ("tcp:127.0.0.1:6661", "127.0.0.1:6661"),
        ("tcp:port=6661:host=127.0.0.1", "127.0.0.1:6661"),
        ("tcp:host=127.0.0.1:6661", "127.0.0.1:6661"),
        ("tcp:host=LocalHost:port=6661:timeout=5", "localhost:6661"),
        ("ssl:host=HIS.Example.:port=443:caCertsDir=/etc/ssl/certs", "his.example:443"),
        ("tls:his.example:6661", "his.example:6661"),
        ("tcp:host=\\:\\:1:port=6661", "[::1]:6661"),
        ("tcp:host=0\\:0\\:0\\:0\\:0\\:0\\:0\\:1:port=6661", "[::1]:6661"),
    ],
)
def test_the_queue_key_is_the_lower_cased_host_and_numeric_port(endpoint, key):
    assert queue_key_of(endpoint) == key


@pytest.mark.parametrize(
    "endpoint", ["tcp:127.0.0.1", "tcp:port=1", "tcp:127.0.0.1:http", "tcp:a:1:2", "tcp:host=bad host:port=1", "127.0.0.1:1", ""]
)
def test_an_incomplete_client_endpoint_has_no_queue_key(endpoint):
    with pytest.raises(ValueError):
        queue_key_of(endpoint)


def test_tls_keys_certificates_and_trust_roots_must_exist_when_the_file_is_read(dirs, monkeypatch):
    monkeypatch.chdir(dirs)
    (dirs / "key.pem").write_text("k")
    (dirs / "ca").mkdir()
    write(dirs, "a.yaml", """
        name: a
        source:
          listen: ssl:2575:privateKey=key.pem:certKey=missing-cert.pem
        destinations:
          his:
            endpoint: tls:his.example:6661:trustRoots=/nonexistent/ca
          ris:
            endpoint: tls:ris.example:6662:trustRoots=ca:certificate=key.pem:privateKey=key.pem
        routes:
          - to: [his, ris]
        """)
    write(dirs, "b.yaml", "name: b\nsource:\n  listen: ssl:2576\n")
    assert problems(dirs) == [
        "channels/a.yaml:3:11: source.listen: endpoint 'ssl:2575:privateKey=key.pem:certKey=missing-cert.pem': "
        "certKey=missing-cert.pem: no such file (relative to the working directory)",
        "channels/a.yaml:6:15: destinations.his.endpoint: endpoint 'tls:his.example:6661:trustRoots=/nonexistent/ca': "
        "trustRoots=/nonexistent/ca: no such directory",
        "channels/b.yaml:3:11: source.listen: listen endpoint 'ssl:2576' needs privateKey=PATH "
        "(PEM key, and the certificate too unless certKey=PATH names it)",
    ]


@pytest.mark.parametrize(
    ("listen", "port"), [("tcp:2575", 2575), ("tcp:port=2575:interface=0.0.0.0", 2575), ("ssl:0:privateKey=k.pem", 0)]
)
def test_the_listen_port_comes_from_the_server_endpoint(listen, port):
    assert server_port_of(listen) == port


DEST_D = "destinations:\n  d:\n    endpoint: tcp:127.0.0.1:6661\n"


def test_a_destination_named_in_two_files_must_be_identical(dirs):
    write(dirs, "a.yaml", MINIMAL + DEST_D)
    write(dirs, "b.yaml", MINIMAL_B + DEST_D + "    ack_timeout: 5s\n    max_queue: 10\n")
    assert problems(dirs) == [
        "channels/b.yaml:5:3: destinations.d: differs from the definition at "
        "channels/a.yaml:5:3 in ack_timeout, max_queue; one name means one destination everywhere"
    ]


def test_a_destination_named_identically_in_two_files_is_one_destination(dirs):
    write(dirs, "a.yaml", MINIMAL + DEST_D + "routes: [{to: [d]}]\n")
    write(dirs, "b.yaml", MINIMAL_B + DEST_D)
    config = load(dirs)
    assert [d.name for d in config.destinations] == ["d"]


def test_a_route_may_name_a_destination_defined_in_another_file(dirs):
    write(dirs, "a.yaml", MINIMAL + "routes: [{to: [d]}]\n")
    write(dirs, "b.yaml", MINIMAL_B + DEST_D)
    assert load(dirs).channel("a").routes == (RouteConfig(to=("d",)),)


def test_two_names_for_one_host_port_share_a_queue_when_connection_settings_agree(dirs):
    write(
        dirs,
        "a.yaml",
        MINIMAL
        + "destinations:\n"
        + "  agenda:\n    endpoint: tcp:host=localhost:port=6661\n    rewrite: {MSH-5: AGENDA}\n"
        + "  orders:\n    endpoint: tcp:LOCALHOST:6661\n    on_nak: {AR: retry}\n",
    )
    config = load(dirs)
    assert {d.queue_key for d in config.destinations} == {"localhost:6661"}


def test_two_names_for_one_host_port_must_agree_on_the_queue_limit(dirs):
    """One queue, one max_queue: the smaller one would otherwise answer 'queue full' to
    messages routed only to the other."""
    write(
        dirs,
        "a.yaml",
        MINIMAL
        + "destinations:\n"
        + "  big:\n    endpoint: tcp:10.0.0.1:6661\n    max_queue: 1000000\n"
        + "  small:\n    endpoint: tcp:10.0.0.1:6661\n    max_queue: 10\n",
    )
    assert problems(dirs) == [
        "channels/a.yaml:8:3: destinations.small: shares queue 10.0.0.1:6661 with destination 'big' "
        "(channels/a.yaml:5:3) but differs in max_queue; one connection needs one setting",
    ]


def test_two_names_for_one_host_port_must_agree_on_connection_settings(dirs):
    write(
        dirs,
        "a.yaml",
        MINIMAL
        + "destinations:\n"
        + "  agenda:\n    endpoint: tcp:127.0.0.1:6661\n"
        + "  orders:\n    endpoint: tcp:host=127.0.0.1:port=6661\n    retry: {initial: 2s}\n    ack_timeout: 1m\n"
        + "    keepalive: off\n",
    )
    write(dirs, "b.yaml", MINIMAL_B + "destinations:\n  secure:\n    endpoint: tls:127.0.0.1:6661\n")
    assert problems(dirs) == [
        "channels/a.yaml:7:3: destinations.orders: shares queue 127.0.0.1:6661 with destination 'agenda' "
        "(channels/a.yaml:5:3) but differs in ack_timeout, retry, keepalive; one connection needs one setting",
        "channels/b.yaml:5:3: destinations.secure: shares queue 127.0.0.1:6661 with destination 'agenda' "
        "(channels/a.yaml:5:3) but differs in endpoint options; one connection needs one setting",
    ]


def test_two_channels_cannot_listen_on_the_same_port(dirs):
    write(dirs, "a.yaml", "name: a\nsource: {listen: tcp:2575}\n")
    write(dirs, "b.yaml", "name: b\nsource:\n  listen: tcp:port=2575:interface=127.0.0.1\n")
    assert problems(dirs) == [
        "channels/b.yaml:3:11: source.listen: port 2575 is already used by the channel at channels/a.yaml:2:18"
    ]


def test_any_number_of_channels_may_listen_on_port_zero(dirs):
    write(dirs, "a.yaml", "name: a\nsource: {listen: tcp:0}\n")
    write(dirs, "b.yaml", "name: b\nsource: {listen: tcp:0}\n")
    assert len(load(dirs).channels) == 2


def test_two_channels_cannot_have_the_same_name(dirs):
    write(dirs, "a.yaml", MINIMAL)
    write(dirs, "b.yaml", MINIMAL)
    assert problems(dirs) == ["channels/b.yaml:1:7: name: channel 'a' is already defined at channels/a.yaml:1:7"]


def test_type_filters_match_exact_type_and_trigger_or_any_trigger_of_a_type():
    accept = AcceptConfig(types=frozenset({"SRM^S01", "ORU"}))
    assert accept.type_accepted("SRM", "S01")
    assert not accept.type_accepted("SRM", "S02")
    assert accept.type_accepted("ORU", "R01")
    assert accept.type_accepted("ORU", "R30")
    assert not accept.type_accepted("ADT", "A01")
    assert AcceptConfig().type_accepted("ADT", "A01")
    route = RouteConfig(to=("d",), types=frozenset({"SIU"}))
    assert route.matches("SIU", "S12") and not route.matches("SRM", "S01")
    assert RouteConfig(to=("d",)).matches("ADT", "A08")


def test_versions_and_processing_ids_are_checked_only_when_listed():
    accept = AcceptConfig(versions=frozenset({"2.5.1"}), processing_ids=frozenset({"P"}))
    assert accept.version_accepted("2.5.1") and not accept.version_accepted("2.5")
    assert accept.processing_id_accepted("P") and not accept.processing_id_accepted("T")
    assert AcceptConfig().version_accepted("2.9") and AcceptConfig().processing_id_accepted("T")


def test_allowed_peers_include_ipv4_mapped_ipv6_addresses():
    source = SourceConfig(listen="tcp:0", allow=(ipaddress.ip_network("10.20.0.0/16"),))
    assert source.peer_allowed("10.20.3.4")
    assert source.peer_allowed("::ffff:10.20.3.4")
    assert not source.peer_allowed("10.21.0.1")
    assert not source.peer_allowed("not an address")
    assert SourceConfig(listen="tcp:0").peer_allowed("192.0.2.1")


def test_config_values_validate_when_built_in_code_too():
    with pytest.raises(ValueError):
        SourceConfig(listen="udp:2575")
    with pytest.raises(ValueError):
        SourceConfig(listen="tcp:0", charset="latin-1")
    with pytest.raises(ValueError):
        DestinationConfig(name="d", endpoint="tcp:127.0.0.1:1", parallel=2)
    with pytest.raises(ValueError):
        DestinationConfig(name="d", endpoint="tcp:127.0.0.1")
    with pytest.raises(ValueError):
        RetryConfig(initial=10, max=1)
    with pytest.raises(ValueError):
        OnNakConfig(AE="drop")
    with pytest.raises(KeyError):
        OnNakConfig().action("AA")


def test_config_values_are_frozen():
    source = SourceConfig(listen="tcp:0")
    with pytest.raises(dataclasses.FrozenInstanceError):
        source.max_connections = 1  # type: ignore[misc]
    assert dataclasses.replace(source, listen="tcp:2575").port == 2575


def test_the_bundled_channels_load_cleanly():
    config = load_config(REPO / "channels", REPO / "mappings")
    assert [c.name for c in config.channels] == ["scheduler-in", "zorgdomein-in"]
    zorgdomein = config.channel("zorgdomein-in")
    assert zorgdomein.source.port == 2575
    assert zorgdomein.source.charset == "8859/1"
    assert zorgdomein.accept.types == frozenset(
        "SRM^S01 SRM^S04 ORU^R01 ORM^O01 OML^O21 REF^I12 REF^I13 REF^I14".split()
    )
    assert zorgdomein.accept.versions == frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1"})
    scheduler = config.channel("scheduler-in")
    assert scheduler.source.port == 2576
    assert scheduler.accept.types == frozenset({"SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15"})
    assert scheduler.source.peer_allowed("10.1.2.3") and not scheduler.source.peer_allowed("192.168.1.1")
    # Bundled destinations are loopback stand-ins: nothing a test runs may reach elsewhere.
    assert {d.name: d.queue_key for d in config.destinations} == {
        "his-scheduling": "127.0.0.1:6661",
        "ris-orders": "127.0.0.1:6662",
        "lis-orders": "127.0.0.1:6663",
        "document-archive": "127.0.0.1:6664",
    }
    assert [r.map for r in zorgdomein.routes] == [
        "zorgdomein-srm", "zorgdomein-oru", "zorgdomein-orm", "zorgdomein-oml", "ref"]


def test_yaml_anchors_and_merge_keys_share_settings_between_destinations(dirs):
    write(
        dirs,
        "a.yaml",
        MINIMAL
        + """
destinations:
  base: &base
    endpoint: tcp:127.0.0.1:6661
    ack_timeout: 5s
    retry: &retry {initial: 2s, max: 1m}
  copy:
    <<: *base
    endpoint: tcp:127.0.0.1:6662
    retry: *retry
""",
    )
    config = load(dirs)
    base, copy = config.destination("base"), config.destination("copy")
    assert copy.ack_timeout == base.ack_timeout == 5.0
    assert copy.retry == base.retry == RetryConfig(initial=2.0, max=60.0)
    assert copy.queue_key == "127.0.0.1:6662"


def test_an_unknown_key_brought_in_by_a_merge_is_reported_where_it_is_written(dirs):
    write(
        dirs,
        "a.yaml",
        MINIMAL
        + """
x-defaults: &defaults
  ack_timout: 5s
destinations:
  d:
    <<: *defaults
    endpoint: tcp:127.0.0.1:6661
""",
    )
    assert problems(dirs) == [
        "channels/a.yaml:5:1: x-defaults: unknown key; expected one of: "
        "name, source, accept, duplicates, ack, destinations, routes",
        "channels/a.yaml:6:3: destinations.d.ack_timout: unknown key; expected one of: endpoint, ack_timeout, "
        "connect_timeout, retry, give_up_after, on_nak, max_queue, rewrite, charset, order, parallel, connection, keepalive",
    ]


# --------------------------------------------------------------------------- ${NAME} from the environment

OTAP = """
name: a
source:
  listen: "tcp:${KOPPEL_TEST_PORT}:interface=${KOPPEL_TEST_IFACE:-127.0.0.1}"
  allow: ["${KOPPEL_TEST_NET}"]   # quoted inside [ ] or { }: there { is YAML's
  max_connections: ${KOPPEL_TEST_MAX}
destinations:
  his:
    endpoint: tcp:host=${KOPPEL_TEST_HIS}:port=6661
    rewrite: {MSH-5: "HIX$$1"}
routes:
  - to: [his]
"""


def test_values_come_from_the_environment_typed_as_if_written_there(dirs, monkeypatch):
    """One channel file for test, acceptance and production: hosts and ports from ${NAME}."""
    for name, value in (("KOPPEL_TEST_PORT", "2590"), ("KOPPEL_TEST_NET", "10.20.0.0/16"),
                        ("KOPPEL_TEST_MAX", "7"), ("KOPPEL_TEST_HIS", "his.acceptatie.local")):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("KOPPEL_TEST_IFACE", raising=False)
    write(dirs, "a.yaml", OTAP)
    (channel,) = load(dirs).channels
    assert channel.source.listen == "tcp:2590:interface=127.0.0.1"  # the default after :-
    assert channel.source.allow == (ipaddress.ip_network("10.20.0.0/16"),)
    assert channel.source.max_connections == 7  # a number, as if written there
    (his,) = load(dirs).destinations
    assert his.queue_key == "his.acceptatie.local:6661"
    assert dict(his.rewrite)["MSH-5"] == "HIX$1"  # $$ is a $


def test_an_unset_variable_is_a_located_problem_naming_it(dirs, monkeypatch):
    for name in ("KOPPEL_TEST_PORT", "KOPPEL_TEST_NET", "KOPPEL_TEST_MAX", "KOPPEL_TEST_HIS", "KOPPEL_TEST_IFACE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KOPPEL_TEST_NET", "")  # empty counts as unset
    write(dirs, "a.yaml", OTAP)
    found = problems(dirs)
    assert found[0] == ("channels/a.yaml:3:16: source.listen: environment variable KOPPEL_TEST_PORT is not set "
                        "(set it in the engine's environment, or give a default: ${KOPPEL_TEST_PORT:-value})")
    assert [p.split(": ")[1] for p in found] == ["source.listen", "source.allow[0]", "source.max_connections",
                                                 "destinations.his.endpoint"]
    assert "channels/a.yaml:8:24:" in found[3]  # the column of ${ in the value
