"""Edge cases of arrival order found by a review of every order (README "Not done yet"), each
with the test that failed before its fix: a scheduler's change before its booking, a late
create after an update of its kind, a second cancel, a lower-case ZD-number.

Synthetic data only: BSN 123456782 and 900073962 (the ZorgDomein samples'), both pass the
11-proof; made-up ids.
"""

from __future__ import annotations

import datetime as dt
import json

import pytest

from engine.core import agenda as ag
from tests.test_agenda_orderings import ZD as SAMPLE_ZD
from tests.test_agenda_orderings import Harness, siu, srm

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
ZD = "ZD123456789"  # synthetic
BSN = "123456782"
BOOK = ag.AgendaBook(agendas=(ag.Agenda(id="fallback", name="Onbekend", fallback=True),))


class Agendas:
    """What the processor does around ``decide``: hold what must wait, and after every change
    try the held events again in arrival order (``decide`` says whether one still waits)."""

    def __init__(self) -> None:
        self.entry: ag.AgendaEntry | None = None
        self.held: list[tuple[str, ag.AgendaEvent]] = []
        self.outcomes: dict[str, object] = {}

    def receive(self, message_id: str, event: ag.AgendaEvent) -> object:
        decision = ag.decide(event, self._found(event), now=NOW, message_id=message_id, book=BOOK,
                             waiting=bool(self.held))
        self.outcomes[message_id] = decision
        if isinstance(decision, ag.Hold):
            self.held.append((message_id, event))
        elif self._saved(decision):
            self._retry()
        return decision

    def _found(self, event: ag.AgendaEvent) -> ag.AgendaEntry | None:
        if self.entry is not None and set(ag.correlation_keys(event)) & set(ag.entry_keys(self.entry)):
            return self.entry
        return None

    def _saved(self, decision: object) -> bool:
        if isinstance(decision, ag.Create):
            self.entry = decision.entry.with_id("1")
            return True
        if isinstance(decision, ag.Update) and (not decision.noop or decision.ranks):
            self.entry = decision.entry
        return isinstance(decision, ag.Update)

    def _retry(self) -> None:
        progress = True
        while progress:
            progress = False
            for message_id, event in list(self.held):
                if self._found(event) is None:
                    continue
                decision = ag.decide(event, self.entry, now=NOW, message_id=message_id, book=BOOK)
                if isinstance(decision, ag.Hold):
                    continue
                self.held.remove((message_id, event))
                self.outcomes[message_id] = decision
                self._saved(decision)
                progress = True
                break


def run(*events: ag.AgendaEvent) -> Agendas:
    agendas = Agendas()
    for number, event in enumerate(events, 1):
        agendas.receive(f"M{number}", event)
    return agendas


def request(action: str = "create", **fields: object) -> ag.AgendaEvent:
    return ag.AgendaEvent(kind="appointment-request", action=action, zd_number=ZD, placer_id=ZD,
                          fields={"patient.bsn": BSN, "care_product": {"code": "CARREG001"}, **fields})


def order(action: str = "create", **fields: object) -> ag.AgendaEvent:
    control = {"create": "NW", "update": "XO", "cancel": "CA"}[action]
    return ag.AgendaEvent(kind="diagnostic-order", action=action, zd_number=ZD, placer_id="ORD1",
                          fields={"patient.bsn": BSN, "order_control": control, **fields})


def scheduler(action: str, start: str = "2026-12-10T09:30:00+01:00", **fields: object) -> ag.AgendaEvent:
    return ag.AgendaEvent(kind="appointment", action=action, placer_id=ZD, filler_id="F778",
                          fields={"patient.bsn": BSN, "booked_start": start, **fields})


S12 = scheduler("book")
S13 = scheduler("reschedule", "2026-12-17T14:00:00+01:00")
S14 = scheduler("update", "2026-12-24T08:00:00+01:00", booked_location="B2")
S15 = scheduler("cancel")


# --- 1. the scheduler's change (S13, S14) before its booking (S12) waits for it -----------------

@pytest.mark.parametrize("change", [S13, S14], ids=["S13", "S14"])
@pytest.mark.parametrize("first", [request, order], ids=["request", "order"])
def test_a_schedulers_change_of_an_entry_not_yet_booked_waits_for_the_booking(first, change):
    """Was: Reject "cannot reschedule: entry is requested" (S13), and the S14 changed the
    request's data, then the older S12 wrote its slot over the S14's."""
    entry = run(first()).entry
    decision = ag.decide(change, entry, now=NOW, message_id="M2", book=BOOK)
    assert isinstance(decision, ag.Hold), decision
    assert decision.keys == ag.correlation_keys(change) and "booking" in decision.reason
    assert ZD not in decision.reason and BSN not in decision.reason


@pytest.mark.parametrize("change, state, start", [
    (S13, "rescheduled", "2026-12-17T14:00:00+01:00"),
    (S14, "modified", "2026-12-24T08:00:00+01:00"),
], ids=["S13", "S14"])
def test_a_change_before_its_booking_ends_as_in_the_natural_order(change, state, start):
    natural = run(request(), S12, change).entry
    late = run(request(), change, S12)
    assert not late.held
    assert all(isinstance(d, (ag.Create, ag.Update)) for d in late.outcomes.values()), late.outcomes
    assert late.entry.state == natural.state == state
    assert late.entry.data["booked_start"] == natural.data["booked_start"] == start
    assert dict(late.entry.data) == dict(natural.data)
    assert [(h.message_id, h.action) for h in late.entry.history] == [("M1", "create"), ("M3", "book"),
                                                                     ("M2", change.action)]


def test_a_reschedule_before_the_order_is_booked_is_replayed_when_the_request_comes_last():
    """ORM, S13 (waits), S12, then the SRM: the order's history (book, then reschedule) is
    replayed as a request's, so it ends rescheduled as in the natural order."""
    late = run(order(), S13, S12, request())
    natural = run(request(), order(), S12, S13)
    assert late.entry.kind == natural.entry.kind == "appointment-request"
    assert late.entry.state == natural.entry.state == "rescheduled"


def test_a_reschedule_that_arrives_first_of_all_waits_like_a_booking():
    """By ZD-number, as a booking does: the scheduler may answer before the referral got here.
    Was: Reject "cannot reschedule: no entry for this ZD-number"."""
    decision = ag.decide(S13, None, now=NOW, message_id="M1", book=BOOK)
    assert isinstance(decision, ag.Hold), decision
    for order_of_arrival in ([S13, request(), S12], [S13, S12, request()]):
        agendas = run(*order_of_arrival)
        assert agendas.entry.state == "rescheduled" and not agendas.held
        assert agendas.entry.data["booked_start"] == "2026-12-17T14:00:00+01:00"


def test_a_waiting_reschedule_whose_entry_is_cancelled_is_refused_with_a_reason():
    """Never lost silently: the cancel closed the entry before any booking came, so the
    S13 is refused as it would be after the cancel."""
    agendas = run(request(), S13, request("cancel"))
    assert agendas.entry.state == "cancelled" and not agendas.held
    refused = agendas.outcomes["M2"]
    assert isinstance(refused, ag.Reject) and refused.reason == "cannot reschedule: entry is cancelled"


def test_a_change_by_another_patient_is_refused_at_once_not_held():
    stranger = scheduler("reschedule", **{"patient.bsn": "900073962"})
    decision = ag.decide(stranger, run(request()).entry, now=NOW, message_id="M2", book=BOOK)
    assert isinstance(decision, ag.Reject) and decision.code == "patient-mismatch"


def test_release_applies_a_waiting_change_only_after_what_it_waits_for():
    """``release`` given held events in arrival order (S13 before S12) applies the S12 first
    and reports what still waits."""
    entry = run(request()).entry
    released = ag.release([("M2", S13), ("M3", S12)], entry, now=NOW, book=BOOK)
    assert [m for m, _ in released.results] == ["M3", "M2"]
    assert released.entry.state == "rescheduled" and released.waiting == ()
    still = ag.release([("M2", S13)], entry, now=NOW, book=BOOK)
    assert still.results == () and still.waiting == ("M2",) and still.entry == entry


def test_a_change_before_its_booking_through_the_processor(tmp_path):
    h = Harness(tmp_path)
    request_id = h.receive(srm())
    change = h.receive(siu("S13", start="20261217140000+0100"))
    assert h.outcome(change)[0] == "held"
    booking = h.receive(siu("S12"))
    entry = h.entry()
    assert entry.state == "rescheduled"
    assert json.loads(entry.data)["booked_start"] == "2026-12-17T14:00:00+01:00"
    assert [h.outcome(i)[0] for i in (request_id, change, booking)] == ["mapped"] * 3
    assert [x.action for x in h.store.agenda_history(entry.id)] == ["create", "book", "release"]
    assert not h.store.has_held_events()
    h.store.close()


# --- 2. a late create does not undo an update of its own kind -----------------------------------

def test_a_late_create_does_not_undo_an_update_of_its_kind():
    """SRM, ORM XO, then the late ORM NW: "among equals, the latest" let the NW's order_control
    (and its other values) replace the XO's; in the natural order the XO has the last word."""
    natural = run(request(), order(), order("update", cluster="Lab 2"))
    late = run(request(), order("update", cluster="Lab 2"), order(cluster="Lab 1"))
    assert natural.entry.data["order_control"] == "XO"
    assert late.entry.data["order_control"] == "XO"
    assert late.entry.data["cluster"] == "Lab 2"
    assert late.entry.state == "requested"


def test_a_late_create_still_fills_what_the_update_did_not_send():
    late = run(request(), order("update"), order(cluster="Lab 1"))
    assert late.entry.data["cluster"] == "Lab 1"


def test_among_creates_of_one_kind_the_latest_still_wins():
    """A re-sent request with a new value (ZorgDomein re-sends and supplements) still replaces
    the first one's: only an update of the kind outranks its create."""
    entry = run(request(urgency="REG"), request(urgency="SPOED")).entry
    assert entry.data["urgency"] == "SPOED"


def test_a_late_create_after_an_update_through_the_processor(tmp_path):
    from tests.test_processor import orm

    h = Harness(tmp_path)
    h.receive(srm())
    h.receive(orm().replace(b"ORC|NW|", b"ORC|XO|").replace(b"|1234567|", b"|1234568|"))
    late = h.receive(orm())
    assert h.outcome(late)[0] == "mapped"
    assert json.loads(h.entry().data)["order_control"] == "XO"
    h.store.close()


# --- 3. a second cancel keeps what it says that the entry lacks ---------------------------------

def test_two_cancels_end_the_same_whichever_comes_first():
    """The order's CA (order_control, a reason) and the request's S04 (a remark): the second
    cancel kept only the values it repeated, so what it alone said was lost in one order."""
    ca = order("cancel", cancel_reason="dubbel")
    s04 = request("cancel", remark="patient belt af")
    ca_first = run(request(), order(), ca, s04)
    s04_first = run(request(), order(), s04, ca)
    for agendas in (ca_first, s04_first):
        assert agendas.entry.state == "cancelled"
        assert agendas.entry.data["remark"] == "patient belt af"
        assert agendas.entry.data["cancel_reason"] == "dubbel"
    assert dict(ca_first.entry.data) == dict(s04_first.entry.data)


def test_a_second_cancel_that_adds_a_value_is_a_recorded_change_one_that_only_repeats_is_not():
    first = run(request(), request("cancel"))
    adds = ag.decide(S15, first.entry, now=NOW, message_id="M9", book=BOOK)
    assert isinstance(adds, ag.Update) and not adds.noop and adds.changed == ("booked_start",)
    assert adds.entry.state == "cancelled" and adds.entry.history[-1].action == "cancel"
    assert adds.entry.history[-1].from_state == adds.entry.history[-1].to_state == "cancelled"
    repeat = ag.decide(request("cancel"), first.entry, now=NOW, message_id="M10", book=BOOK)
    assert isinstance(repeat, ag.Update) and repeat.noop


def test_a_second_cancel_erases_nothing_and_replaces_no_value_another_kind_sent():
    """What the second cancel does not send is kept; a value another kind sent (the order's
    cluster) it sends differently is ignored (README: left as it is)."""
    entry = run(request(urgency="SPOED"), order(cluster="Lab 1"), order("cancel", cancel_reason="dubbel")).entry
    decision = ag.decide(request("cancel", cluster="Lab 9"), entry, now=NOW, message_id="M9", book=BOOK)
    assert isinstance(decision, ag.Update) and decision.noop
    assert {k: v for k, v in decision.entry.data.items() if k != ag.SOURCES} == {
        k: v for k, v in entry.data.items() if k != ag.SOURCES}


@pytest.mark.parametrize("last", ["ORM-CA", "SRM-S04"])
def test_the_orders_cancel_reaches_the_ris_whichever_cancel_comes_second(tmp_path, last):
    """SRM, ORM NW, then both cancels: when the request's S04 came first, the order's CA was a
    no-op (it only repeated what it did not change), so its order_control stayed NW and the
    RIS never got the CA."""
    from tests.test_processor import orm

    h = Harness(tmp_path)
    h.receive(srm())
    h.receive(orm())
    ca = orm().replace(b"ORC|NW|", b"ORC|CA|").replace(b"|1234567|", b"|1234569|")
    cancels = {"ORM-CA": lambda: h.receive(ca), "SRM-S04": lambda: h.receive(srm("S04"))}
    ids = {name: make() for name, make in sorted(cancels.items(), key=lambda item: item[0] == last)}
    entry = h.entry()
    assert entry.state == "cancelled" and json.loads(entry.data)["order_control"] == "CA"
    assert [h.outcome(i)[0] for i in ids.values()] == ["mapped", "mapped"]
    assert h.sent("ORM^O01").count(ids["ORM-CA"]) == 1
    h.store.close()


# --- 4. a ZorgDomein number is upper case, everywhere -------------------------------------------

def test_a_lower_case_zd_shaped_placer_id_is_not_taken_for_a_zd_number():
    """SCH-1 `zd123456789` was upper-cased into the ZD-number and matched the referral, while
    the same text in ARQ-1, ORC-4 or MSH-10 is a mapping error. Now neither path takes it."""
    lower = ag.AgendaEvent(kind="appointment", action="book", placer_id=ZD.lower(), filler_id="F778", fields={})
    assert ag.correlation_keys(lower) == (f"placer:{ZD.lower()}", "filler:F778")
    upper = ag.AgendaEvent(kind="appointment", action="book", placer_id=ZD, filler_id="F778", fields={})
    assert ag.correlation_keys(upper) == (f"zd:{ZD}", "filler:F778")


def test_a_lower_case_zd_number_is_refused_in_a_request_and_in_a_booking(tmp_path):
    h = Harness(tmp_path)
    bad_request = h.receive(srm().replace(SAMPLE_ZD.encode(), SAMPLE_ZD.lower().encode()))
    outcome, detail = h.outcome(bad_request)
    assert outcome == "error" and "ARQ-1" in detail and "ZD or ZP" in detail
    h.receive(srm())  # the upper-case ZD-number: accepted
    bad_booking = h.receive(siu("S12").replace(f"SCH|{SAMPLE_ZD}|".encode(), f"SCH|{SAMPLE_ZD.lower()}|".encode()))
    assert h.outcome(bad_booking) == ("error", "cannot book: no entry for this placer id")
    assert h.entry().state == "requested"
    good_booking = h.receive(siu("S12"))
    assert h.outcome(good_booking)[0] == "mapped" and h.entry().state == "booked"
    h.store.close()
