"""The processor: stored messages mapped into agenda entries, in any arrival order,
with outbound messages queued and every outcome recorded on the message."""

import itertools
import json
from pathlib import Path

import pytest
from twisted.internet.testing import MemoryReactorClock

from engine.bundle import load_bundle
from engine.core.header import read_header
from engine.metrics import Metrics
from engine.shell.committer import GroupCommitter
from engine.shell.processor import Work
from engine.store import Append, open_store
from tests.conftest import load_sample
from tests.factories import processor_for, received

REPO = Path(__file__).resolve().parent.parent
ZD = "ZD200046119"  # the ZD-number of the ZorgDomein ORU samples


def srm(zd: str = ZD, trigger: str = "S01") -> bytes:
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    raw = raw.replace(b"ZD200046139", zd.encode())
    if trigger != "S01":
        raw = raw.replace(b"SRM^S01^SRM_S01", f"SRM^{trigger}^SRM_S01".encode())
        raw = raw.replace(b"g20ce6a9f8ca4f551275", b"g20ce6a9f8ca4f55127" + trigger[-1:].encode())
    return raw


def oru() -> bytes:
    return load_sample("zorgdomein/zd_oru_r01_request_form_pdf.hl7")


def orm() -> bytes:
    return load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7").replace(b"ZP100120391", ZD.encode())


# The ORM sample (ZorgDomein's public example) carries BSN 900073962; the SIU about the same
# referral must name the same patient, or the agenda refuses it (patient-mismatch).
def siu(trigger: str = "S12", filler: str = "F778") -> bytes:
    segments = [
        f"MSH|^~\\&|HIX|ZIEKENHUIS|KOPPEL|ZIEKENHUIS|20261201090000+0100||SIU^{trigger}^SIU_{trigger}|SIU{trigger}{filler}|P|2.5",
        f"SCH|{ZD}|{filler}|||||^Controle||30|MIN|^^30^20261210093000+0100^20261210100000+0100||||||||||||||Booked",
        "PID|1||900073962^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^T^^^^^L||19800101|F",
        "AIS|1||CARPOLI^Polikliniek cardiologie",
    ]
    return ("\r".join(segments) + "\r").encode("latin-1")


MAPPING_OF = {"SRM": "zorgdomein-srm", "ORU": "zorgdomein-oru", "ORM": "zorgdomein-orm", "SIU": "siu", "REF": "ref", "OML": "zorgdomein-oml"}


class Harness:
    def __init__(self, tmp_path):
        self.bundle = load_bundle(REPO / "channels", REPO / "mappings")
        self.reactor = MemoryReactorClock()
        self.reactor.advance(1_795_000_000)
        self.store = open_store(f"sqlite:///{tmp_path}/k.db")
        self.committer = GroupCommitter(self.store, clock=self.reactor)
        self.metrics = Metrics()
        self.queued = []
        self.processor = processor_for(self, on_queued=self.queued.extend)

    def append(self, raw: bytes) -> Work:
        """Store ``raw`` as the listener would, its header fields read from it; the work to process it."""
        header = read_header(raw, default_charset="8859/1")
        message = received(header.control_id, raw=raw, received_at=self.reactor.seconds(), sender=header.sender,
                           message_type=header.type_and_trigger, structure=None, version=header.version,
                           charset=header.hl7_charset, duplicate_window=0, targets=())
        (result,) = self.store.write([Append(message=message)])
        return Work(message_id=result.message_id, channel="zorgdomein-in", mapping=MAPPING_OF[header.message_type],
                    raw=raw, codec=header.codec)

    def receive(self, raw: bytes) -> int:
        work = self.append(raw)
        self.processor.submit(work)
        self.settle()
        return work.message_id

    def settle(self):
        for _ in range(20):  # each step of the processor waits for its commit
            self.reactor.advance(0)

    def outcome(self, message_id):
        (row,) = [m for m in self.store.list_messages(limit=1000) if m.id == message_id]
        return row.processing, row.processing_detail

    def entries(self):
        return self.store.list_agenda_entries(limit=100)

    def count(self, outcome, mapping):
        value = self.metrics.registry.get_sample_value(
            "koppel_mapping_outcomes_total", {"channel": "zorgdomein-in", "mapping": mapping, "outcome": outcome})
        return value or 0


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.store.close()


def test_an_appointment_request_becomes_a_requested_entry_in_its_agenda_and_a_siu_for_the_his(h):
    message_id = h.receive(srm())
    (entry,) = h.entries()
    assert (entry.agenda_id, entry.kind, entry.state, entry.zd_number) == (
        "cardiology", "appointment-request", "requested", ZD)
    data = json.loads(entry.data)
    assert data["patient.birth_date"] == "2000-01-01"
    assert data["care_product"]["code"] == "CARREG001"
    assert h.outcome(message_id) == ("mapped", "agenda cardiology: requested")
    outbound = [m for m in h.store.list_messages(limit=100) if m.origin_id == message_id]
    assert [m.message_type for m in outbound] == ["SIU^S12"]
    assert [t.destination for t in h.queued] == ["his-scheduling"]
    sent = h.store.get_message(outbound[0].id)
    assert read_header(sent.raw, default_charset="8859/1").control_id == outbound[0].control_id
    assert h.count("ok", "zorgdomein-srm") == 1


def test_a_letter_before_its_request_waits_and_is_attached_when_the_request_arrives(h):
    letter = h.receive(oru())
    assert h.outcome(letter)[0] == "held"
    assert h.entries() == []
    h.receive(srm())
    (entry,) = h.entries()
    assert len(entry.attachments) == 1
    assert h.store.get_attachment(entry.attachments[0]).data.startswith(b"%PDF")
    assert h.outcome(letter)[0] == "mapped"
    history = h.store.agenda_history(entry.id)
    assert [x.action for x in history] == ["create", "release"]
    assert h.store.held_events([f"zd:{ZD}"]) == []


ARRIVALS = {"SRM": srm, "ORU": oru, "ORM": orm, "SIU": siu}


@pytest.mark.parametrize("order", list(itertools.permutations(ARRIVALS)), ids="-".join)
def test_one_referral_ends_the_same_whatever_order_its_messages_arrive_in(h, order):
    for name in order:
        h.receive(ARRIVALS[name]())
    (entry,) = h.entries()
    assert (entry.kind, entry.state, entry.agenda_id) == ("appointment-request", "booked", "cardiology")
    assert entry.filler_id == "F778"
    assert len(entry.attachments) == 1
    assert h.store.held_events([f"zd:{ZD}", "filler:F778"]) == []


def test_a_cancellation_closes_the_entry_and_a_later_booking_is_refused_with_a_reason(h):
    h.receive(srm())
    h.receive(srm(trigger="S04"))
    (entry,) = h.entries()
    assert entry.state == "cancelled"
    late = h.receive(siu())
    outcome, detail = h.outcome(late)
    assert outcome == "error" and "cancelled" in detail
    assert "123456782" not in detail


def test_a_cancellation_of_an_unknown_request_is_an_error_naming_the_key_kind_not_a_crash(h):
    message_id = h.receive(srm(zd="ZD200099999", trigger="S04"))
    outcome, detail = h.outcome(message_id)
    assert outcome == "error" and "ZD-number" in detail and "ZD200099999" not in detail
    assert h.entries() == []


def test_a_message_that_does_not_map_stays_stored_with_the_mapping_file_line_and_path(h):
    broken = srm().replace(b"ARQ|ZD200046119|", b"ARQ||")
    message_id = h.receive(broken)
    outcome, detail = h.outcome(message_id)
    assert outcome == "error"
    assert "zorgdomein-srm.yaml:" in detail and "ARQ-1" in detail
    assert h.store.get_message(message_id).raw == broken
    assert h.count("error", "zorgdomein-srm") == 1
    assert h.entries() == []


def test_the_processor_keeps_going_after_an_internal_failure(h, monkeypatch):
    calls = {"n": 0}
    original = h.processor._plan

    def flaky(work, view):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return original(work, view)

    monkeypatch.setattr(h.processor, "_plan", flaky)
    first = h.receive(srm())
    second = h.receive(srm(zd="ZD200046120"))
    assert h.outcome(first) == ("error", "internal error while mapping")
    assert h.outcome(second)[0] == "mapped"


def test_the_agenda_gauge_counts_entries_by_agenda_and_state(h):
    h.receive(srm())
    h.receive(srm(zd="ZD200046120"))
    h.receive(srm(zd="ZD200046120", trigger="S04"))
    h.processor.refresh_gauges()
    sample = h.metrics.registry.get_sample_value
    assert sample("koppel_agenda_entries", {"agenda": "cardiology", "state": "requested"}) == 1
    assert sample("koppel_agenda_entries", {"agenda": "cardiology", "state": "cancelled"}) == 1


def test_a_released_letter_is_sent_to_the_archive_like_one_that_arrived_in_order(h):
    h.receive(oru())
    h.receive(srm())
    archived = [m for m in h.store.list_messages(limit=100) if m.message_type and m.message_type.startswith("MDM")]
    assert len(archived) == 1
    assert [t.destination for t in h.queued].count("document-archive") == 1


def test_messages_planned_in_one_batch_see_each_other_before_anything_is_committed(h):
    works = [h.append(raw) for raw in (oru(), srm(), orm(), siu())]
    for work in works:  # all queued before the processor gets a turn: one batch, one commit
        h.processor.submit(work)
    h.settle()
    (entry,) = h.entries()
    assert (entry.state, entry.filler_id, len(entry.attachments)) == ("booked", "F778", 1)
    assert all(h.outcome(w.message_id)[0] == "mapped" for w in works)
    assert h.store.held_events([f"zd:{ZD}"]) == []


@pytest.mark.parametrize("batched", [False, True], ids=["one-by-one", "one-batch"])
@pytest.mark.parametrize("change, state", [("S13", "rescheduled"), ("S14", "modified")])
def test_a_schedulers_change_before_its_booking_waits_for_it(h, batched, change, state):
    """SRM, then the scheduler's S13 (or S14), then its S12: the change waits for the booking
    (it was refused "entry is requested", or the S14 changed the request and the older S12
    wrote its slot over it), in separate commits or planned in one batch."""
    moved = siu(change).replace(b"20261210093000+0100", b"20261217140000+0100")
    works = [h.append(raw) for raw in (srm(), moved, siu("S12"))]
    for work in works:
        h.processor.submit(work)
        if not batched:
            h.settle()
    h.settle()
    (entry,) = h.entries()
    assert entry.state == state
    assert json.loads(entry.data)["booked_start"] == "2026-12-17T14:00:00+01:00"
    assert [h.outcome(w.message_id)[0] for w in works] == ["mapped"] * 3
    assert not h.store.has_held_events()


def test_entry_data_is_stored_as_the_same_json_the_plain_conversion_gives():
    import datetime as dt

    from engine.core.agenda import plain as _plain
    from engine.core.convert import Code, DutchName
    from engine.shell.processor import to_json

    data = {
        "when": dt.datetime(2026, 1, 1, 9, 30, tzinfo=dt.timezone(dt.timedelta(hours=1))),
        "born": dt.date(2000, 1, 1),
        "patient.name": DutchName(surname="van 't Hek - de Vries", own_prefix="de", own_surname="Vries",
                                  partner_prefix="van 't", partner_surname="Hek", initials="P.D.", given="",
                                  use="L"),
        "care_product": Code(code="CARREG001", text="consult", system="99zda"),
        "attachments": ({"data": "QQ==", "filename": "brief.pdf"},),
    }
    assert json.loads(to_json(data)) == json.loads(json.dumps(_plain(data)))


# --------------------------------------------------------------------------- found in review


def outbound_of(h, message_id):
    return [m for m in h.store.list_messages(limit=1000) if m.origin_id == message_id]


@pytest.mark.parametrize("change, state", [("S15", "cancelled"), ("S13", "rescheduled")])
def test_a_change_to_a_booking_still_waiting_for_its_request_waits_behind_it(h, change, state):
    booking = h.receive(siu("S12"))
    later = h.receive(siu(change))  # the scheduler moves or cancels it before the SRM got here
    assert h.outcome(booking)[0] == h.outcome(later)[0] == "held"
    h.receive(srm())
    (entry,) = h.entries()
    assert entry.state == state  # booked, then the change: not left booked


def test_a_change_for_an_entry_nobody_waits_for_is_still_an_error_with_a_reason(h):
    message = h.receive(siu("S15"))
    assert h.outcome(message) == ("error", "cannot cancel: no entry for this ZD-number")


def test_a_redelivered_booking_in_a_later_batch_is_a_noop_and_sends_nothing_again(h):
    h.receive(srm())
    h.receive(siu("S12"))
    again = h.receive(siu("S12").replace(b"|SIUS12F778|", b"|SIUS12F778-2|"))  # the HIS resends it
    assert h.outcome(again)[0] == "mapped"
    (entry,) = h.entries()
    assert [x.action for x in h.store.agenda_history(entry.id)] == ["create", "book"]
    assert outbound_of(h, again) == []


def test_a_redelivered_request_sends_no_second_appointment_request_to_the_his(h):
    first = h.receive(srm())
    again = h.receive(srm().replace(b"g20ce6a9f8ca4f551275", b"g20ce6a9f8ca4f551299"))
    assert [m.message_type for m in outbound_of(h, first)] == ["SIU^S12"]
    assert outbound_of(h, again) == []
    (entry,) = h.entries()
    assert [x.action for x in h.store.agenda_history(entry.id)] == ["create"]


def test_a_message_about_another_patient_never_changes_the_entry(h):
    h.receive(orm())  # BSN 900073962
    other = h.receive(siu("S15").replace(b"PID|1||900073962^", b"PID|1||999999990^"))
    assert h.outcome(other) == ("error", "cannot cancel: the message's patient (BSN) is not the entry's")
    (entry,) = h.entries()
    assert entry.state != "cancelled" and json.loads(entry.data)["patient.bsn"] == "900073962"


def test_outcomes_and_fallbacks_count_once_when_a_batch_is_planned_again(h, monkeypatch):
    from engine.store import SaveAgendaEntry, StoreError

    real_write = h.store.write
    failed = []

    def write(ops, **kwargs):
        if not failed and any(isinstance(op, SaveAgendaEntry) for op in ops):
            # the mapping's first commit fails once; planned again, it commits
            failed.append(1)
            raise StoreError("disk I/O error (injected)")
        return real_write(ops, **kwargs)

    monkeypatch.setattr(h.store, "write", write)
    h.receive(srm())
    assert failed and h.count("ok", "zorgdomein-srm") == 1


def test_the_hand_off_backlog_gauges_show_messages_acknowledged_but_not_mapped(h):
    from engine.store import PENDING

    h.receive(srm())  # mapped: not in the backlog
    waiting = received("WAITING1", raw=srm(zd="ZD200046121"), received_at=h.reactor.seconds(),
                       duplicate_window=0, targets=(), processing=PENDING)
    h.store.write([Append(message=waiting)])  # a hand-off a kill -9 interrupted
    h.reactor.advance(700)
    h.processor.refresh_gauges()
    sample = h.metrics.registry.get_sample_value
    assert sample("koppel_mapping_pending") == 1
    assert sample("koppel_mapping_pending_oldest_age_seconds") == 700


def test_a_held_message_released_or_refused_later_counts_its_second_outcome(h):
    """Counted 'held' when it waited; when its entry arrives, 'ok' if it applies, 'rejected'
    (as in _plan) if the agenda refuses it now: the refusal was stored as an error but never
    counted, so no dashboard or alert saw it."""
    stranger = h.receive(siu("S12").replace(b"PID|1||900073962^", b"PID|1||999999990^"))
    assert h.outcome(stranger)[0] == "held"
    h.receive(orm())  # the order for BSN 900073962 arrives: the held booking is refused
    assert h.outcome(stranger)[0] == "error"
    assert (h.count("held", "siu"), h.count("rejected", "siu")) == (1, 1)


def test_a_held_booking_released_by_its_order_counts_ok(h):
    booking = h.receive(siu("S12"))
    h.receive(orm())
    assert h.outcome(booking)[0] == "mapped"
    assert (h.count("held", "siu"), h.count("ok", "siu")) == (1, 1)
    (entry,) = h.entries()
    data = json.loads(entry.data)  # the booked slot, from SCH-11
    assert (data["booked_start"], data["booked_end"]) == ("2026-12-10T09:30:00+01:00", "2026-12-10T10:00:00+01:00")


def _slot(raw: bytes, start: str, placer: str | None = None) -> bytes:
    raw = raw.replace(b"20261210093000+0100", start.encode())
    return raw if placer is None else raw.replace(f"SCH|{ZD}|".encode(), f"SCH|{placer}|".encode())


@pytest.mark.parametrize("late", [False, True], ids=["natural-order", "all-before-the-order"])
def test_held_scheduler_messages_apply_in_arrival_order_even_one_keyed_by_the_filler_id_alone(tmp_path, late):
    """S12 (under the ZD-number), S13 carrying only the scheduler's id, S14 (ZD-number): held
    until the order comes, the S13 must not be overtaken by the later S14 (it was: only the
    S12 brings the filler id, so the S13 waited for a second release round)."""
    h = Harness(tmp_path)
    s12 = siu("S12")
    s13 = _slot(siu("S13"), "20261217140000+0100", placer="")
    s14 = _slot(siu("S14"), "20261224080000+0100")
    for raw in ([s12, s13, s14, orm()] if late else [orm(), s12, s13, s14]):
        h.receive(raw)
    (entry,) = h.entries()
    assert json.loads(entry.data)["booked_start"] == "2026-12-24T08:00:00+01:00"
    assert all(h.outcome(m.id)[0] == "mapped" for m in h.store.list_messages() if m.origin_id is None)
    h.store.close()


def test_a_letter_after_the_orders_cancellation_leaves_its_order_control(h):
    """The ORU's ORC-1 is NW for every letter: mapped into the entry it turned a cancelled
    order's order_control (CA) back into NW."""
    h.receive(orm())
    h.receive(orm().replace(b"ORC|NW|", b"ORC|CA|"))
    h.receive(oru())
    (entry,) = h.entries()
    assert entry.state == "cancelled" and json.loads(entry.data)["order_control"] == "CA"


@pytest.mark.parametrize("closing", ["S15", "ORM-CA"])
def test_a_request_after_its_order_was_cancelled_still_makes_the_entry_the_cancelled_request(tmp_path, closing):
    """ORM, its cancellation (SIU^S12+S15, or ORC-1 CA), then the SRM: the entry ends as in the
    natural order (SRM first), a cancelled appointment request in its agenda, and the HIS gets
    no request for it (the SRM was refused: 'cannot create: entry is cancelled')."""
    cancel = [siu("S12"), siu("S15")] if closing == "S15" else [orm().replace(b"ORC|NW|", b"ORC|CA|")]
    ends = []
    for name, order in (("natural", [srm(), orm(), *cancel]), ("late", [orm(), *cancel, srm()])):
        h = Harness(tmp_path / name)
        ids = [h.receive(raw) for raw in order]
        (entry,) = h.entries()
        ends.append((entry.kind, entry.agenda_id, entry.state))
        assert all(h.outcome(i)[0] == "mapped" for i in ids), [h.outcome(i) for i in ids]
        if name == "late":
            assert outbound_of(h, ids[-1]) == []  # no SIU^S12 request for a cancelled entry
        h.store.close()
    assert ends[0] == ends[1] and ends[0][0] == "appointment-request" and ends[0][2] == "cancelled"


def test_what_the_scheduler_booked_and_what_was_requested_end_the_same_in_any_order(tmp_path):
    """The SIU's booked practitioner and service have names of their own: a request arriving
    after the booking overwrote them with the requested ones (the same names), and a re-sent
    request then changed the entry and sent the HIS a second request."""
    booking = siu("S12").rstrip(b"\r") + b"\rAIP|1||^Boekdokter^B.\r"
    ends = []
    for name, order in (("natural", [srm(), orm(), booking]), ("late", [orm(), booking, srm()])):
        h = Harness(tmp_path / name)
        for raw in order:
            h.receive(raw)
        (entry,) = h.entries()
        data = json.loads(entry.data)
        ends.append({k: data.get(k) for k in ("practitioner", "booked_practitioner", "booked_service", "state")}
                    | {"state": entry.state})
        h.store.close()
    assert ends[0] == ends[1]
    assert ends[0]["booked_practitioner"] == "Boekdokter" and ends[0]["practitioner"] not in (None, "Boekdokter")

    h = Harness(tmp_path / "resent")
    h.receive(srm())
    h.receive(booking)
    again = h.receive(srm().replace(b"g20ce6a9f8ca4f551275", b"g20ce6a9f8ca4f55127X"))  # new MSH-10
    assert h.outcome(again)[0] == "mapped" and outbound_of(h, again) == []
    (entry,) = h.entries()
    history = h.store.agenda_history(entry.id)
    # the request's patient fields outrank the scheduler's spelling of them (the SIU did not
    # overwrite them), so the re-sent request changes nothing: a no-op, nothing sent again
    assert [x.action for x in history] == ["create", "book"] and entry.state == "booked"
    h.store.close()


@pytest.mark.parametrize("change, state", [("S13", "rescheduled"), ("S14", "modified")])
def test_an_order_scheduled_and_changed_before_its_request_ends_as_in_the_natural_order(tmp_path, change, state):
    """ORM, S12, S13 (or S14), then the SRM ended `booked`: the order family keeps `scheduled`
    for both, and the request's create mapped that to booked. The change history (with each
    event's kind and action, from the store across batches) is replayed instead."""
    ends = []
    for name, order in (("natural", [srm(), orm(), siu("S12"), siu(change)]),
                        ("late", [orm(), siu("S12"), siu(change), srm()])):
        h = Harness(tmp_path / name)
        for raw in order:
            h.receive(raw)  # one batch each: the late SRM finds the history in the store
        (entry,) = h.entries()
        ends.append((entry.kind, entry.state))
        h.store.close()
    assert ends[0] == ends[1] == ("appointment-request", state)


def _with_aig(raw: bytes, specialism: str) -> bytes:
    return raw.rstrip(b"\r") + f"\rAIG|1||{specialism}^{specialism}^99zda\r".encode()


@pytest.mark.parametrize("late", [False, True], ids=["natural-order", "request-last"])
def test_the_schedulers_s14_moving_the_booking_to_another_specialism_is_kept(tmp_path, late):
    """The request's specialism outranks a scheduler's field of the same name: the SIU's is
    booked_specialism, so an S14 moving the appointment to GYN is kept (it was dropped)."""
    h = Harness(tmp_path)
    s12, s14 = _with_aig(siu("S12"), "CAR"), _with_aig(siu("S14"), "GYN")
    for raw in ([s12, s14, srm()] if late else [srm(), s12, s14]):
        h.receive(raw)
    (entry,) = h.entries()
    data = json.loads(entry.data)
    h.store.close()
    assert entry.state == "modified"
    assert data["booked_specialism"] == "GYN"


def test_a_held_event_keeps_which_fields_took_the_mappings_default():
    """A held event is stored as JSON and applied on release: it must still say which values
    were defaults, or a held letter's sex U would replace the request's F on release."""
    from engine.core.agenda import AgendaEvent
    from engine.shell.processor import event_from_json, event_to_json

    event = AgendaEvent(kind="referral", action="attach", zd_number="ZD123456789",
                        fields={"patient.sex": "U", "patient.bsn": "999999990"}, defaulted=frozenset({"patient.sex"}))
    back, mapping = event_from_json(event_to_json(event, "zorgdomein-oru"))
    assert (back.defaulted, mapping) == (frozenset({"patient.sex"}), "zorgdomein-oru")
    legacy = json.loads(event_to_json(event))
    del legacy["defaulted"]  # held before this was recorded
    assert event_from_json(json.dumps(legacy))[0].defaulted == frozenset()


def test_a_booking_without_pid8_keeps_the_sex_the_order_sent(h):
    """The SIU mapping's `default: U` (PID-8 empty) is not a value the scheduler sent: it must
    not replace the order's F, though the scheduler's kind outranks the order's."""
    h.receive(orm())
    booking = siu().replace(b"||19800101|F\r", b"||19800101|\r")
    assert b"|19800101|\r" in booking
    message_id = h.receive(booking)
    assert h.outcome(message_id)[0] == "mapped"
    (entry,) = h.entries()
    assert entry.state == "scheduled" and json.loads(entry.data)["patient.sex"] == "F"


def test_a_greater_kind_that_only_repeats_values_is_kept_quietly(h):
    """A REF^I13 that repeats the order's patient fields changes nothing a person sees (no
    history item, updated_at kept, nothing sent), but the entry now records the referral as
    their source, so the order's later changes cannot replace them."""
    order_pid = next(s for s in orm().split(b"\r") if s.startswith(b"PID|"))
    ref = b"\r".join([b"MSH|^~\\&|VERWIJZER|HUISARTS|KOPPEL|ZIEKENHUIS|20261201090000+0100||REF^I13^REF_I12|REF13|P|2.4",
                      b"RF1||||||" + ZD.encode(), order_pid]) + b"\r"
    h.receive(orm())
    (before,) = h.entries()
    queued = len(h.queued)
    message_id = h.receive(ref)
    assert h.outcome(message_id)[0] == "mapped"
    (after,) = h.entries()
    # the referral's rank (an update: half a step above the referral's create), was the order's 3
    assert json.loads(after.data)["_sources"]["patient.bsn"] == 0.5
    assert {k: v for k, v in json.loads(after.data).items() if k != "_sources"} == {
        k: v for k, v in json.loads(before.data).items() if k != "_sources"}
    assert (after.updated_at, after.state) == (before.updated_at, before.state)
    assert len(h.store.agenda_history(after.id)) == len(h.store.agenda_history(before.id)) == 1
    assert len(h.queued) == queued  # nothing sent



def _his_ail(h, message_id) -> list[str]:
    (built,) = outbound_of(h, message_id)
    segments = h.store.get_message(built.id).raw.decode("latin-1").split("\r")
    return next(s for s in segments if s.startswith("AIL|")).split("|")[3].split("^")


def test_the_his_is_told_the_agenda_the_request_is_in(h):
    """The SIU^S12's AIL-3 names the agenda Koppel chose (point of care: its id; description:
    its name), beside the location the request named."""
    ail = _his_ail(h, h.receive(srm()))
    assert (ail[0], ail[3], ail[8]) == ("cardiology", "01059998&Isala, locatie Zwolle", "Polikliniek Cardiologie")


def test_a_request_no_rule_selects_goes_to_the_his_in_the_fallback_agenda_with_the_agendas_location(h):
    raw = (srm().replace(b"CARHAR^Cardiologie / Hartfalen", b"XYZ^Onbekend").replace(b"CARREG001", b"XYZ001")
           .replace(b"AIG|1|U|CAR^Cardiologie^99zda", b"AIG|1|U|XYZ^Onbekend^99zda")
           .replace(b"AIL|1|U|^^^01059998&Isala, locatie Zwolle", b"AIL|1|U|"))
    message_id = h.receive(raw)
    (entry,) = h.entries()
    assert entry.agenda_id == "unassigned"
    ail = _his_ail(h, message_id)
    assert (ail[0], ail[3], ail[8]) == ("unassigned", "", "Nog niet ingedeeld")


def test_a_request_that_names_no_location_goes_to_the_his_with_its_agendas_own(h):
    ail = _his_ail(h, h.receive(srm().replace(b"AIL|1|U|^^^01059998&Isala, locatie Zwolle", b"AIL|1|U|")))
    assert (ail[0], ail[3], ail[8]) == ("cardiology", "06990001", "Polikliniek Cardiologie")


def test_an_entry_whose_agenda_left_agendas_yaml_still_names_its_agenda_id_to_the_his(h):
    """An agenda taken out of agendas.yaml leaves its entries' agenda_id: the S12 names that."""
    import dataclasses
    import datetime as dt

    from engine.core import agenda as ag
    from engine.core.hl7message import Message
    from engine.mapping import build_outbound

    mapping = h.processor.mappings.mapping("zorgdomein-srm")
    result = mapping.apply(Message.parse(srm(), codec="latin-1"))
    decision = ag.decide(result.event, None, now=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc),
                         message_id="1", book=h.processor.book)
    entry = dataclasses.replace(decision.entry, agenda_id="gone")
    [(_, data)] = build_outbound(mapping, result.event, entry, control_id="K1",
                                 timestamp=dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc), agenda=None)
    ail = next(s for s in data.decode("latin-1").split("\r") if s.startswith("AIL|")).split("|")[3].split("^")
    assert (ail[0], ail[3]) == ("gone", "01059998&Isala, locatie Zwolle")
