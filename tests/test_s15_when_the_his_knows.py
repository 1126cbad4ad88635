"""The HIS is told of a cancellation (SIU^S15) exactly when it knows of the referral and was
not told yet: it had Koppel's SIU^S12 or booked the referral itself. Every arrival order of
the order (ORM NW, its CA), the request (SRM^S01), the HIS's booking (SIU^S12 from the
scheduler), ZorgDomein's cancel (SRM^S04) and another sender's REF^I12/I14 for the same
referral, through the processor with a real store. Synthetic data only (test BSN 900073962, which passes the 11-proof)."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import load_sample
from tests.test_agenda_orderings import BSN, ZD, Harness, oru, siu, srm, world  # noqa: F401 - the fixture


def orm(control: str = "NW") -> bytes:
    raw = load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7").replace(b"ZP100120391", ZD.encode())
    raw = raw.replace(b"900073962", BSN.encode()).replace(b"|1234567|", f"|ORM{control}|".encode())
    return raw.replace(b"ORC|NW|", f"ORC|{control}|".encode())


def ref(trigger: str) -> bytes:
    """The same referral as a REF^I12/I14 from another referral source (the ZD-number in PID-3)."""
    return "\r".join([
        f"MSH|^~\\&|VERWIJZER|HUISARTS|KOPPEL|ZIEKENHUIS|20261201090000+0100||REF^{trigger}^REF_I12|REF{trigger}|P|2.4",
        "RF1|A|R||||||||",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{ZD}^^^ZorgDomein^VN||Testpatient&&Testpatient^T^^^^^L||19800101|F",
    ]).encode("latin-1") + b"\r"


MAKE = {"NW": orm, "CA": lambda: orm("CA"), "SRM": srm, "ORU": oru, "BOOK": lambda: siu("S12"),
        "S04": lambda: srm("S04", control_id="cancel"), "I12": lambda: ref("I12"), "I14": lambda: ref("I14")}
ORDERS = sorted({*itertools.permutations(["NW", "SRM", "BOOK", "S04"]), *itertools.permutations(["NW", "CA", "SRM", "S04"]),
                 *itertools.permutations(["ORU", "SRM", "S04"]), *itertools.permutations(["SRM", "I14", "S04", "BOOK"]),
                 *itertools.permutations(["I12", "S04", "SRM"])})


def to_his(h: Harness) -> list[str]:
    """The types of what went to the HIS, in queue order."""
    return [m.message_type for m in sorted(h.store.list_messages(limit=1000), key=lambda m: m.id)
            if m.origin_id is not None and m.message_type.startswith("SIU^")]


@pytest.mark.parametrize("order", ORDERS, ids="-".join)
def test_the_his_is_told_of_a_cancel_exactly_when_it_knows_the_referral(world, order):  # noqa: F811
    h = world("-".join(order))
    for name in order:
        h.receive(MAKE[name]())
    entry, sent = h.entry(), to_his(h)
    his_knows = "SIU^S12" in sent or entry.filler_id is not None
    if "SIU^S15" in sent:
        assert his_knows, order  # before: an S15 for a referral closed before its request came
        assert entry.filler_id is not None or sent.index("SIU^S12") < sent.index("SIU^S15"), order
    # once, by whichever of ZorgDomein's S04 and the order's CA closed it (before: none after a
    # CA, or a second after an S04 that only repeated the CA)
    assert sent.count("SIU^S15") == (1 if his_knows and entry.state == "cancelled" else 0), (order, sent)


def oml(control: str = "NW") -> bytes:
    raw = load_sample("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7").replace(b"ZP100120391", ZD.encode())
    raw = raw.replace(b"900073962", BSN.encode()).replace(b"|d0a06274854e4824a8a4|", f"|OML{control}|".encode())
    return raw.replace(b"ORC|NW|", f"ORC|{control}|".encode())


@pytest.mark.parametrize("order_message", [orm, oml], ids=["ORM", "OML"])
def test_an_order_the_his_booked_and_zorgdomein_cancelled_reaches_the_his_as_a_valid_s15(world, order_message):  # noqa: F811
    """Before, an order's CA went to the RIS (or LIS) only: the HIS kept the booking it made."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    from tests.test_s15_from_entry import field

    h = world(order_message.__name__)
    for raw in (order_message(), siu("S12"), order_message("CA")):
        h.receive(raw)
    assert (h.entry().state, h.entry().filler_id) == ("cancelled", "F778")
    (s15,) = [h.store.get_message(m.id).raw for m in h.store.list_messages(limit=1000)
              if m.origin_id is not None and m.message_type == "SIU^S15"]
    parse_message(s15.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()
    assert (field(s15, "SCH-1.1"), field(s15, "SCH-2.1")) == (ZD, "F778")
    assert field(s15, "PID-3[4=NLMINBIZA].1") == BSN


def stored_data(h: Harness) -> dict:
    import json

    return json.loads(h.entry().data)


def forget_sent(h: Harness) -> None:
    """Make the entry as one stored before Koppel kept what it sent (no `_sent`)."""
    import json
    import sqlite3

    (entry_id, data), = sqlite3.connect(h.path / "k.db").execute("SELECT id, data FROM agenda_entries")
    data = json.loads(data)
    data.pop("_sent")
    with sqlite3.connect(h.path / "k.db") as conn:
        conn.execute("UPDATE agenda_entries SET data = ? WHERE id = ?", (json.dumps(data), entry_id))


def test_what_each_system_last_had_is_kept_with_the_entry(world):  # noqa: F811
    h = world("kept")
    h.receive(orm())
    assert stored_data(h)["_sent"] == {"ris-orders": "ORM^O01"}
    h.receive(srm())
    assert stored_data(h)["_sent"] == {"ris-orders": "ORM^O01", "his-scheduling": "SIU^S12"}
    h.receive(srm("S04", control_id="cancel"))
    assert stored_data(h)["_sent"] == {"ris-orders": "ORM^O01", "his-scheduling": "SIU^S15"}
    h.receive(ref("I12"))
    assert stored_data(h)["_sent"]["his-scheduling"] == "SIU^S15"  # nothing sent: kept as it was


@pytest.mark.parametrize(("first", "s15"), [("SRM", True), ("NW", False)])
def test_an_entry_stored_before_koppel_kept_what_it_sent_is_cancelled_to_the_his_if_it_was_requested(
        world, first, s15):  # noqa: F811
    """After the upgrade a requested entry's S12 went out before `_sent` existed: its cancel still
    reaches the HIS; an order's (the HIS never had a request) does not."""
    h = world(f"legacy-{first}")
    h.receive(MAKE[first]())
    forget_sent(h)
    h.receive(srm("S04", control_id="cancel"))
    assert h.entry().state == "cancelled"
    assert ("SIU^S15" in to_his(h)) is s15
    if s15:  # what was sent is kept from now on; for the other systems still not known
        assert stored_data(h)["_sent"] == {"*": "unknown", "his-scheduling": "SIU^S15"}


def saves_while(h: Harness, *raws: bytes) -> list:
    """The entry saves (SaveAgendaEntry ops) committed while receiving ``raws``."""
    from engine.store import SaveAgendaEntry

    submit_many, writes = h.committer.submit_many, []

    def recording(ops, **kw):
        writes.append(list(ops))
        return submit_many(ops, **kw)

    h.committer.submit_many = recording
    try:
        for raw in raws:
            h.receive(raw)
    finally:
        h.committer.submit_many = submit_many
    return [op for ops in writes for op in ops if isinstance(op, SaveAgendaEntry)]


def test_what_was_sent_rides_in_the_messages_own_save_of_the_entry_not_a_second_one(world):  # noqa: F811
    """Keeping `_sent` costs no extra write (or JSON) on the hot path: a request is one save."""
    (save,) = saves_while(world("one-save"), srm())
    assert '"_sent": {"his-scheduling": "SIU^S12"}' in save.data


@pytest.mark.parametrize(("first", "s15"), [("SRM", True), ("I12", False)])
def test_koppel_map_with_the_store_previews_the_cancel_as_the_engine_would_send_it(world, first, s15):  # noqa: F811
    from engine.preview import preview

    h = world(f"preview-{first}")
    h.receive(MAKE[first]())
    result = preview(h.bundle, "zorgdomein-in", srm("S04", control_id="cancel"), store=h.store)
    assert result["entry"]["state"] == "cancelled"
    assert [o["to"] for o in result["outbound"]] == (["his-scheduling"] if s15 else [])
