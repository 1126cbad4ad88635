"""Routes by field conditions (`when: {fields: ..., unless: ...}`): the pure check, the
config that declares it, and a channel that uses it to send ZorgDomein's lab ORMs to the LIS."""

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.bundle import load_bundle
from engine.config import ConfigError, load_config
from engine.core.hl7message import Message
from engine.core.response import read_ack
from engine.core.routing import FieldCondition, conditions_hold, parsed_once
from engine.preview import preview
from tests.conftest import load_sample
from tests.test_on_map import Harness, channel_with

REPO = Path(__file__).resolve().parent.parent
LAB_ORM = "zorgdomein/zd_orm_o01_lab_v24.hl7"
ECHO_ORM = "zorgdomein/zd_orm_o01_echo_v24_latin1.hl7"

ORDER = (
    "MSH|^~\\&|ZorgDomein||OrderModule||20261123121000+0100||ORM^O01^ORM_O01|O1|P|2.4\r"
    "NTE|1||Laboratorium|ZD_CLUSTER_NAME\r"
    "PID|1||123456782^^^NLMINBIZA^NNNLD~ZD700000001^^^ZorgDomein^VN||Testpatiënt^T\r"
    "PV2|||LABEDG001^laboratorium^99zda\r"
    "ORC|NW|ZD700000001||ZD700000001\r"
    "OBR|1|ZD700000001||CRP^CRP^99zdl\r"
    "ORC|NW|ZD700000001||ZD700000001\r"
    "OBR|2|ZD700000001||ALAT^ALAT \\T\\ co^99zdl\r"
)


def message(text: str = ORDER) -> Message:
    return Message.parse(text.encode("latin-1"), codec="latin-1")


@pytest.mark.parametrize(("path", "patterns", "holds"), [
    ("PV2-3.1", ["LABEDG001"], True),
    ("PV2-3.1", ["labedg001"], False),  # codes compare exactly
    ("PV2-3.1", ["LAB*"], True),
    ("PV2-3.1", ["BEE*", "LAB*"], True),
    ("PV2-3.1", ["BEE*"], False),
    ("PV2-3.1", ["*"], True),
    ("PV2-3.1", [""], False),
    ("PV1-2", [""], True),  # an absent segment reads as empty
    ("PV1-2", ["*"], False),
    ("PV2-3.9", [""], True),  # an absent component too
    ("OBR-4.1", ["ALAT"], False),  # the first OBR only
    ("OBR[*]-4.1", ["ALAT"], True),  # any occurrence
    ("OBR[2]-4.2", ["ALAT & co"], True),  # unescaped before comparing
    ("PID-3[4=ZorgDomein].1", ["ZD*"], True),
    ("PID-3[4=NLMINBIZA].1", ["ZD*"], False),
    ("NTE-3", ["Laboratorium"], True),
    ("MSH-9.1", ["ORM"], True),
])
def test_a_condition_holds_when_any_selected_value_is_one_of_its_patterns(path, patterns, holds):
    assert FieldCondition.of(path, patterns).holds(message()) is holds


def test_fields_must_all_hold_and_unless_must_not():
    lab = FieldCondition.of("PV2-3.1", ["LAB*"])
    cluster = FieldCondition.of("NTE-3", ["Laboratorium"])
    cancel = FieldCondition.of("ORC-1", ["CA"])
    radiology = FieldCondition.of("NTE-3", ["Radiologie"])
    assert conditions_hold((lab, cluster), (cancel,), message())
    assert not conditions_hold((lab, radiology), (), message())
    assert not conditions_hold((lab,), (cancel,), message(ORDER.replace("ORC|NW", "ORC|CA", 1)))
    assert conditions_hold((), (), message())


def test_a_condition_needs_a_pattern_and_a_valid_path():
    with pytest.raises(ValueError, match="at least one"):
        FieldCondition.of("PV2-3", [])
    with pytest.raises(ValueError, match="column"):
        FieldCondition.of("PV2-x", ["A"])


@given(value=st.text(alphabet="AB*x", max_size=4),
       patterns=st.lists(st.text(alphabet="AB*", max_size=3), min_size=1, max_size=3))
def test_holds_is_exact_prefix_any_or_empty_as_documented(value, patterns):
    raw = f"MSH|^~\\&|S||R||20260101||ORM^O01|1|P|2.4\rPV2|||{value}\r"
    expected = any(
        (p == "" and value == "")
        or (p == "*" and value != "")
        or (p.endswith("*") and p != "*" and value != "" and value.startswith(p[:-1]))
        or (not p.endswith("*") and p != "" and value == p)
        for p in patterns
    )
    assert FieldCondition.of("PV2-3", patterns).holds(message(raw)) is expected


def test_the_message_is_parsed_once_and_only_when_asked():
    calls = []
    get = parsed_once(ORDER.encode("latin-1"), "latin-1")
    original = Message.parse

    def counting(raw, *, codec):
        calls.append(1)
        return original(raw, codec=codec)

    Message.parse = counting  # type: ignore[method-assign]
    try:
        assert calls == []
        assert get() is get()
    finally:
        Message.parse = original  # type: ignore[method-assign]
    assert calls == [1]


# ----------------------------------------------------------------------------- config

CHANNEL = """name: t
source:
  listen: tcp:0
destinations:
  lis: {{endpoint: "tcp:host=127.0.0.1:port=6663"}}
routes:
  - when:
{when}
    to: [lis]
"""


def load(tmp_path, when: str):
    channels = tmp_path / "channels"
    channels.mkdir(exist_ok=True)
    (channels / "t.yaml").write_text(CHANNEL.format(when=when))
    (tmp_path / "mappings").mkdir(exist_ok=True)
    return load_config(channels, tmp_path / "mappings")


def problems(tmp_path, when: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, when)
    return [str(p) for p in caught.value.problems]


def test_route_conditions_are_read_into_the_route(tmp_path):
    config = load(tmp_path, '      types: [ORM^O01]\n      fields: {PV2-3.1: [LAB*, "0320"], NTE-3: Laboratorium}\n'
                            '      unless: {ORC-1: CA, PV1-2: ""}')
    (route,) = config.channels[0].routes
    assert [(str(c.path), c.patterns) for c in route.fields] == [
        ("PV2-3.1", ("LAB*", "0320")), ("NTE-3", ("Laboratorium",))]
    assert [(str(c.path), c.patterns) for c in route.unless] == [("ORC-1", ("CA",)), ("PV1-2", ("",))]


def test_an_unquoted_number_keeps_its_leading_zero(tmp_path):
    (route,) = load(tmp_path, "      fields: {PRD-3.1: 0320}").channels[0].routes
    assert route.fields[0].patterns == ("0320",)


def test_a_bad_path_is_reported_at_its_own_column(tmp_path):
    (problem,) = problems(tmp_path, "      fields: {PV2-3.1x: A}")
    # line 8, the key starts at column 16; the 'x' is the path's 8th character
    assert problem.endswith("t.yaml:8:23: routes[0].when.fields.PV2-3.1x: unexpected 'x' (column 8 of the path)")


@pytest.mark.parametrize(("when", "says"), [
    ("      fields: {}", "an empty map says nothing"),
    ("      unless: {}", "an empty map says nothing"),
    ("      fields: {PV2-3: []}", "an empty list would never match"),
    ("      fields: {PV2-3: ~}", 'write "" for an empty field'),
    ("      fields: {PV2-3: {a: b}}", "expected a single value"),
    ("      fields: [PV2-3]", "expected a mapping"),
    ("      field: {PV2-3: A}", "did you mean fields?"),
])
def test_bad_conditions_say_what_is_wrong(tmp_path, when, says):
    found = problems(tmp_path, when)
    assert any(says in p for p in found), found


# ----------------------------------------------------------------------------- a channel using them

ROUTED = channel_with("""  - when: {{types: [ORM^O01], fields: {{PV2-3.1: "LAB*"}}}}
    to: [lis-orders]
  - when: {{types: [ORM^O01], fields: {{PV2-3.1: "BEE*"}}, unless: {{ORC-1: CA}}}}
    map: zorgdomein-orm
""")

LIS, RIS = "127.0.0.1:6663", "127.0.0.1:6662"


@pytest.fixture(params=["on-store", "on-map"])
def routed(tmp_path, request):
    h = Harness(tmp_path, request.param, channel=ROUTED)
    yield h
    h.store.close()


def test_a_lab_order_is_forwarded_to_the_lis_and_not_mapped(routed):
    assert read_ack(routed.send(load_sample(LAB_ORM))).code == "AA"
    routed.reactor.advance(0.05)
    assert routed.store.queue_depths() == {LIS: 1}
    assert routed.row("e49ce31d").processing in ("forwarded", None)
    assert routed.store.list_agenda_entries() == []


def test_an_imaging_order_is_mapped_and_not_forwarded(routed):
    assert read_ack(routed.send(load_sample(ECHO_ORM))).code == "AA"
    routed.reactor.advance(0.05)
    assert routed.row("1234567").processing == "mapped"
    assert routed.store.queue_depths() == {RIS: 1}  # the mapping's ORM^O01, not the raw order
    (entry,) = routed.store.list_agenda_entries()
    assert entry.agenda_id == "radiology-echo"


def test_an_order_no_condition_takes_is_filtered_and_on_map_answered_ar(routed):
    cancelled = load_sample(ECHO_ORM).replace(b"ORC|NW|", b"ORC|CA|")
    reply = read_ack(routed.send(cancelled))
    routed.reactor.advance(0.05)
    assert reply.code == ("AR" if routed.protocol.factory.settings.ack_mode == "on-map" else "AA")
    assert routed.row("1234567").processing == "filtered"
    assert routed.store.queue_depths() == {}
    assert routed.metrics.registry.get_sample_value("koppel_filtered_total", {"channel": "zd"}) == 1


# ----------------------------------------------------------------------------- the bundled configuration

@pytest.fixture(scope="module")
def bundle():
    return load_bundle(REPO / "channels", REPO / "mappings")


RECEIVED_SHOWN = {"to": "lis-orders", "message": "(the message as received)"}


def test_bundled_lab_orm_goes_to_the_lis_as_received_and_not_to_the_ris(bundle):
    result = preview(bundle, "zorgdomein-in", load_sample(LAB_ORM))
    assert result["forward_to"] == []  # the mapping decides (`template: received`), not a route
    assert result["entry"]["agenda"] == "laboratory"
    assert result["outbound"] == [RECEIVED_SHOWN]


def test_bundled_imaging_orm_goes_to_the_ris_and_not_to_the_lis(bundle):
    result = preview(bundle, "zorgdomein-in", load_sample(ECHO_ORM))
    assert result["forward_to"] == []
    assert result["entry"]["agenda"] == "radiology-echo"
    assert [o["to"] for o in result["outbound"]] == ["ris-orders"]


def test_bundled_lab_orm_with_only_the_lab_cluster_still_reaches_the_lis(bundle):
    raw = ORDER.replace("LABEDG001^laboratorium", "XYZ001^iets").encode("latin-1")
    result = preview(bundle, "zorgdomein-in", raw)
    assert result["outbound"] == [RECEIVED_SHOWN]


# ----------------------------------------------------------------------------- the RIS's ORM^O01 (outbound `when`)

@pytest.fixture
def mapped(tmp_path):
    from tests.test_processor import Harness as ProcessorHarness

    h = ProcessorHarness(tmp_path)
    yield h
    h.store.close()


def to_ris(h) -> list[tuple[int, bytes]]:
    return [(m.origin_id, h.store.get_message(m.id).raw) for m in h.store.list_messages(limit=100)
            if m.origin_id is not None and m.message_type == "ORM^O01"]


def test_a_lab_order_and_its_cancel_never_reach_the_ris(mapped):
    lab = load_sample(LAB_ORM)
    mapped.receive(lab)
    mapped.receive(lab.replace(b"ORC|NW|", b"ORC|CA|").replace(b"|e49ce31d|", b"|e49ce31e|"))
    assert [e.state for e in mapped.entries()] == ["cancelled"]
    assert to_ris(mapped) == []


def test_a_thin_cancel_of_an_imaging_order_the_ris_has_still_reaches_it(mapped):
    """The cancel carries no care product (no PV2): `entry.last_sent` says the RIS has the order."""
    echo = load_sample(ECHO_ORM)
    first = mapped.receive(echo)
    thin = b"\r".join(seg for seg in echo.replace(b"ORC|NW|", b"ORC|CA|").replace(b"|1234567|", b"|1234568|")
                      .split(b"\r") if not seg.startswith(b"PV2"))
    second = mapped.receive(thin)
    assert [e.state for e in mapped.entries()] == ["cancelled"]
    sent = to_ris(mapped)
    assert [origin for origin, _ in sent] == [second, first]  # newest first
    assert b"ORC|CA|" in sent[0][1]
    # what it cancels comes from the entry: the cancel's own PV2 is gone, the RIS still sees it
    pv2 = [seg for seg in sent[0][1].split(b"\r") if seg.startswith(b"PV2|")]
    assert pv2 == [seg for seg in sent[1][1].split(b"\r") if seg.startswith(b"PV2|")]
    assert pv2[0].split(b"|")[3].startswith(b"BEE")


def test_an_order_of_the_radiology_cluster_reaches_the_ris_whatever_its_product(mapped):
    raw = ORDER.replace("Laboratorium", "Radiologie").replace("LABEDG001", "XYZ001").encode("latin-1")
    mapped.receive(raw)
    assert [e.agenda_id for e in mapped.entries()] == ["radiology-echo"]  # by its cluster
    assert len(to_ris(mapped)) == 1


def test_an_outbound_when_with_a_prefix_matches_values_starting_with_it():
    from engine.core.agenda import AgendaEvent
    from engine.mapping import Outbound, _when_matches

    outbound = Outbound(to="ris", template=None, when=(("care_product.code", frozenset({"BEE*", "X"})),))  # type: ignore[arg-type]

    def event(code):
        return AgendaEvent(kind="diagnostic-order", action="create", zd_number="ZD1",
                           fields={"care_product": {"code": code}})

    assert [_when_matches(outbound, event(c), None, None) for c in ("BEEEDG008", "BEE", "X", "XBEE", "", "BE")] == [
        True, True, True, False, False, False]


def test_an_outbound_when_with_a_star_among_other_values_takes_any_value_as_routes_do():
    from engine.core.agenda import AgendaEvent
    from engine.mapping import Outbound, _when_matches

    outbound = Outbound(to="x", template=None, when=(("action", frozenset({"*", "cancel"})),))  # type: ignore[arg-type]
    event = AgendaEvent(kind="referral", action="create", zd_number="ZD1", fields={})
    assert _when_matches(outbound, event, None, None)


def test_a_lab_order_sharing_its_zd_number_with_an_imaging_order_the_ris_has_stays_off_the_ris(mapped):
    """An echo ORM, then a lab ORM (NW, then CA, both with their care product) of the same
    referral: the RIS has the echo only; what follows the lab order is not the RIS's."""
    echo = load_sample(ECHO_ORM)
    lab = (load_sample(LAB_ORM).replace(b"ZD12345678", b"ZP100120391")
           .replace(b"|e49ce31d|", b"|L1|"))  # the echo sample's ZD-number (and patient: its PID)
    lab = b"\r".join(s for s in lab.split(b"\r") if not s.startswith(b"PID")) + b"\r"
    pid = [s for s in echo.split(b"\r") if s.startswith(b"PID")][0]
    lab = lab.replace(b"\rPV1", b"\r" + pid + b"\rPV1", 1) if b"\rPV1" in lab else lab
    ids = [mapped.receive(echo), mapped.receive(lab),
           mapped.receive(lab.replace(b"ORC|NW|", b"ORC|CA|").replace(b"|L1|", b"|L2|"))]
    assert [mapped.outcome(i)[0] for i in ids] == ["mapped"] * 3
    sent = to_ris(mapped)
    assert len(sent) == 1 and b"ECHOXU" in sent[0][1], [raw.split(b"\r")[5:6] for _, raw in sent]


def test_a_bundled_channel_takes_no_type_it_routes_nowhere(bundle):
    """Every type a bundled channel accepts is taken by one of its routes: a scheduler's SIU
    sent to the ZorgDomein port is refused (AR), not answered AA and filtered."""
    from engine.config import unrouted_types

    assert {c.name: unrouted_types(c) for c in bundle.config.channels} == {"zorgdomein-in": [], "scheduler-in": []}
    siu = (b"MSH|^~\\&|HIX|ZIEKENHUIS|KOPPEL|ZIEKENHUIS|20261201090000+0100||SIU^S12^SIU_S12|S1|P|2.5\r"
           b"SCH|ZD900000001|F1\r")
    result = preview(bundle, "zorgdomein-in", siu)
    assert (result["accepted"], result["answer"]["code"]) == (False, "AR")


@pytest.mark.parametrize(("accept", "routes", "unrouted"), [
    ("[SRM^S01, SIU^S12]", "[{when: {types: [SRM^S01]}, to: [lis]}]", ["SIU^S12"]),
    ("[SRM^S01, SIU^S12]", "[{to: [lis]}]", []),  # a route without types takes everything
    ("[ORU, ADT^A01]", "[{when: {types: [ORU^R01]}, to: [lis]}]", ["ADT^A01"]),  # ORU: some of it routed
    ("[ORU^R01]", "[{when: {types: [ORU]}, to: [lis]}]", []),
    ("[ORU^R01]", "[{when: {types: [ORU^R01], fields: {OBX-2: ED}}, to: [lis]}]", []),  # types alone count
])
def test_a_type_accepted_but_routed_nowhere_is_found(tmp_path, accept, routes, unrouted):
    from engine.config import unrouted_types

    channels = tmp_path / "channels"
    channels.mkdir()
    (tmp_path / "mappings").mkdir()
    (channels / "t.yaml").write_text(
        f"name: t\nsource: {{listen: tcp:0}}\naccept: {{types: {accept}}}\n"
        f"destinations: {{lis: {{endpoint: 'tcp:host=127.0.0.1:port=6663'}}}}\nroutes: {routes}\n")
    (channel,) = load_config(channels, tmp_path / "mappings").channels
    assert unrouted_types(channel) == unrouted


def check_one_channel(tmp_path, capsys, accept: str, route_types: str) -> tuple[str, str]:
    """`koppel check` (which must pass) of one channel accepting ``accept`` with one route on
    ``route_types``: its stdout and stderr."""
    from engine.cli import main

    channels = tmp_path / "channels"
    channels.mkdir()
    (tmp_path / "mappings").mkdir()
    (channels / "t.yaml").write_text(
        f"name: t\nsource: {{listen: tcp:0}}\naccept: {{types: {accept}}}\n"
        "destinations: {lis: {endpoint: 'tcp:host=127.0.0.1:port=6663'}}\n"
        f"routes: [{{when: {{types: {route_types}}}, to: [lis]}}]\n")
    assert main(["check", "--channels", str(channels), "--mappings", str(tmp_path / "mappings")]) == 0
    return capsys.readouterr()


def test_koppel_check_warns_of_an_accepted_type_no_route_takes_and_still_passes(tmp_path, capsys):
    out, err = check_one_channel(tmp_path, capsys, "[SRM^S01, SIU^S12]", "[SRM^S01]")
    assert out.startswith("ok: 1 channel(s)")
    assert "channel t accepts SIU^S12 but no route takes it" in err and "SRM^S01" not in err


@pytest.mark.parametrize("route_types, warned", [
    ("[ORU^R01]", ["ORU^R01"]), ("[SRM^S01, ORM]", ["ORM"]), ("[SRM]", []), ("[SRM^S04]", ["SRM^S04"]),
])
def test_koppel_check_warns_of_a_route_type_the_channel_refuses(tmp_path, capsys, route_types, warned):
    """A route on a type that accept.types leaves out can never take a message: it is answered
    AR before routing. The onboarding drill's channel passed check without a word."""
    _, err = check_one_channel(tmp_path, capsys, "[SRM^S01]", route_types)
    found = re.findall(r"routes\[0\] of channel t takes (\S+), which accept.types refuses", err)
    assert found == warned, err


# ----------------------------------------------------------------------------- `template: received`

def lis_entries(h) -> list[int]:
    """The message ids queued for the LIS (the received messages themselves)."""
    return sorted(row[0] for row in h.store._query(
        "SELECT message_id FROM queue_entries WHERE destination = 'lis-orders'"))


def test_a_lab_order_and_its_thin_cancel_reach_the_lis_as_received(mapped):
    """The LIS gets the lab ORM itself (queued, not a copy), and a cancel without care product
    or cluster because `entry.last_sent` says the LIS has the order; the entry records it."""
    lab = load_sample(LAB_ORM)
    nw = mapped.receive(lab)
    thin = b"\r".join(s for s in lab.replace(b"ORC|NW|", b"ORC|CA|").replace(b"|e49ce31d|", b"|e49ce31e|")
                      .split(b"\r") if not s.startswith(b"PV2"))
    ca = mapped.receive(thin)
    assert [mapped.outcome(i)[0] for i in (nw, ca)] == ["mapped", "mapped"]
    assert lis_entries(mapped) == [nw, ca]
    assert to_ris(mapped) == []
    (entry,) = mapped.entries()
    import json

    assert json.loads(entry.data)["_sent"] == {"lis-orders": "ORM^O01"}
    assert [m.origin_id for m in mapped.store.list_messages(limit=10)].count(None) == 2  # no copies built


def test_an_imaging_orders_thin_cancel_does_not_reach_the_lis(mapped):
    echo = load_sample(ECHO_ORM)
    mapped.receive(echo)
    thin = b"\r".join(s for s in echo.replace(b"ORC|NW|", b"ORC|CA|").replace(b"|1234567|", b"|1234568|")
                      .split(b"\r") if not s.startswith(b"PV2"))
    mapped.receive(thin)
    assert lis_entries(mapped) == []
    assert len(to_ris(mapped)) == 2


def test_received_is_a_template_name_koppel_check_takes(tmp_path):
    from engine.mapping import RECEIVED, load_mappings

    orm = load_mappings(REPO / "mappings").mapping("zorgdomein-orm")
    assert [o.to for o in orm.outbound if o.template is RECEIVED] == ["lis-orders"]
