"""MLLP framing: ``VT payload FS CR`` in, whole frames out, whatever the reads look like.

The shell hands the framer whatever TCP gives it, so every property here is stated
for any chunking of the byte stream (h11's test_io style), and every peer bug we
know of (txHL7's leaked CR, unbounded buffers, junk glued onto messages) has a test.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.core.mllp import (
    FrameAborted,
    FrameReader,
    FrameReceived,
    FrameTooLarge,
    JunkDiscarded,
    encode_frame,
)
from tests.conftest import load_sample, sample_names

VT, FS, CR = b"\x0b", b"\x1c", b"\r"
MSG = b"MSH|^~\\&|ZorgDomein||Koppel||20260102161545+0100||SRM^S01^SRM_S01|ZD1|P|2.4\rPID|1||123456782^^^NLMINBIZA^NNNLD"


def feed_chunks(reader: FrameReader, chunks) -> list:
    events = []
    for chunk in chunks:
        events.extend(reader.feed(chunk))
    return events


def frames(events) -> list[bytes]:
    return [e.payload for e in events if isinstance(e, FrameReceived)]


def junk_total(events) -> int:
    return sum(e.size for e in events if isinstance(e, JunkDiscarded))


def without_junk(events) -> list:
    return [e for e in events if not isinstance(e, JunkDiscarded)]


def split_at(data: bytes, cuts) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts}) if data else []
    out, last = [], 0
    for p in points:
        out.append(data[last:p])
        last = p
    out.append(data[last:])
    return out


# --- every sample -----------------------------------------------------------------


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_fed_whole_comes_out_as_exactly_one_identical_frame(name):
    raw = load_sample(name)
    reader = FrameReader(max_frame_bytes=1 << 20)
    assert reader.feed(encode_frame(raw)) == [FrameReceived(raw)]
    assert not reader.in_frame
    assert reader.eof() == []


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_fed_byte_by_byte_comes_out_identical(name):
    raw = load_sample(name)
    reader = FrameReader(max_frame_bytes=1 << 20)
    wire = encode_frame(raw)
    events = feed_chunks(reader, (wire[i : i + 1] for i in range(len(wire))))
    assert events == [FrameReceived(raw)]


@pytest.mark.parametrize("name", sample_names())
def test_every_sample_with_trailing_junk_is_received_and_the_junk_counted(name):
    raw = load_sample(name)
    reader = FrameReader(max_frame_bytes=1 << 20)
    events = reader.feed(encode_frame(raw) + b"\n\n garbage")
    assert frames(events) == [raw]
    assert junk_total(events) == len(b"\n\n garbage")


def test_all_samples_pipelined_in_one_read_come_out_in_order():
    raws = [load_sample(n) for n in sample_names()]
    reader = FrameReader(max_frame_bytes=1 << 20)
    events = reader.feed(b"".join(encode_frame(r) for r in raws))
    assert events == [FrameReceived(r) for r in raws]


@given(cuts=st.lists(st.integers(min_value=0, max_value=1 << 20), max_size=40))
@settings(max_examples=50, deadline=None)
def test_all_samples_in_any_chunking_come_out_identical(cuts):
    raws = [load_sample(n) for n in sample_names()]
    wire = b"".join(encode_frame(r) for r in raws)
    reader = FrameReader(max_frame_bytes=1 << 20)
    assert feed_chunks(reader, split_at(wire, cuts)) == [FrameReceived(r) for r in raws]


# --- hypothesis: chunking never changes the result ---------------------------------

payloads = st.binary(max_size=60).map(lambda b: b.replace(VT, b"v").replace(FS, b"f"))


@given(
    messages=st.lists(payloads, max_size=8),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
    lenient=st.booleans(),
)
@settings(max_examples=300)
def test_any_chunking_of_any_sequence_of_frames_gives_the_same_frames(messages, cuts, lenient):
    wire = b"".join(encode_frame(m) for m in messages)
    reader = FrameReader(max_frame_bytes=64, lenient=lenient)
    events = feed_chunks(reader, split_at(wire, cuts))
    assert events == [FrameReceived(m) for m in messages]
    assert reader.eof() == []


@given(
    messages=st.lists(payloads, max_size=6),
    junk=st.lists(st.binary(max_size=8).map(lambda b: b.replace(VT, b"")), max_size=7),
    cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=20),
)
@settings(max_examples=300)
def test_junk_before_and_between_frames_is_counted_and_never_glued_to_a_message(messages, junk, cuts):
    junk = junk + [b""] * (len(messages) + 1 - len(junk))
    wire = junk[0] + b"".join(encode_frame(m) + j for m, j in zip(messages, junk[1:]))
    reader = FrameReader(max_frame_bytes=64)
    events = feed_chunks(reader, split_at(wire, cuts))
    assert frames(events) == messages
    assert junk_total(events) == sum(len(j) for j in junk[: len(messages) + 1])
    assert all(isinstance(e, (FrameReceived, JunkDiscarded)) for e in events)


stream_bytes = st.lists(
    st.sampled_from([VT, FS, CR, b"A", b"\n", b"MSH|", b"\xc2\xb5"]), max_size=120
).map(b"".join)


@given(
    data=stream_bytes,
    cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=30),
    lenient=st.booleans(),
    limit=st.integers(min_value=4, max_value=40),
)
@settings(max_examples=400)
def test_any_byte_stream_gives_the_same_events_in_any_chunking_and_never_overfills(data, cuts, lenient, limit):
    whole = FrameReader(max_frame_bytes=limit, lenient=lenient, head_bytes=4)
    expected = whole.feed(data) + whole.eof()

    chunked = FrameReader(max_frame_bytes=limit, lenient=lenient, head_bytes=4)
    events = []
    for chunk in split_at(data, cuts):
        events.extend(chunked.feed(chunk))
        assert chunked.buffered <= limit
    events.extend(chunked.eof())

    assert without_junk(events) == without_junk(expected)
    assert junk_total(events) == junk_total(expected)
    for e in events:
        if isinstance(e, FrameReceived):
            assert len(e.payload) <= limit
            assert VT not in e.payload and FS not in e.payload


@given(
    sizes=st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=6),
    cuts=st.lists(st.integers(min_value=0, max_value=400), max_size=25),
)
@settings(max_examples=300)
def test_oversize_frames_in_any_chunking_are_reported_with_their_size_and_head(sizes, cuts):
    limit, head_bytes = 12, 5
    messages = [bytes([0x41 + i % 26]) * n for i, n in enumerate(sizes)]
    wire = b"".join(encode_frame(m) for m in messages)
    reader = FrameReader(max_frame_bytes=limit, head_bytes=head_bytes)
    events = feed_chunks(reader, split_at(wire, cuts))
    expected = [
        FrameReceived(m) if len(m) <= limit else FrameTooLarge(len(m), m[:head_bytes]) for m in messages
    ]
    assert events == expected


# --- pipelining, splits -------------------------------------------------------------


def test_two_frames_in_one_read_come_out_as_two_events_in_order():
    reader = FrameReader(max_frame_bytes=1000)
    events = reader.feed(encode_frame(b"MSH|first") + encode_frame(b"MSH|second"))
    assert events == [FrameReceived(b"MSH|first"), FrameReceived(b"MSH|second")]


def test_a_frame_split_between_fs_and_cr_is_received_once_the_cr_arrives():
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(VT + MSG + FS) == []
    assert reader.in_frame
    assert reader.feed(CR) == [FrameReceived(MSG)]
    assert not reader.in_frame


def test_a_frame_split_inside_a_multibyte_utf8_character_keeps_the_character_whole():
    payload = "MSH|^~\\&|||||||ORU^R01|1|P|2.5.1\rOBX|1|NM|x||5|µmol/L".encode()
    wire = encode_frame(payload)
    cut = wire.index("µ".encode()) + 1  # between 0xC2 and 0xB5
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(wire[:cut]) == []
    assert reader.feed(wire[cut:]) == [FrameReceived(payload)]
    assert "µmol/L" in payload.decode("utf-8")


def test_a_frame_over_many_reads_is_not_delivered_before_its_end():
    reader = FrameReader(max_frame_bytes=1000)
    wire = encode_frame(MSG)
    for i in range(len(wire) - 1):
        assert reader.feed(wire[i : i + 1]) == []
    assert reader.feed(wire[-1:]) == [FrameReceived(MSG)]


# --- junk -----------------------------------------------------------------------------


def test_bytes_before_vt_are_counted_and_not_part_of_the_message():
    reader = FrameReader(max_frame_bytes=1000)
    events = reader.feed(b"hello\r\n" + encode_frame(MSG))
    assert events == [JunkDiscarded(7), FrameReceived(MSG)]


def test_bytes_between_frames_are_counted_and_not_glued_to_the_next_frame():
    reader = FrameReader(max_frame_bytes=1000)
    events = reader.feed(encode_frame(b"MSH|a") + b"\r\nxx")
    assert events == [JunkDiscarded(4), FrameReceived(b"MSH|a")]
    assert reader.feed(encode_frame(b"MSH|b")) == [FrameReceived(b"MSH|b")]


def test_junk_alone_with_no_frame_is_counted_and_leaves_the_reader_idle():
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(b"GET / HTTP/1.0\r\n\r\n") == [JunkDiscarded(18)]
    assert not reader.in_frame
    assert reader.buffered == 0
    assert reader.eof() == []


# --- the CR after FS (txHL7 bug) ---------------------------------------------------------


def test_the_cr_after_fs_never_leaks_into_the_next_frame():
    reader = FrameReader(max_frame_bytes=1000)
    events = reader.feed(encode_frame(b"MSH|a") + encode_frame(b"MSH|b"))
    assert frames(events) == [b"MSH|a", b"MSH|b"]
    assert junk_total(events) == 0


def test_the_cr_after_fs_in_the_next_read_never_leaks_into_the_next_frame():
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(VT + b"MSH|a" + FS) == []
    events = reader.feed(CR + encode_frame(b"MSH|b"))
    assert events == [FrameReceived(b"MSH|a"), FrameReceived(b"MSH|b")]


# --- FS without CR ---------------------------------------------------------------------------


def test_fs_without_cr_aborts_the_frame_in_strict_mode_and_the_next_frame_still_arrives():
    reader = FrameReader(max_frame_bytes=1000)
    events = reader.feed(VT + b"MSH|a" + FS + encode_frame(b"MSH|b"))
    assert events == [FrameAborted(5, "fs-without-cr"), FrameReceived(b"MSH|b")]


def test_fs_without_cr_across_reads_aborts_the_frame_in_strict_mode():
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(VT + b"MSH|a" + FS) == []
    assert reader.feed(encode_frame(b"MSH|b")) == [FrameAborted(5, "fs-without-cr"), FrameReceived(b"MSH|b")]


def test_strict_mode_waits_for_the_cr_and_eof_after_fs_aborts_the_frame():
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(VT + b"MSH|a" + FS) == []
    assert reader.eof() == [FrameAborted(5, "eof")]


def test_fs_without_cr_is_accepted_in_lenient_mode():
    reader = FrameReader(max_frame_bytes=1000, lenient=True)
    events = reader.feed(VT + b"MSH|a" + FS + VT + b"MSH|b" + FS + CR)
    assert events == [FrameReceived(b"MSH|a"), FrameReceived(b"MSH|b")]


def test_lenient_mode_delivers_a_frame_ending_in_fs_at_once_so_its_ack_is_not_held_back():
    """A lenient peer sends VT msg FS and waits for the ACK: it never sends the next byte."""
    reader = FrameReader(max_frame_bytes=1000, lenient=True)
    assert reader.feed(VT + b"MSH|a" + FS) == [FrameReceived(b"MSH|a")]
    assert not reader.in_frame
    assert reader.eof() == []


def test_lenient_mode_still_swallows_a_cr_that_arrives_in_the_next_read():
    reader = FrameReader(max_frame_bytes=1000, lenient=True)
    assert reader.feed(VT + b"MSH|a" + FS) == [FrameReceived(b"MSH|a")]
    assert reader.feed(CR + encode_frame(b"MSH|b")) == [FrameReceived(b"MSH|b")]


# --- VT inside, EOF ----------------------------------------------------------------------


def test_a_vt_inside_a_frame_aborts_the_open_frame_and_starts_a_new_one():
    reader = FrameReader(max_frame_bytes=1000)
    events = reader.feed(VT + b"MSH|lost" + encode_frame(b"MSH|kept"))
    assert events == [FrameAborted(8, "vt-inside-frame"), FrameReceived(b"MSH|kept")]


def test_a_vt_inside_a_frame_in_a_later_read_counts_the_whole_open_frame():
    reader = FrameReader(max_frame_bytes=1000)
    assert reader.feed(VT + b"MSH|") == []
    events = reader.feed(b"lost" + encode_frame(b"MSH|kept"))
    assert events == [FrameAborted(8, "vt-inside-frame"), FrameReceived(b"MSH|kept")]


def test_eof_mid_frame_reports_the_frame_aborted_with_its_size():
    reader = FrameReader(max_frame_bytes=1000)
    reader.feed(VT + MSG[:20])
    assert reader.in_frame
    assert reader.eof() == [FrameAborted(20, "eof")]
    assert not reader.in_frame
    assert reader.buffered == 0


def test_eof_between_frames_reports_nothing():
    reader = FrameReader(max_frame_bytes=1000)
    reader.feed(encode_frame(MSG))
    assert reader.eof() == []


# --- size limit ----------------------------------------------------------------------------


def test_a_frame_of_exactly_the_limit_is_accepted_and_one_byte_more_is_too_large():
    reader = FrameReader(max_frame_bytes=10)
    assert reader.feed(encode_frame(b"x" * 10)) == [FrameReceived(b"x" * 10)]
    assert reader.feed(encode_frame(b"x" * 11)) == [FrameTooLarge(11, b"x" * 11)]


def test_the_limit_is_enforced_while_the_frame_is_incomplete_one_byte_at_a_time():
    limit = 100
    reader = FrameReader(max_frame_bytes=limit, head_bytes=50)
    reader.feed(VT)
    for i in range(10 * limit):
        assert reader.feed(b"y") == []
        assert reader.buffered <= limit
        assert reader.in_frame
    assert reader.buffered == 0  # over the limit nothing is kept but the head
    assert reader.feed(FS + CR) == [FrameTooLarge(10 * limit, b"y" * 50)]


def test_an_oversize_frame_is_followed_by_a_good_frame_that_is_received_whole():
    reader = FrameReader(max_frame_bytes=len(MSG) - 1)
    events = reader.feed(encode_frame(MSG) + encode_frame(b"MSH|small"))
    assert [type(e) for e in events] == [FrameTooLarge, FrameReceived]
    assert events[0].size == len(MSG)
    assert events[1] == FrameReceived(b"MSH|small")


def test_an_oversize_frame_whose_cr_comes_in_the_next_read_does_not_leak_the_cr():
    reader = FrameReader(max_frame_bytes=5)
    assert reader.feed(VT + b"MSH|toolong" + FS) == [FrameTooLarge(11, b"MSH|toolong")]
    assert reader.feed(CR + encode_frame(b"MSH|a")) == [FrameReceived(b"MSH|a")]


def test_frame_too_large_head_keeps_the_msh_header_of_a_real_sample():
    raw = load_sample("public/trusted-intermediary_oru_r01_natus_big_base64.hl7")
    reader = FrameReader(max_frame_bytes=4096, head_bytes=1024)
    wire = encode_frame(raw)
    events = feed_chunks(reader, (wire[i : i + 1000] for i in range(0, len(wire), 1000)))
    assert len(events) == 1 and isinstance(events[0], FrameTooLarge)
    assert events[0].size == len(raw)
    assert events[0].head == raw[:1024]
    assert events[0].head.split(b"\r", 1)[0] == raw.split(b"\r", 1)[0]


def test_frame_too_large_head_never_contains_bytes_from_after_the_frame():
    reader = FrameReader(max_frame_bytes=10, head_bytes=1000)
    events = reader.feed(encode_frame(b"MSH|0123456789") + encode_frame(b"PID|secret"))
    assert events == [FrameTooLarge(14, b"MSH|0123456789"), FrameReceived(b"PID|secret")]


def test_a_peer_that_never_ends_an_oversize_frame_gets_an_eof_abort_with_the_full_size():
    reader = FrameReader(max_frame_bytes=10)
    reader.feed(VT + b"z" * 25)
    reader.feed(b"z" * 25)
    assert reader.buffered == 0
    assert reader.eof() == [FrameAborted(50, "eof")]


def test_an_oversize_frame_ignores_a_vt_while_discarding():
    reader = FrameReader(max_frame_bytes=4)
    events = reader.feed(VT + b"123456" + VT + b"78" + FS + CR + encode_frame(b"ok"))
    assert events == [FrameTooLarge(9, b"123456" + VT + b"78"), FrameReceived(b"ok")]


def test_a_limit_below_one_byte_is_a_local_configuration_error():
    with pytest.raises(ValueError):
        FrameReader(max_frame_bytes=0)


# --- encode ---------------------------------------------------------------------------------


def test_encode_frame_wraps_the_payload_in_vt_and_fs_cr():
    assert encode_frame(b"MSH|x") == b"\x0bMSH|x\x1c\r"


@given(payload=payloads)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
def test_encode_then_read_gives_back_the_payload(payload):
    assert FrameReader(max_frame_bytes=100).feed(encode_frame(payload)) == [FrameReceived(payload)]
