"""Review of routes by field conditions (commit 515fbb1): each test states what should hold.

Synthetic data only (test BSN 123456782, made-up names)."""

from pathlib import Path

import pytest

from engine.bundle import load_bundle
from engine.core.hl7message import Message
from engine.core.response import read_ack
from engine.preview import preview
from engine.shell.engine import receive_settings
from tests.conftest import load_sample
from tests.factories import processor_for
from tests.test_on_map import Harness, channel_with
from tests.test_routing import load, problems

REPO = Path(__file__).resolve().parent.parent
LAB_ORM = "zorgdomein/zd_orm_o01_lab_v24.hl7"
ECHO_ORM = "zorgdomein/zd_orm_o01_echo_v24_latin1.hl7"
LIS, RIS = "127.0.0.1:6663", "127.0.0.1:6662"


# ----------------------------------------------------------------------------- koppel check

@pytest.mark.parametrize("value", ["[~]", "[{a: b}]", "[[A]]"])
def test_a_value_list_whose_only_item_is_bad_is_reported_not_a_crash(tmp_path, value):
    """`fields: {PV2-3: [~]}` is a config problem (file:line:col), not a ValueError traceback."""
    found = problems(tmp_path, f"      fields: {{PV2-3: {value}}}")
    assert any("routes[0].when.fields.PV2-3" in p for p in found), found


def test_a_bad_path_in_a_quoted_key_is_reported_at_its_own_column(tmp_path):
    """A flow-style key with a [..] selector must be quoted; the column still points at the bad character."""
    (problem,) = problems(tmp_path, '      fields: {"PV2-3.1x": A}')
    # line 8: the quote is at column 16, so the path's 8th character ('x') is at column 24
    assert problem.endswith("t.yaml:8:24: routes[0].when.fields.PV2-3.1x: unexpected 'x' (column 8 of the path)"), problem


def test_values_yaml_would_turn_into_other_types_are_kept_as_written(tmp_path):
    """yes, 2024-01-01, 1.10, 0x1F are compared as the texts written (cheap guard, passes today)."""
    (route,) = load(tmp_path, "      fields: {PV2-3: [yes, 2024-01-01, 1.10, 0x1F]}").channels[0].routes
    assert route.fields[0].patterns == ("yes", "2024-01-01", "1.10", "0x1F")


# ----------------------------------------------------------------------------- a receiving channel

MAPPED_BY_CONDITION = channel_with("""  - when: {{types: [ORM^O01], fields: {{PV2-3.1: "BEE*"}}}}
    map: zorgdomein-orm
""")


@pytest.fixture(params=["on-store", "on-map"])
def conditioned(tmp_path, request):
    h = Harness(tmp_path, request.param, channel=MAPPED_BY_CONDITION)
    yield h
    h.store.close()


def test_a_message_is_parsed_for_routing_at_most_once(conditioned, monkeypatch):
    """Routing parses the message once (targets, receive_marks and on_stored share it); the mapping once more."""
    calls = []
    original = Message.parse.__func__

    def counting(cls, raw, *, codec):
        calls.append(len(raw))
        return original(cls, raw, codec=codec)

    monkeypatch.setattr(Message, "parse", classmethod(counting))
    assert read_ack(conditioned.send(load_sample(ECHO_ORM))).code == "AA"
    conditioned.reactor.advance(0.05)
    assert conditioned.row("1234567").processing == "mapped"
    assert len(calls) <= 2, f"{len(calls)} parses of one message (1 for routing + 1 for mapping expected)"


FORWARD_LAB = channel_with("""  - when: {{types: [ORM^O01], fields: {{PV2-3.1: "{forward}"}}}}
    to: [lis-orders]
  - when: {{types: [ORM^O01], fields: {{PV2-3.1: "{mapped}"}}}}
    map: zorgdomein-orm
""")


def forward_lab(forward: str, mapped: str) -> str:
    """FORWARD_LAB as an on-store channel, with the two routes' care products."""
    return FORWARD_LAB.format(accept="", mode="on-store", ack_extra="", forward=forward, mapped=mapped)


def test_a_reload_between_receipt_and_commit_never_mixes_two_routing_decisions(tmp_path):
    """Received when a lab ORM is forwarded raw to the LIS; a reload (lab ORMs now mapped) lands before the
    commit: the message follows one decision (forwarded, or mapped), never the raw forward of the old config
    and the mapping of the new one."""
    def text(forward, mapped):
        return forward_lab(forward, mapped).replace("{", "{{").replace("}", "}}")

    (tmp_path / "old").mkdir()
    (tmp_path / "new").mkdir()
    h = Harness(tmp_path / "old", "on-store", channel=text("LAB*", "BEE*"))
    try:
        new_channels = tmp_path / "new" / "channels"
        new_channels.mkdir()
        (new_channels / "zd.yaml").write_text(forward_lab("XXX*", "LAB*"))
        new = load_bundle(new_channels, REPO / "mappings").config
        settings = receive_settings(new.channels[0], new, {}, processor_for(h, config=new, prefix="KN-"),
                                    committer=h.committer, metrics=h.metrics)
        factory = h.protocol.factory
        from engine.core import mllp

        h.protocol.dataReceived(mllp.encode_frame(load_sample(LAB_ORM)))  # stored with the old routes...
        factory.update(settings)  # ...and the reload lands before the insert commits
        for _ in range(20):
            h.reactor.advance(0)
        h.reactor.advance(0.05)
        row = h.row("e49ce31d")
        forwarded = LIS in h.store.queue_depths()
        mapped = row.processing == "mapped" or bool(h.store.list_agenda_entries())
        assert not (forwarded and mapped), (row.processing, h.store.queue_depths())
    finally:
        h.store.close()


# ----------------------------------------------------------------------------- the bundled configuration

@pytest.fixture(scope="module")
def bundle():
    return load_bundle(REPO / "channels", REPO / "mappings")


ORDER = (
    "MSH|^~\\&|ZorgDomein||OrderModule||20261123121000+0100||ORM^O01^ORM_O01|O7|P|2.4|||||NLD|8859/1\r"
    "NTE|1||Graag nuchter|ZD_REMARK\r"
    "NTE|2||Laboratorium|ZD_CLUSTER_NAME\r"
    "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpersoon^T||19800101|F\r"
    "PV2|||XYZ001^iets^99zda\r"
    "ORC|NW|ZD700000007||ZD700000007\r"
    "OBR|1|ZD700000007||CRP^CRP^99zdl\r"
)


def test_bundled_order_of_the_lab_cluster_reaches_the_lis_wherever_its_cluster_nte_is(bundle):
    """The mapping finds the cluster in any NTE marked ZD_CLUSTER_NAME (agenda: laboratory); the LIS route must too."""
    result = preview(bundle, "zorgdomein-in", ORDER.encode("latin-1"))
    assert result["entry"]["agenda"] == "laboratory"  # the mapping says: a lab order
    assert [o["to"] for o in result["outbound"]] == ["lis-orders"]  # the LIS, as received; not the RIS
