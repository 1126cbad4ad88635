"""The HIS is told of ZorgDomein's cancellation (SIU^S15) exactly when it knows of the
referral: it had Koppel's SIU^S12 (sent while the entry was `requested`) or booked the
referral itself. Every arrival order of the order (ORM NW, its CA), the request (SRM^S01),
the HIS's booking (SIU^S12 from the scheduler) and the cancel (SRM^S04), through the processor
with a real store. Synthetic data only (test BSN 900073962, which passes the 11-proof)."""

from __future__ import annotations

import itertools

import pytest

from tests.conftest import load_sample
from tests.test_agenda_orderings import BSN, ZD, Harness, oru, siu, srm, world  # noqa: F401 - the fixture


def orm(control: str = "NW") -> bytes:
    raw = load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7").replace(b"ZP100120391", ZD.encode())
    raw = raw.replace(b"900073962", BSN.encode()).replace(b"|1234567|", f"|ORM{control}|".encode())
    return raw.replace(b"ORC|NW|", f"ORC|{control}|".encode())


MAKE = {"NW": orm, "CA": lambda: orm("CA"), "SRM": srm, "ORU": oru, "BOOK": lambda: siu("S12"),
        "S04": lambda: srm("S04", control_id="cancel")}
ORDERS = sorted({*itertools.permutations(["NW", "SRM", "BOOK", "S04"]), *itertools.permutations(["NW", "CA", "SRM", "S04"]),
                 *itertools.permutations(["ORU", "SRM", "S04"])})


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
