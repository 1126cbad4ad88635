"""One referral's messages in every arrival order, repeats and restarts: the entry must end
the same (state, data, attachments, what the hospital's systems were sent), or the message
that cannot apply must be an error with a reason.

Synthetic data only: the test patient's BSN 900073962 (the ZorgDomein sample's, passes the
11-proof), another patient 999999990 (passes the 11-proof too).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

from tests.conftest import load_sample
from tests.test_processor import Harness as ProcessorHarness

REPO = Path(__file__).resolve().parent.parent
ZD = "ZD200046119"  # the ZD-number of the ZorgDomein ORU samples
BSN = "900073962"
OTHER_BSN = "999999990"


def srm(trigger: str = "S01", *, control_id: str = "g20ce6a9f8ca4f551275", bsn: str = BSN) -> bytes:
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7").replace(b"ZD200046139", ZD.encode())
    raw = raw.replace(b"PID|1||^^^NLMINBIZA", f"PID|1||{bsn}^^^NLMINBIZA".encode())
    raw = raw.replace(b"SRM^S01^SRM_S01", f"SRM^{trigger}^SRM_S01".encode())
    return raw.replace(b"g20ce6a9f8ca4f551275", f"{control_id}{trigger}".encode())


def oru() -> bytes:
    raw = load_sample("zorgdomein/zd_oru_r01_request_form_pdf.hl7")
    return raw.replace(b"PID|1||^^^NLMINBIZA", f"PID|1||{BSN}^^^NLMINBIZA".encode())


def siu(trigger: str = "S12", *, start: str = "20261210093000+0100", bsn: str = BSN) -> bytes:
    segments = [
        f"MSH|^~\\&|HIX|ZIEKENHUIS|KOPPEL|ZIEKENHUIS|20261201090000+0100||SIU^{trigger}^SIU_{trigger}"
        f"|SIU{trigger}{start[:12]}|P|2.5",
        f"SCH|{ZD}|F778|||||^Controle||30|MIN|^^30^{start}^20261210100000+0100||||||||||||||Booked",
        f"PID|1||{bsn}^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^T^^^^^L||19800101|F",
        "AIS|1||CARPOLI^Polikliniek cardiologie",
    ]
    return ("\r".join(segments) + "\r").encode("latin-1")


class Harness(ProcessorHarness):
    """test_processor's harness (bundled mappings, a real store, the processor on a
    MemoryReactorClock) in a directory of its own, so one test can run several."""

    def __init__(self, path: Path):
        path.mkdir(parents=True, exist_ok=True)
        self.path = path
        super().__init__(path)

    def entry(self):
        (entry,) = self.store.list_agenda_entries(limit=10)
        return entry

    def sent(self, destination_type: str) -> list[int]:
        """Origins of the outbound messages of this type (what the hospital's systems get)."""
        return [m.origin_id for m in self.store.list_messages(limit=1000)
                if m.origin_id is not None and m.message_type == destination_type]


@pytest.fixture
def world(tmp_path):
    harnesses = []

    def make(name: str) -> Harness:
        harness = Harness(tmp_path / name)
        harnesses.append(harness)
        return harness

    yield make
    for harness in harnesses:
        harness.store.close()


# --------------------------------------------------------------------------------------------
# The HIS gets the request's SIU^S12 only for an entry still `requested`: not when a booking or
# cancellation that came before the request (held for it) is applied in the same step.

@pytest.mark.parametrize("before", [["S12"], ["S12", "S15"]], ids=["booked", "booked-and-cancelled"])
def test_the_his_gets_no_request_for_a_referral_the_scheduler_booked_before_the_request_came(world, before):
    """README: "the HIS gets the request's SIU^S12 only while the entry is `requested`, never
    for one the scheduler already booked or that is closed". A booking (and its cancel) held
    until the SRM came were applied after the SRM's SIU^S12 was built, so the HIS was asked
    to plan an appointment it had already booked (or cancelled)."""
    h = world("held")
    for trigger in before:
        assert h.outcome(h.receive(siu(trigger)))[0] == "held"
    request = h.receive(srm())
    entry = h.entry()
    assert entry.state == ("booked" if before == ["S12"] else "cancelled")
    assert h.sent("SIU^S12") == []  # the request went out for an entry no longer `requested`
    assert h.outcome(request)[0] == "mapped"

    # whereas a letter held before the request leaves it requested: the HIS does get it
    h = world("letter")
    h.receive(oru())
    request = h.receive(srm())
    assert h.entry().state == "requested" and h.sent("SIU^S12") == [request]
    assert len(h.sent("MDM^T02")) == 1


# --------------------------------------------------------------------------------------------
# A message about another patient is refused whether it comes before or after the cancel.

@pytest.mark.parametrize("order", [("other", "own"), ("own", "other")], ids=["stranger-first", "stranger-last"])
def test_a_cancel_about_another_patient_is_refused_whether_or_not_the_entry_is_already_cancelled(world, order):
    """An S04 naming another BSN for an open entry is refused (patient-mismatch); once the
    entry was cancelled the same message was recorded 'mapped' to that entry, as if it were
    about this patient."""
    h = world("-".join(order))
    h.receive(srm())
    ids = {}
    for who in order:
        ids[who] = h.receive(srm("S04", control_id=who, bsn=OTHER_BSN if who == "other" else BSN))
    assert h.entry().state == "cancelled"
    assert json.loads(h.entry().data)["patient.bsn"] == BSN
    assert h.outcome(ids["own"])[0] == "mapped"
    assert h.outcome(ids["other"]) == ("error", "cannot cancel: the message's patient (BSN) is not the entry's")


@pytest.mark.parametrize("order", list(itertools.permutations(["SRM", "ORU", "S12", "S15"])), ids="-".join)
def test_every_order_of_request_letter_booking_and_cancel_asks_the_his_only_while_requested(world, order):
    """Whatever the order, the entry ends the cancelled request with its letter; the HIS is
    asked to plan it only if the request came before the scheduler's booking (in the
    natural order), never after the scheduler booked it."""
    make = {"SRM": srm, "ORU": oru, "S12": lambda: siu("S12"), "S15": lambda: siu("S15")}
    h = world("-".join(order))
    ids = {name: h.receive(make[name]()) for name in order}
    at = order.index
    # the cancel waits for the entry only behind an earlier held message (the letter or the
    # booking); first of all, with nothing waiting, it is refused with a reason
    cancel_held = at("S15") < at("SRM") and min(at("ORU"), at("S12")) < at("S15")
    cancel_applies = at("S15") > at("SRM") or cancel_held
    if not cancel_applies:
        assert h.outcome(ids["S15"]) == ("error", "cannot cancel: no entry for this ZD-number")
    entry = h.entry()
    assert (entry.kind, len(entry.attachments)) == ("appointment-request", 1)
    assert entry.state == ("cancelled" if cancel_applies else "booked")
    # asked only while requested: the booking and the held cancel came after the request
    asked = at("SRM") < at("S12") and not cancel_held
    assert h.sent("SIU^S12") == ([ids["SRM"]] if asked else [])
    assert not h.store.has_held_events()


@pytest.mark.parametrize("order", list(itertools.permutations(["SRM", "ORU", "S12", "S13"])), ids="-".join)
def test_every_order_of_request_letter_booking_and_reschedule_ends_rescheduled(world, order):
    """The scheduler's S13 waits for the S12 it changes, wherever it comes: the entry ends
    rescheduled to the S13's slot with its letter, every message mapped, nothing left held.
    It was refused before its S12 ("entry is requested", or "no entry" before the request),
    and the entry ended booked at the S12's slot."""
    make = {"SRM": srm, "ORU": oru, "S12": lambda: siu("S12"), "S13": lambda: siu("S13", start="20261217140000+0100")}
    h = world("-".join(order))
    ids = {name: h.receive(make[name]()) for name in order}
    entry = h.entry()
    assert (entry.kind, entry.state, len(entry.attachments)) == ("appointment-request", "rescheduled", 1)
    assert json.loads(entry.data)["booked_start"] == "2026-12-17T14:00:00+01:00"
    assert {name: h.outcome(i)[0] for name, i in ids.items()} == dict.fromkeys(order, "mapped")
    assert not h.store.has_held_events()
    # the HIS is asked to plan the request only if it came before the scheduler's booking
    assert h.sent("SIU^S12") == ([ids["SRM"]] if order.index("SRM") < order.index("S12") else [])
