"""Time review: HL7 date/times, Europe/Amsterdam, DST, windows and what goes out.

The findings failed before their fix (named in each test's docstring); the other tests pin a
behaviour that was checked and found right (or chosen and documented in the README), so that
a later change cannot move it silently. Synthetic patients only.
"""

from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from engine.core import agenda as ag
from engine.core import convert
from engine.core.hl7message import Message
from engine.core.paths import first, parse_path
from engine.mapping import _format, build_outbound
from tests.conftest import load_sample
from tests.test_mapping import bundled, mapped  # noqa: F401 - bundled is a fixture

SRM = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
UTC = dt.timezone.utc
WINTER = dt.timezone(dt.timedelta(hours=1))
SUMMER = dt.timezone(dt.timedelta(hours=2))
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=WINTER)
NEW_ENTRY = SimpleNamespace(id=1, state="requested")
BSN = "999911120"  # synthetic, passes the 11-proof


def built(bundled, raw: bytes, *, timestamp: dt.datetime = NOW) -> Message:
    mapping, event = mapped(bundled, raw)
    ((_, data),) = build_outbound(mapping, event, NEW_ENTRY, control_id="K1", timestamp=timestamp)
    return Message.parse(data, codec="latin-1")


def out(message: Message, path: str) -> str | None:
    return first(message, parse_path(path))


# ---------------------------------------------------------------------------------------
# Finding 1: a requested window sent as dates went to the HIS with an invented time of day


def test_a_requested_window_sent_as_dates_reaches_the_his_as_those_dates(bundled):
    """ZorgDomein sends ARQ-11 as dates (`20160329^20160428`: from the 29th up to and
    including the 28th). Before the fix the SIU^S12 said `20160428000000+0200`, midnight at
    the *start* of the last day, so the HIS saw a window a day shorter than the referrer asked."""
    siu = built(bundled, SRM)
    assert out(siu, "SCH-11.4") == "20160329"
    assert out(siu, "SCH-11.5") == "20160428"


@pytest.mark.parametrize(
    ("sent", "goes_out"),
    [
        ("20160428", "20160428"),
        ("201604", "201604"),  # month precision, as sent
        ("2016", "2016"),
        ("20160428+0000", "20160428+0000"),  # a date with an offset: as sent, not shifted a day
        ("20160428+1400", "20160428+1400"),
        ("2016042809", "20160428090000+0200"),  # a time of day: Amsterdam time with its offset
        ("201604280930+0000", "20160428113000+0200"),
    ],
)
def test_a_dtm_without_a_time_of_day_goes_out_at_the_precision_it_came_in(bundled, sent, goes_out):
    raw = SRM.replace(b"|20160329^20160428|", b"|" + sent.encode() + b"^|")
    assert out(built(bundled, raw), "SCH-11.4") == goes_out


def test_a_dtm_without_a_time_of_day_still_compares_and_is_stored_as_its_first_instant():
    day = convert.dtm("20160428")
    assert day == dt.datetime(2016, 4, 28, tzinfo=SUMMER)
    assert day < convert.dtm("201604280001") and day > convert.dtm("201604272359")
    assert ag.plain(day) == "2016-04-28T00:00:00+02:00"  # the stored form is unchanged
    assert ag.plain(day) == ag.plain(dt.datetime(2016, 4, 28, tzinfo=SUMMER))  # a re-delivery is a no-op


# ---------------------------------------------------------------------------------------
# Finding 2: MSH-7 (and {timestamp}) followed the host's time zone


@pytest.mark.parametrize(
    ("moment", "msh7"),
    [
        (dt.datetime(2026, 1, 2, 2, 4, 5, tzinfo=UTC), "20260102030405+0100"),
        (dt.datetime(2026, 7, 2, 2, 4, 5, tzinfo=UTC), "20260702040405+0200"),
        (dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "20261025023000+0200"),  # the first 02:30
        (dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "20261025023000+0100"),  # the second 02:30
        (dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=WINTER), "20260102030405+0100"),
    ],
)
def test_the_build_time_goes_out_in_amsterdam_time_whatever_the_hosts_zone(bundled, moment, msh7):
    """The processor passes `now` in the host's zone (`datetime.astimezone()`); on a host on
    UTC, as this VM and most containers are, the SIU^S12 said `...+0000` in MSH-7 while its
    appointment times were Amsterdam times. Before the fix: MSH-7 `20260102020405+0000`."""
    siu = built(bundled, SRM, timestamp=moment)
    assert out(siu, "MSH-7") == msh7


def test_the_timestamp_placeholder_goes_out_in_amsterdam_time(bundled):
    """The archive's MDM^T02 EVN-2 is `{timestamp}`: the same instant, in Amsterdam time."""
    raw = load_sample("zorgdomein/zd_oru_r01_attachments.hl7")
    mapping, event = mapped(bundled, raw)
    moment = dt.datetime(2026, 7, 2, 2, 4, 5, tzinfo=UTC)
    entry = SimpleNamespace(id=7, state="requested")
    outbound = build_outbound(mapping, event, entry, control_id="K1", timestamp=moment)
    assert outbound, "the ORU sample builds an MDM^T02"
    for _, data in outbound:
        message = Message.parse(data, codec="latin-1")
        assert out(message, "MSH-7") == "20260702040405+0200"
        if out(message, "EVN-1"):
            assert out(message, "EVN-2") == "20260702040405+0200"


# ---------------------------------------------------------------------------------------
# Checked and found right (pinned; the DST choices are documented in the README)


@pytest.mark.parametrize(
    ("sent", "instant_utc", "local"),
    [
        # the spring gap: 02:30 on 2026-03-29 does not exist; read with the winter offset
        ("20260329023000", dt.datetime(2026, 3, 29, 1, 30, tzinfo=UTC), "20260329033000+0200"),
        # the autumn repeat: 02:30 on 2026-10-25 happens twice; without an offset, the first
        ("20261025023000", dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "20261025023000+0200"),
        ("20261025023000+0200", dt.datetime(2026, 10, 25, 0, 30, tzinfo=UTC), "20261025023000+0200"),
        ("20261025023000+0100", dt.datetime(2026, 10, 25, 1, 30, tzinfo=UTC), "20261025023000+0100"),
        # an offset is an instant: kept as that instant, written in Amsterdam time with its offset
        ("20260105090000+0100", dt.datetime(2026, 1, 5, 8, 0, tzinfo=UTC), "20260105090000+0100"),
        ("20260105080000+0000", dt.datetime(2026, 1, 5, 8, 0, tzinfo=UTC), "20260105090000+0100"),
        ("20260705090000", dt.datetime(2026, 7, 5, 7, 0, tzinfo=UTC), "20260705090000+0200"),
    ],
)
def test_dst_gap_and_repeat_and_offsets(sent, instant_utc, local):
    value = convert.dtm(sent)
    assert value == instant_utc
    assert _format(value) == local
    assert convert.dtm(_format(value)) == value  # what goes out reads back as the same instant


def test_the_two_0230s_of_the_autumn_change_order_and_differ():
    first_, second = convert.dtm("20261025023000+0200"), convert.dtm("20261025023000+0100")
    assert first_ < second and second - first_ == dt.timedelta(hours=1)
    assert ag.plain(first_) != ag.plain(second)
    assert convert.dtm("20261025023000") == first_  # no offset: the first


def test_a_booking_moved_by_exactly_the_repeated_hour_is_a_change_not_a_re_delivery():
    book = ag.AgendaBook(agendas=(ag.Agenda(id="fallback", name="Fallback", fallback=True),))
    booked = ag.AgendaEvent(kind="appointment", action="book", placer_id="P1", filler_id="F1",
                            fields={"booked_start": convert.dtm("20261025023000+0200"), "patient.bsn": BSN})
    entry = ag.AgendaEntry(id="1", agenda_id="fallback", kind="appointment", state="booked", placer_id="P1",
                           filler_id="F1", data={"booked_start": ag.plain(booked.fields["booked_start"]),
                                                 "patient.bsn": BSN})  # as read back from the store
    moved = ag.AgendaEvent(kind="appointment", action="reschedule", placer_id="P1", filler_id="F1",
                           fields={"booked_start": convert.dtm("20261025023000+0100"), "patient.bsn": BSN})
    decision = ag.decide(moved, entry, now=NOW, message_id="2", book=book)
    assert isinstance(decision, ag.Update) and not decision.noop
    assert decision.changed == ("booked_start",) and decision.entry.state == "rescheduled"
    again = ag.AgendaEvent(kind="appointment", action="book", placer_id="P1", filler_id="F1",
                           fields={"booked_start": convert.dtm("20261025003000+0000"), "patient.bsn": BSN})
    assert ag.decide(again, entry, now=NOW, message_id="3", book=book).noop  # same instant, other offset


@pytest.mark.parametrize("sent", ["20260329", "202603290930", "20260329093000", "20260329093000.5"])
def test_precision_does_not_make_one_instant_two(sent):
    base = convert.dtm(sent[:8])
    assert convert.dtm(sent) >= base
    assert ag.plain(convert.dtm(sent)) == ag.plain(convert.dtm(sent))


_DST_DAYS = [(2026, 3, 29), (2026, 10, 25), (2027, 3, 28), (2027, 10, 31), (2026, 1, 5), (2026, 7, 5)]


@pytest.mark.parametrize("day", _DST_DAYS)
@pytest.mark.parametrize("digits", [4, 6, 8, 10, 12, 14])
@pytest.mark.parametrize("offset", ["", "+0000", "+0100", "+0200", "-0530"])
def test_what_goes_out_reads_back_as_the_same_instant(day, digits, offset):
    """Every precision, on and around the change days, with and without an offset: the text
    written for the HIS is the instant that was read (and a date stays a date)."""
    for hour in range(0, 5):
        full = "%04d%02d%02d%02d%02d%02d" % (*day, hour, 30, 0)
        sent = full[:digits] + offset
        value = convert.dtm(sent)
        written = _format(value)
        assert convert.dtm(written) == value
        if digits <= 8:
            assert written == sent  # a date is written as sent
        else:
            assert len(written) == 19  # a time: YYYYMMDDHHMMSS+HHMM in Amsterdam time
