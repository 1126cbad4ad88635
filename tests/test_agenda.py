"""engine.core.agenda: selection, the state table, correlation in any arrival order."""

from __future__ import annotations

import base64
import hashlib
import itertools
from datetime import datetime, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.agenda import (
    AGENDA,
    SOURCES,
    ACTIONS,
    CLOSED_STATES,
    FAMILY,
    KINDS,
    TRANSITIONS,
    Agenda,
    AgendaBook,
    AgendaEntry,
    AgendaEvent,
    Create,
    Hold,
    IllegalMove,
    Reject,
    SelectRule,
    Update,
    correlation_keys,
    decide,
    entry_keys,
    release,
    states_of,
    transition,
)

NOW = datetime(2024, 3, 4, 10, 0, tzinfo=timezone.utc)
ZD = "ZD123456789"  # synthetic
BSN = "999999990"  # synthetic, passes the 11-proof
PDF = b"%PDF-1.4 synthetic referral letter\n%%EOF"
PDF_SHA = hashlib.sha256(PDF).hexdigest()

BOOK = AgendaBook(
    agendas=(
        Agenda(
            id="cardiology",
            name="Polikliniek Cardiologie",
            department="CAR",
            location_agb="01999901",
            rules=(SelectRule(specialism=frozenset({"CAR"})), SelectRule(care_product=frozenset({"CARREG*"}))),
        ),
        Agenda(
            id="laboratory",
            name="Laboratorium",
            location_agb="01999904",
            rules=(SelectRule(cluster=frozenset({"Laboratorium"})), SelectRule(care_product=frozenset({"LAB*"}))),
        ),
        Agenda(id="fallback", name="Onbekend", fallback=True),
    )
)


class FakeStore:
    """What the store does around decide/release: find, assign ids, hold and replay."""

    def __init__(self) -> None:
        self.entries: dict[str, AgendaEntry] = {}
        self.held: list[tuple[str, AgendaEvent]] = []
        self.blobs: dict[str, bytes] = {}
        self.decisions: list[object] = []

    def find(self, event: AgendaEvent) -> AgendaEntry | None:
        for key in correlation_keys(event):
            for entry in self.entries.values():
                if key in entry_keys(entry):
                    return entry
        return None

    def receive(self, message_id: str, event: AgendaEvent) -> object:
        decision = decide(event, self.find(event), now=NOW, message_id=message_id, book=BOOK)
        self.decisions.append(decision)
        if isinstance(decision, Create):
            entry = decision.entry.with_id(f"E{len(self.entries) + 1}")
            self._save(entry, decision.attachments)
        elif isinstance(decision, Update) and (not decision.noop or decision.ranks):
            self._save(decision.entry, decision.attachments)
        elif isinstance(decision, Hold):
            self.held.append((message_id, event))
        return decision

    def _save(self, entry: AgendaEntry, attachments) -> None:
        for attachment in attachments:
            self.blobs.setdefault(attachment.sha256, attachment.payload)
        self.entries[entry.id] = entry
        while True:  # held events whose keys this entry now answers to, in arrival order
            keys = set(entry_keys(entry))
            ready = [(m, e) for m, e in self.held if keys & set(correlation_keys(e))]
            result = release(ready, entry, now=NOW, book=BOOK)
            if not result.results:  # none, or all still wait (an S13 for the S12 it changes)
                return
            applied = {m for m, _ in result.results}
            self.held = [(m, e) for m, e in self.held if m not in applied]
            for attachment in result.attachments:
                self.blobs.setdefault(attachment.sha256, attachment.payload)
            entry = result.entry
            self.entries[entry.id] = entry


def srm(action: str = "create", **fields: object) -> AgendaEvent:
    base = {"patient.bsn": BSN, "care_product": {"code": "CARREG001", "text": "consult"}, "specialism": "CAR",
            "requested_start": "2024-03-10"}  # fmt: skip
    return AgendaEvent(kind="appointment-request", action=action, zd_number=ZD, placer_id=ZD,
                       fields={**base, **fields})  # fmt: skip


def oru(data: bytes = PDF) -> AgendaEvent:
    item = {"data": base64.b64encode(data).decode(), "encoding": "Base64", "media_type": "PDF", "filename": "brief.pdf"}
    return AgendaEvent(kind="referral", action="attach", zd_number=ZD, fields={"attachments": [item]})


def orm(action: str = "create") -> AgendaEvent:
    fields = {"patient.bsn": BSN, "care_product": {"code": "LABEDG001"}, "cluster": "Laboratorium"}
    return AgendaEvent(kind="diagnostic-order", action=action, zd_number=ZD, placer_id="ORD000123", fields=fields)


def siu(action: str = "book", **fields: object) -> AgendaEvent:
    base = {"booked_start": "2024-03-12T09:30"}
    return AgendaEvent(kind="appointment", action=action, placer_id=ZD, filler_id="F778", fields={**base, **fields})


def run(*events: AgendaEvent) -> FakeStore:
    store = FakeStore()
    for number, event in enumerate(events, 1):
        store.receive(f"M{number}", event)
    return store


def only_entry(store: FakeStore) -> AgendaEntry:
    assert len(store.entries) == 1
    return next(iter(store.entries.values()))


# --- arrival order ----------------------------------------------------------------------

MESSAGES = {"SRM": srm, "ORU": oru, "ORM": orm, "SIU": siu}


@pytest.mark.parametrize("order", list(itertools.permutations(MESSAGES)), ids="-".join)
def test_every_arrival_order_of_one_referral_ends_in_the_same_entry(order):
    store = run(*(MESSAGES[name]() for name in order))
    entry = only_entry(store)
    assert not store.held
    assert not [d for d in store.decisions if isinstance(d, Reject)]
    assert entry.kind == "appointment-request"
    assert entry.state == "booked"
    assert entry.agenda_id == "cardiology"
    assert set(entry.attachments) == {PDF_SHA}
    assert store.blobs == {PDF_SHA: PDF}
    assert (entry.zd_number, entry.placer_id, entry.filler_id) == (ZD, "ORD000123", "F778")
    data = dict(entry.data)
    sources = data.pop(SOURCES)
    assert data.pop(AGENDA) == "cardiology"  # the request's choice, over the order's laboratory
    assert data == {
        "patient.bsn": BSN,
        "care_product": {"code": "CARREG001", "text": "consult"},
        "specialism": "CAR",
        "requested_start": "2024-03-10",
        "cluster": "Laboratorium",
        "booked_start": "2024-03-12T09:30",
    }
    # who set each field: the greatest kind that sent it (0 the request, 2 the scheduler, 3 the
    # order; a booking, like any message of a kind but its create, half a step above: 1.5)
    assert sources == {"patient.bsn": 0, "care_product": 0, "specialism": 0, "requested_start": 0,
                       "cluster": 3, "booked_start": 1.5, AGENDA: 0}
    assert all(entry.state in states_of(entry.kind) for entry in store.entries.values())


@pytest.mark.parametrize("order", list(itertools.permutations([*MESSAGES, "S13"])), ids="-".join)
def test_every_arrival_order_with_a_reschedule_ends_rescheduled_at_its_slot(order):
    """The scheduler's S13 waits for the S12 it changes (before it was refused: "entry is
    requested", or "no entry for this ZD-number"), so all 120 orders end alike."""
    reschedule = siu(action="reschedule", booked_start="2024-03-19T11:00")
    store = run(*(reschedule if name == "S13" else MESSAGES[name]() for name in order))
    entry = only_entry(store)
    assert not store.held
    assert not [d for d in store.decisions if isinstance(d, Reject)]
    assert (entry.kind, entry.state, entry.agenda_id) == ("appointment-request", "rescheduled", "cardiology")
    assert entry.data["booked_start"] == "2024-03-19T11:00"
    assert [h.action for h in entry.history if h.kind == "appointment"] == ["book", "reschedule"]


def test_a_letter_before_its_request_is_held_and_applied_when_the_request_comes():
    store = FakeStore()
    held = store.receive("M1", oru())
    assert isinstance(held, Hold) and held.key == f"zd:{ZD}" and "ZD-number" in held.reason
    assert not store.entries
    store.receive("M2", srm())
    entry = only_entry(store)
    assert entry.attachments == (PDF_SHA,)
    assert [(h.message_id, h.action, h.from_state, h.to_state) for h in entry.history] == [
        ("M2", "create", None, "requested"),
        ("M1", "attach", "requested", "requested"),
    ]
    assert entry.history[1].changed == ("attachments",)


def test_held_events_are_released_in_arrival_order():
    store = FakeStore()
    store.receive("M1", oru(b"first letter"))
    store.receive("M2", siu())
    store.receive("M3", oru(b"second letter"))
    store.receive("M4", srm())
    entry = only_entry(store)
    assert [h.message_id for h in entry.history] == ["M4", "M1", "M2", "M3"]
    letters = (b"first letter", b"second letter")
    assert entry.attachments == tuple(hashlib.sha256(letter).hexdigest() for letter in letters)
    assert entry.state == "booked"


def test_history_records_changed_field_names_never_values():
    entry = only_entry(run(srm(), srm(action="update", urgency="SPOED")))
    assert entry.history[-1].changed == ("urgency",)
    assert BSN not in repr(entry.history)


# --- cancellations ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cancel, first",
    [
        (srm(action="cancel"), srm()),  # SRM^S04
        (siu(action="cancel"), srm()),  # SIU^S15 (by placer = ZD-number / filler id)
        (orm(action="cancel"), orm()),  # ORC-1 = CA
        (AgendaEvent(kind="referral", action="cancel", zd_number=ZD, fields={}),  # REF^I14
         AgendaEvent(kind="referral", action="create", zd_number=ZD, fields={"prd_specialty": "CAR"})),
    ],
    ids=["SRM^S04", "SIU^S15", "ORC-1=CA", "REF^I14"],
)
def test_cancellations_close_the_entry(cancel, first):
    events = [first, siu()] if cancel.kind == "appointment" else [first]
    entry = only_entry(run(*events, cancel))
    assert entry.state == "cancelled"
    assert entry.history[-1].action == "cancel"


def test_a_second_cancel_is_a_no_op():
    store = run(srm(), siu(), srm(action="cancel"))
    before = only_entry(store)
    decision = store.receive("M9", siu(action="cancel"))
    assert isinstance(decision, Update) and decision.noop
    assert only_entry(store) == before


@pytest.mark.parametrize("booked_first", [False, True], ids=["redirect-then-book", "book-then-redirect"])
def test_an_update_that_selects_another_agenda_moves_the_entry_in_either_order(booked_first):
    """REF^I13 to another specialty (here: a request redirected to the lab): the entry goes to
    the agenda its new data selects, booked or not, so both arrival orders end the same."""
    redirect = srm("update", specialism="LAB", care_product={"code": "LAB001"}, cluster="Laboratorium")
    entry = only_entry(run(srm(), siu(), redirect) if booked_first else run(srm(), redirect, siu()))
    assert (entry.agenda_id, entry.state) == ("laboratory", "booked")
    (moved,) = [item for item in entry.history if "agenda_id" in item.changed]
    assert moved.action == "update"


def test_an_update_that_selects_no_agenda_keeps_the_entrys():
    entry = only_entry(run(srm(), srm("update", specialism="XYZ", care_product={"code": "XYZ1"})))
    assert entry.agenda_id == "cardiology"
    assert entry.data["care_product"]["code"] == "XYZ1"  # its data changed, its agenda did not


def test_an_order_is_scheduled_then_completed():
    entry = only_entry(run(orm(), AgendaEvent(kind="diagnostic-order", action="book", zd_number=ZD, fields={}),
                           AgendaEvent(kind="diagnostic-order", action="complete", zd_number=ZD, fields={})))
    assert [h.to_state for h in entry.history] == ["ordered", "scheduled", "completed"]
    assert entry.agenda_id == "laboratory"


def test_reschedule_and_modify_move_a_booked_appointment():
    entry = only_entry(run(srm(), siu(), siu(action="reschedule", booked_start="2024-03-14T08:00"),
                           siu(action="update", room="2")))
    assert [h.to_state for h in entry.history] == ["requested", "booked", "rescheduled", "modified"]


@pytest.mark.parametrize("update", [lambda: srm(action="update", urgency="SPOED"), lambda: orm(action="update")],
                         ids=["referral-side", "order-side"])
def test_an_update_not_from_the_scheduler_changes_data_not_the_booked_state(update):
    """`modified` is the scheduler's SIU^S14; a REF^I13 / ORC-1 XO only changes data, so it
    ends the same before or after the booking (after it, it moved `booked` to `modified`)."""
    before = only_entry(run(srm(), orm(), update(), siu()))
    after = only_entry(run(srm(), orm(), siu(), update()))
    assert before.state == after.state == "booked"
    assert dict(before.data) == dict(after.data)


@pytest.mark.parametrize("change, state", [("reschedule", "rescheduled"), ("update", "modified"),
                                           ("cancel", "cancelled")])
def test_an_order_booked_and_changed_before_its_request_ends_as_in_the_natural_order(change, state):
    """The order family has no rescheduled or modified state: the request's create replays the
    order's changes (recorded with their event kinds) in the appointment family."""
    natural = only_entry(run(srm(), orm(), siu(), siu(action=change)))
    late = only_entry(run(orm(), siu(), siu(action=change), srm()))
    assert natural.state == late.state == state
    assert (late.kind, late.agenda_id) == (natural.kind, natural.agenda_id)


def test_an_order_update_keeps_the_requests_care_product_whichever_came_first():
    """Each field keeps the value of the greatest kind that sent it: an order's XO (a lesser
    kind) fills in what the request lacks but does not replace its care product, before or
    after the request; the order's own fields still follow the order's messages."""
    xo = AgendaEvent(kind="diagnostic-order", action="update", zd_number=ZD, placer_id="ORD000123",
                     fields={"care_product": {"code": "LABEDG002"}, "cluster": "Laboratorium 2"})
    natural = only_entry(run(srm(), orm(), xo))
    late = only_entry(run(orm(), xo, srm()))
    assert natural.data["care_product"] == late.data["care_product"] == {"code": "CARREG001", "text": "consult"}
    assert natural.data["cluster"] == late.data["cluster"] == "Laboratorium 2"  # the order's own field
    assert dict(natural.data) == dict(late.data)


def test_a_greater_kind_repeating_a_value_keeps_it_against_a_lesser_kinds_later_change():
    """A referral update (REF^I13) that repeats the order's care product changes no value, but
    from then on the referral, not the order, has said it: the order's XO must not replace it
    afterwards, as it cannot when it comes before the referral update."""
    repeat = AgendaEvent(kind="referral", action="update", zd_number=ZD, fields={"care_product": {"code": "LABEDG001"}})
    xo = AgendaEvent(kind="diagnostic-order", action="update", zd_number=ZD, placer_id="ORD000123",
                     fields={"care_product": {"code": "LABEDG002"}})
    store = run(orm(), repeat, xo)
    assert isinstance(store.decisions[1], Update) and store.decisions[1].noop and store.decisions[1].ranks
    assert len(only_entry(store).history) == 1  # nothing a person would call a change: no history item
    late = only_entry(run(orm(), xo, repeat))
    assert only_entry(store).data["care_product"] == late.data["care_product"] == {"code": "LABEDG001"}
    again = run(orm(), repeat, repeat)  # a re-delivery of the repeat raises nothing more
    assert not again.decisions[2].ranks


def test_a_mapping_default_never_replaces_a_sent_value_whichever_came_first():
    """Sex U is the mappings' default when PID-8 is empty: a request without PID-8 must not
    block the order's real F, and a booking without PID-8 must not replace it."""
    no_sex = srm(**{"patient.sex": "U"})
    no_sex = AgendaEvent(kind=no_sex.kind, action=no_sex.action, zd_number=ZD, placer_id=ZD,
                         fields=no_sex.fields, defaulted=frozenset({"patient.sex"}))
    with_sex = AgendaEvent(kind="diagnostic-order", action="create", zd_number=ZD, placer_id="ORD000123",
                           fields={**orm().fields, "patient.sex": "F"})
    booking = siu(**{"patient.sex": "U"})
    booking = AgendaEvent(kind="appointment", action="book", placer_id=ZD, filler_id="F778",
                          fields=booking.fields, defaulted=frozenset({"patient.sex"}))
    for events in ([no_sex, with_sex, booking], [with_sex, no_sex, booking], [with_sex, booking, no_sex]):
        assert only_entry(run(*events)).data["patient.sex"] == "F", [e.kind for e in events]
    alone = only_entry(run(no_sex))  # a default still fills a gap, and a sent value replaces it later
    assert alone.data["patient.sex"] == "U"
    sent_later = srm(action="update", **{"patient.sex": "M"})
    assert only_entry(run(no_sex, sent_later)).data["patient.sex"] == "M"


# --- rejections ---------------------------------------------------------------------------


@pytest.mark.parametrize("action", ["update", "cancel", "complete", "reschedule"])
def test_a_change_to_an_unknown_entry_is_rejected_with_the_key_kind(action):
    decision = decide(srm(action=action), None, now=NOW, message_id="M1", book=BOOK)
    assert isinstance(decision, Reject) and decision.code == "unknown-entry"
    assert decision.reason == f"cannot {action}: no entry for this ZD-number"
    assert ZD not in decision.reason and BSN not in decision.reason


def test_a_change_to_an_unknown_filler_id_names_the_filler_id():
    event = AgendaEvent(kind="appointment", action="reschedule", filler_id="F1", fields={})
    decision = decide(event, None, now=NOW, message_id="M1", book=BOOK)
    assert isinstance(decision, Reject) and decision.reason == "cannot reschedule: no entry for this filler id"


def test_a_booking_without_a_referral_key_is_rejected_not_held():
    event = AgendaEvent(kind="appointment", action="book", placer_id="HIS-42", fields={})
    decision = decide(event, None, now=NOW, message_id="M1", book=BOOK)
    assert isinstance(decision, Reject) and decision.reason == "cannot book: no entry for this placer id"


def test_an_event_without_any_key_is_rejected():
    event = AgendaEvent(kind="referral", action="create", fields={})
    decision = decide(event, None, now=NOW, message_id="M1", book=BOOK)
    assert isinstance(decision, Reject) and decision.code == "no-key"


@pytest.mark.parametrize("closing, state", [("cancel", "cancelled"), ("complete", "completed")])
@pytest.mark.parametrize("action", ["update", "reschedule", "book", "create"])
def test_a_change_to_a_closed_entry_is_rejected(closing, state, action):
    store = run(srm(), siu(), siu(action=closing))
    decision = store.receive("M9", siu(action=action, booked_start="2024-04-01T10:00"))
    assert isinstance(decision, Reject) and decision.code == "closed-entry"
    assert decision.reason == f"cannot {action}: entry is {state}"
    assert only_entry(store).state == state


def test_a_letter_for_a_cancelled_entry_is_still_kept():
    store = run(srm(), srm(action="cancel"), oru())
    entry = only_entry(store)
    assert entry.state == "cancelled" and entry.attachments == (PDF_SHA,)


def test_an_illegal_move_is_rejected_by_decide_and_raised_by_transition():
    store = run(srm())
    decision = store.receive("M2", srm(action="complete"))
    assert isinstance(decision, Reject) and decision.code == "illegal-move"
    assert decision.reason == "cannot complete: entry is requested"
    with pytest.raises(IllegalMove, match="appointment entry in state 'requested' cannot take action 'complete'"):
        transition("appointment-request", "requested", "complete")


# --- idempotency --------------------------------------------------------------------------


def test_a_duplicate_attachment_is_stored_once_and_changes_nothing():
    store = run(srm(), oru())
    before = only_entry(store)
    decision = store.receive("M3", oru())
    assert isinstance(decision, Update) and decision.noop and not decision.attachments
    assert only_entry(store) == before
    assert before.attachments == (PDF_SHA,)


def test_the_same_attachment_twice_in_one_event_is_kept_once():
    item = {"data": base64.b64encode(PDF).decode(), "encoding": "Base64"}
    event = AgendaEvent(kind="referral", action="attach", zd_number=ZD, fields={"attachments": [item, dict(item)]})
    store = run(srm(), event)
    assert only_entry(store).attachments == (PDF_SHA,)


def test_a_re_sent_request_merges_into_the_open_entry():
    store = run(srm())
    decision = store.receive("M2", srm())
    assert isinstance(decision, Update) and decision.noop
    decision = store.receive("M3", srm(care_question="CARHAR"))  # nazending with more
    assert isinstance(decision, Update) and decision.changed == ("care_question",)
    assert only_entry(store).state == "requested"


def test_a_re_delivered_booking_is_a_no_op_but_a_different_one_is_rejected():
    store = run(srm(), siu())
    assert store.receive("M3", siu()).noop
    decision = store.receive("M4", siu(booked_start="2024-05-01T08:00"))
    assert isinstance(decision, Reject) and decision.reason == "cannot book: entry is booked"


# --- selection ----------------------------------------------------------------------------


def test_selection_takes_the_first_matching_agenda_in_file_order():
    both = AgendaEvent(kind="referral", action="create", zd_number=ZD,
                       fields={"specialism": "CAR", "cluster": "laboratorium"})  # fmt: skip
    assert BOOK.select(both) == (BOOK.agenda("cardiology"), False)
    lab = AgendaEvent(kind="diagnostic-order", action="create", zd_number=ZD, fields={"cluster": "LABORATORIUM"})
    assert BOOK.select(lab) == (BOOK.agenda("laboratory"), False)


def test_care_product_patterns_match_code_objects_and_prefixes():
    class Code:
        code = "CARREG007"

    event = AgendaEvent(kind="appointment-request", action="create", zd_number=ZD, fields={"care_product": Code()})
    assert BOOK.select(event)[0].id == "cardiology"


def test_what_no_rule_selects_lands_in_the_fallback_agenda_flagged():
    event = AgendaEvent(kind="referral", action="create", zd_number=ZD, fields={"specialism": "DER"})
    assert BOOK.select(event) == (BOOK.fallback, True)
    decision = decide(event, None, now=NOW, message_id="M1", book=BOOK)
    assert isinstance(decision, Create) and decision.fallback and decision.entry.agenda_id == "fallback"
    assert decision.entry.id is None


def test_a_rule_needs_all_its_criteria():
    rule = SelectRule(specialism=frozenset({"CAR"}), kind=frozenset({"diagnostic-order"}))
    assert not rule.matches(srm())
    order = AgendaEvent(kind="diagnostic-order", action="create", zd_number=ZD, fields={"specialism": "CAR"})
    assert rule.matches(order)


def test_a_book_needs_exactly_one_fallback_and_unique_ids():
    with pytest.raises(ValueError, match="exactly one agenda must be the fallback"):
        AgendaBook(agendas=(Agenda(id="a", name="A", rules=(SelectRule(kind=frozenset({"referral"})),)),))
    with pytest.raises(ValueError, match="unique"):
        AgendaBook(agendas=(Agenda(id="a", name="A", fallback=True), Agenda(id="a", name="B", fallback=True)))


# --- values -------------------------------------------------------------------------------


def test_events_and_entries_are_frozen():
    event = srm()
    with pytest.raises(AttributeError):
        event.action = "cancel"  # type: ignore[misc]
    with pytest.raises(TypeError):
        event.fields["x"] = 1  # type: ignore[index]
    with pytest.raises(ValueError, match="AgendaEvent.action"):
        AgendaEvent(kind="referral", action="delete", fields={})


def test_the_state_table_covers_every_kind_and_closed_states_take_only_letters():
    for kind in KINDS:
        assert set(states_of(kind)) >= CLOSED_STATES
        for state in CLOSED_STATES:
            assert set(TRANSITIONS[FAMILY[kind]][state]) == {"attach"}
        for row in TRANSITIONS[FAMILY[kind]].values():
            assert set(row) <= set(ACTIONS)
            assert all(target is None or target in states_of(kind) for target in row.values())


# --- property -----------------------------------------------------------------------------

_keys = st.sampled_from([None, ZD, "ZP0000001", "ORD1", "F778"])
_fields = st.dictionaries(
    st.sampled_from(["patient.bsn", "specialism", "cluster", "care_product", "booked_start", "attachments"]),
    st.one_of(st.none(), st.text(max_size=5), st.lists(st.text(max_size=3), max_size=2),
              st.lists(st.fixed_dictionaries({"data": st.text(max_size=8),
                                              "encoding": st.sampled_from(["Base64", "A"])}), max_size=2)),
    max_size=4,
)
_events = st.builds(
    AgendaEvent,
    kind=st.sampled_from(KINDS),
    action=st.sampled_from(ACTIONS),
    zd_number=_keys,
    placer_id=_keys,
    filler_id=_keys,
    fields=_fields,
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_events, max_size=12))
def test_random_event_sequences_never_raise_and_keep_valid_states(events):
    store = run(*events)
    for entry in store.entries.values():
        assert entry.state in states_of(entry.kind)
        assert len(set(entry.attachments)) == len(entry.attachments)
        for item in entry.history:
            assert item.to_state in states_of(entry.kind) or item.to_state in {
                s for k in KINDS for s in states_of(k)
            }
        for earlier, later in zip(entry.history, entry.history[1:]):
            assert later.from_state == earlier.to_state
    for decision in store.decisions:
        assert isinstance(decision, (Create, Update, Hold, Reject))


# Select rules: the precomputed criteria agree with the plain reading ------------------------

_PATTERN = st.text(alphabet="aAbBİı*", min_size=1, max_size=4)
_CODE_VALUE = st.one_of(
    st.none(),
    st.text(alphabet="aAbBİı* ", max_size=4),
    st.lists(st.text(alphabet="aAbBİı", max_size=3), max_size=3),
    st.fixed_dictionaries({"code": st.text(alphabet="aAbB", max_size=3)}),
)


def _plain_rule_matches(rule, event) -> bool:
    from engine.core.agenda import SELECT_FIELDS, _FOLDED, _codes, _matches

    for name, field_name in SELECT_FIELDS.items():
        patterns = getattr(rule, name)
        if patterns is None:
            continue
        values = [event.kind] if field_name is None else _codes(event.fields.get(field_name))
        if not any(_matches(p, v, fold=name in _FOLDED) for p in patterns for v in values):
            return False
    return True


@given(
    criteria=st.dictionaries(
        st.sampled_from(["specialism", "care_product", "cluster", "location_agb"]),
        st.frozensets(_PATTERN, min_size=1, max_size=3),
        min_size=1,
    ),
    fields=st.dictionaries(st.sampled_from(["specialism", "care_product", "cluster", "location_agb"]), _CODE_VALUE),
)
@settings(max_examples=300)
def test_select_rules_match_as_the_plain_reading(criteria, fields):
    from engine.core.agenda import SelectRule

    rule = SelectRule(**criteria)
    event = AgendaEvent(kind="referral", action="create", zd_number="ZD1", fields=fields)
    assert rule.matches(event) == _plain_rule_matches(rule, event)


@pytest.mark.parametrize("request_first", [True, False], ids=["request-first", "order-first"])
def test_an_entry_in_the_fallback_agenda_takes_the_first_real_choice_in_either_order(request_first):
    """A request that selects no agenda (only the fallback) makes no choice: the order's
    laboratory stands, whether the order came before or after it."""
    unplaced = srm(specialism="XYZ", care_product={"code": "XYZ1"})
    entry = only_entry(run(unplaced, orm()) if request_first else run(orm(), unplaced))
    assert entry.agenda_id == "laboratory"


_FIELD_VALUES = st.one_of(st.none(), st.just(""), st.text(max_size=3), st.lists(st.text(max_size=2), max_size=2),
                          st.tuples(st.text(max_size=2)), st.integers())


@given(fields=st.dictionaries(st.sampled_from(["a", "b.c", "attachments", SOURCES, AGENDA, "d"]), _FIELD_VALUES),
       rank=st.integers(0, 3), action=st.sampled_from(["create", "update", "book", "cancel"]),
       defaulted=st.frozensets(st.sampled_from(["a", "d"])))
def test_a_merge_into_a_new_entry_is_the_general_merge(fields, rank, action, defaulted):
    """_merge's short way for an entry with no data gives what its general loop gives."""
    from engine.core.agenda import _merge

    short = _merge({}, fields, rank=rank, action=action, defaulted=defaulted)
    general = _merge({SOURCES: {}}, fields, rank=rank, action=action, defaulted=defaulted)
    if SOURCES not in short[0]:  # (nothing set: the general loop kept the empty sources it was given)
        assert general == ({SOURCES: {}}, [])
    else:
        assert short == general
