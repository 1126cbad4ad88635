"""Session review of the agenda changes (DayTime, Amsterdam times, mapping defaults, quiet
saves of raised field ranks). Each test failed before its fix. Synthetic patients only."""

from __future__ import annotations

import datetime as dt

from engine.core import agenda as ag

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.timezone.utc)
ZD = "ZD123456789"  # synthetic
BSN = "999911120"  # synthetic, passes the 11-proof
BOOK = ag.AgendaBook(agendas=(ag.Agenda(id="fallback", name="Onbekend", fallback=True),))


def _run(*events: ag.AgendaEvent) -> ag.AgendaEntry:
    """Apply events in arrival order to the one entry they make, saving what the processor saves
    (changes, and the quiet save of a no-op that raises field ranks)."""
    entry = None
    for number, event in enumerate(events, 1):
        decision = ag.decide(event, entry, now=NOW, message_id=f"M{number}", book=BOOK)
        assert isinstance(decision, (ag.Create, ag.Update)), decision
        if isinstance(decision, ag.Create):
            entry = decision.entry.with_id("1")
        elif not decision.noop or decision.ranks:
            entry = decision.entry
    return entry


def test_a_repeated_cancel_of_a_greater_kind_still_becomes_the_source_of_the_values_it_repeats():
    """ZorgDomein cancels the request (SRM^S04) and the order (ORC-1 CA) of one referral. Each
    repeats the patient's city. When the S04 comes first it cancels the entry and, the request
    being the greatest kind, becomes the city's source: a later letter (a referral, a lesser kind)
    cannot replace it. When it comes second it was a no-op that took no rank, so the same letter
    replaced the city: the entry ended differently depending on the order of the two cancels."""
    fields = {"patient.bsn": BSN, "patient.city": "Utrecht"}
    order = ag.AgendaEvent(kind="diagnostic-order", action="create", zd_number=ZD, placer_id="ORD1", fields=fields)
    order_cancel = ag.AgendaEvent(kind="diagnostic-order", action="cancel", zd_number=ZD, placer_id="ORD1",
                                  fields=fields)
    request_cancel = ag.AgendaEvent(kind="appointment-request", action="cancel", zd_number=ZD, placer_id=ZD,
                                    fields=fields)
    letter = ag.AgendaEvent(kind="referral", action="attach", zd_number=ZD,
                            fields={"patient.bsn": BSN, "patient.city": "Amsterdam"})

    request_first = _run(order, request_cancel, order_cancel, letter)
    order_first = _run(order, order_cancel, request_cancel, letter)
    assert request_first.state == order_first.state == "cancelled"
    assert request_first.data["patient.city"] == "Utrecht"
    assert order_first.data["patient.city"] == request_first.data["patient.city"]
    assert order_first.data[ag.SOURCES] == request_first.data[ag.SOURCES]


def test_a_repeated_cancel_raising_ranks_is_a_quiet_no_op_that_changes_no_value():
    """The repeated cancel stays a no-op (nothing in the history, nothing sent): only which kind
    set the values it repeats is kept; a value it sends differently is still ignored."""
    order = ag.AgendaEvent(kind="diagnostic-order", action="create", zd_number=ZD, placer_id="ORD1",
                           fields={"patient.bsn": BSN, "patient.city": "Utrecht", "patient.street": "Dorpsstraat"})
    order_cancel = ag.AgendaEvent(kind="diagnostic-order", action="cancel", zd_number=ZD, placer_id="ORD1",
                                  fields={"patient.bsn": BSN})
    cancelled = _run(order, order_cancel)
    request_cancel = ag.AgendaEvent(kind="appointment-request", action="cancel", zd_number=ZD, placer_id=ZD,
                                    fields={"patient.bsn": BSN, "patient.city": "Utrecht",
                                            "patient.street": "Kerkstraat"})
    decision = ag.decide(request_cancel, cancelled, now=NOW, message_id="M9", book=BOOK)
    assert isinstance(decision, ag.Update) and decision.noop and decision.ranks
    assert decision.entry.history == cancelled.history and decision.entry.state == "cancelled"
    assert decision.entry.data["patient.street"] == "Dorpsstraat"  # a different value: still ignored
    assert decision.entry.data[ag.SOURCES]["patient.city"] == 0  # the request's rank
    assert decision.entry.data[ag.SOURCES]["patient.street"] == 3
    again = ag.decide(request_cancel, decision.entry, now=NOW, message_id="M10", book=BOOK)
    assert again.noop and not again.ranks  # a re-delivery raises nothing more
