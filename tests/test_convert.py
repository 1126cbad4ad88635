"""Typed conversions: DTM, dates, BSN, AGB, phones, ZD numbers, Dutch names, codes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.core import convert
from engine.core.convert import Code, ConversionError, DutchName
from engine.core.hl7message import Message
from engine.core.paths import components, parse_path

AMS = ZoneInfo("Europe/Amsterdam")
ZD = Path(__file__).parent / "samples" / "zorgdomein"


def utc(*args: int) -> dt.datetime:
    return dt.datetime(*args, tzinfo=dt.timezone.utc)


# DTM ---------------------------------------------------------------------------------------

def test_dtm_with_offset_is_the_exact_instant_shown_in_amsterdam():
    value = convert.dtm("20160324163509+0100")
    assert value == utc(2016, 3, 24, 15, 35, 9)
    assert (value.hour, value.minute) == (16, 35)
    assert value.utcoffset() == dt.timedelta(hours=1)
    assert convert.dtm("20220102161545+0200") == utc(2022, 1, 2, 14, 15, 45)
    assert convert.dtm("202109141120-0530") == utc(2021, 9, 14, 16, 50)


def test_dtm_without_offset_is_amsterdam_wall_time():
    winter = convert.dtm("20160324163440")
    assert winter == dt.datetime(2016, 3, 24, 16, 34, 40, tzinfo=AMS)
    assert winter.utcoffset() == dt.timedelta(hours=1)
    summer = convert.dtm("20160629120000")
    assert summer.utcoffset() == dt.timedelta(hours=2)


def test_dtm_across_the_spring_dst_boundary_in_amsterdam():
    # 2024-03-31 02:00 CET clocks go to 03:00 CEST.
    assert convert.dtm("20240331015959").utcoffset() == dt.timedelta(hours=1)
    assert convert.dtm("20240331030000").utcoffset() == dt.timedelta(hours=2)
    after = convert.dtm("20240331020000+0100")
    assert (after.hour, after.utcoffset()) == (3, dt.timedelta(hours=2))
    assert convert.dtm("20240331030000") - convert.dtm("20240331015959") == dt.timedelta(seconds=1)


def test_dtm_shows_amsterdam_local_time_for_other_offsets():
    value = convert.dtm("202109141120-0530")
    assert (value.hour, value.minute, value.utcoffset()) == (18, 50, dt.timedelta(hours=2))


def test_dtm_results_carry_fixed_offsets_so_comparisons_are_exact():
    value = convert.dtm("20241027023000")
    assert isinstance(value.tzinfo, dt.timezone)


def test_a_spring_time_that_does_not_exist_reads_one_hour_on():
    value = convert.dtm("20240331023000")
    assert (value.hour, value.minute, value.utcoffset()) == (3, 30, dt.timedelta(hours=2))


def test_dtm_across_the_autumn_dst_boundary_in_amsterdam():
    # 2024-10-27 03:00 CEST clocks go back to 02:00 CET: 02:30 happens twice.
    first = convert.dtm("20241027023000+0200")
    second = convert.dtm("20241027023000+0100")
    assert second - first == dt.timedelta(hours=1)
    assert first < second and first != second
    assert (first.hour, first.minute) == (second.hour, second.minute) == (2, 30)
    assert first.utcoffset() == dt.timedelta(hours=2)
    assert second.utcoffset() == dt.timedelta(hours=1)
    assert convert.dtm("20241027023000").utcoffset() == dt.timedelta(hours=2)  # no offset: the first


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2016", dt.datetime(2016, 1, 1, tzinfo=AMS)),
        ("201603", dt.datetime(2016, 3, 1, tzinfo=AMS)),
        ("20160329", dt.datetime(2016, 3, 29, tzinfo=AMS)),
        ("2016032916", dt.datetime(2016, 3, 29, 16, tzinfo=AMS)),
        ("201603291634", dt.datetime(2016, 3, 29, 16, 34, tzinfo=AMS)),
        ("20160329163412.5", dt.datetime(2016, 3, 29, 16, 34, 12, 500000, tzinfo=AMS)),
        ("20160329163412.1234", dt.datetime(2016, 3, 29, 16, 34, 12, 123400, tzinfo=AMS)),
        ("201603291634+0000", dt.datetime(2016, 3, 29, 18, 34, tzinfo=AMS)),
        (" 20160329 ", dt.datetime(2016, 3, 29, tzinfo=AMS)),
    ],
)
def test_dtm_accepts_partial_precision(text, expected):
    value = convert.dtm(text)
    assert value == expected
    assert value.tzinfo is not None


def test_dtm_in_another_zone():
    assert convert.dtm("20160101120000", tz="UTC") == utc(2016, 1, 1, 12)


def test_empty_dtm_is_none():
    assert convert.dtm("") is None
    assert convert.dtm("   ") is None


@pytest.mark.parametrize(
    "text",
    ["2016032", "20161301", "20160230", "20160329256000", "20160329163412.12345", "2016-03-29",
     "20160329+01", "20160329+2500", "20160329+0160", "yesterday", "20160329 1200", "２０１６"],
)
def test_bad_dtm_raises_a_conversion_error_without_the_value(text):
    with pytest.raises(ConversionError) as info:
        convert.dtm(text)
    assert text.strip() not in str(info.value)


@pytest.mark.parametrize("text", ["20160329120000+2500", "20160329120000-0160"])
def test_an_offset_out_of_range_says_so(text):
    with pytest.raises(ConversionError, match="time zone offset out of range"):
        convert.dtm(text)


@given(st.datetimes(min_value=dt.datetime(1900, 1, 2), max_value=dt.datetime(2100, 12, 30)),
       st.integers(min_value=-14 * 60, max_value=14 * 60))
def test_dtm_with_any_offset_is_that_instant_on_amsterdam_wall_time(moment, minutes):
    """Whether the offset sent is Amsterdam's own (the answer as read) or another (converted)."""
    moment = moment.replace(microsecond=0)
    sign = "-" if minutes < 0 else "+"
    text = moment.strftime("%Y%m%d%H%M%S") + f"{sign}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"
    sent = moment.replace(tzinfo=dt.timezone(dt.timedelta(minutes=minutes)))
    expected = sent.astimezone(AMS)
    value = convert.dtm(text)
    assert value == sent
    assert isinstance(value.tzinfo, dt.timezone) and value.utcoffset() == expected.utcoffset()
    assert value.timetuple()[:6] == expected.timetuple()[:6]


def test_an_unknown_zone_is_a_conversion_error():
    with pytest.raises(ConversionError):
        convert.dtm("20160101", tz="Mars/Olympus")


@given(st.text(max_size=25))
def test_dtm_raises_only_conversion_errors(text):
    try:
        value = convert.dtm(text)
    except ConversionError:
        return
    assert value is None or value.tzinfo is not None


def test_date_reads_dt_and_the_date_part_of_a_dtm():
    assert convert.date("20000101") == dt.date(2000, 1, 1)
    assert convert.date("198006") == convert.PartialDate(1980, 6)  # no day: kept at month precision
    assert convert.date("1980") == convert.PartialDate(1980)
    assert convert.date("19800623120000+0200") == dt.date(1980, 6, 23)
    assert convert.date("") is None
    for bad in ("19800231", "1980-06-23", "80"):
        with pytest.raises(ConversionError):
            convert.date(bad)


# Identifiers -------------------------------------------------------------------------------

def test_bsn_passes_the_eleven_proof():
    assert convert.bsn("123456782") == "123456782"
    assert convert.bsn(" 900073962 ") == "900073962"
    assert convert.bsn("") is None


def test_an_eight_digit_bsn_is_padded_with_a_leading_zero():
    # 012345672: 0*9+1*8+2*7+3*6+4*5+5*4+6*3+7*2-2 = 110
    assert convert.bsn("12345672") == "012345672"


@pytest.mark.parametrize("text", ["123456781", "000000000", "12345678a", "1234567", "1234567890", "123 456 782"])
def test_an_invalid_bsn_is_refused_and_never_echoed(text):
    with pytest.raises(ConversionError) as info:
        convert.bsn(text)
    assert text not in str(info.value)
    assert text not in repr(info.value)
    assert "123456" not in str(info.value)


def test_the_bsn_errors_say_what_was_wrong():
    with pytest.raises(ConversionError, match="11-proof"):
        convert.bsn("123456781")
    with pytest.raises(ConversionError, match="8 or 9 digits"):
        convert.bsn("12345")


@given(st.text(alphabet="0123456789", min_size=9, max_size=9))
def test_exactly_one_in_eleven_bsns_pass(digits):
    weights = (9, 8, 7, 6, 5, 4, 3, 2, -1)
    ok = sum(int(d) * w for d, w in zip(digits, weights)) % 11 == 0 and digits != "000000000"
    try:
        assert convert.bsn(digits) == digits
        assert ok
    except ConversionError:
        assert not ok


def test_agb_is_eight_digits():
    assert convert.agb("01004567") == "01004567"
    assert convert.agb("") is None
    for bad in ("1004567", "010045670", "0100456X"):
        with pytest.raises(ConversionError) as info:
            convert.agb(bad)
        assert bad not in str(info.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("020-5557890", "0205557890"),
        ("06-55554444", "0655554444"),
        ("0612341234", "0612341234"),
        ("+31 20 555 7890", "+31205557890"),
        ("(626)555-1234", "6265551234"),
        ("015.222.2222", "0152222222"),
        ("", None),
    ],
)
def test_phone_numbers_are_normalised(text, expected):
    assert convert.phone(text) == expected


@pytest.mark.parametrize("text", ["020-555789O", "tel 020 of 010 5557890", "++31201234567", "12", "mail@example.nl",
                                  "06-12345678 ext 12", "020-5557890moeder", "moeder06-12345678", "020-555 789O (werk)",
                                  "(020) 555 7890 na 17 uur", "06-12345678 / 020-5557890",
                                  "06-12345678 /020-5557890"])
def test_bad_phone_numbers_are_refused_without_the_value(text):
    with pytest.raises(ConversionError) as info:
        convert.phone(text)
    assert text not in str(info.value)


def test_a_number_with_the_00_international_prefix_loses_its_trunk_zero_too():
    """`0031 (0)20 ...` is `+31 (0)20 ...` written with the 00 prefix: the 0 in brackets is
    not dialled after a country code. Before: `00310205557890`, a number that does not exist."""
    assert convert.phone("0031 (0)20 555 7890") == "0031205557890"
    assert convert.phone("0032 (0)3 555 78 90") == "003235557890"
    assert convert.phone("(020) 555 7890") == "0205557890"  # no country code: the 0 is dialled


def test_zd_numbers():
    assert convert.zd_number("ZD200046139") == "ZD200046139"
    assert convert.zd_number("ZP100120391") == "ZP100120391"
    assert convert.zd_number("ZD123456") == "ZD123456"
    assert convert.zd_number("") is None
    for bad in ("ZD12345", "ZD1234567890123", "ZX12345678", "zd12345678", "g20ce6a9f8ca4f551275"):
        with pytest.raises(ConversionError) as info:
            convert.zd_number(bad)
        assert bad not in str(info.value)


# Names -------------------------------------------------------------------------------------

def name_from(raw_xpn: str) -> DutchName:
    message = Message.parse(
        b"MSH|^~\\&|A||||20240101||ADT^A01|1|P|2.5\rPID|1||||" + raw_xpn.encode("latin-1") + b"\r",
        codec="iso8859-1",
    )
    [value] = components(message, parse_path("PID-5"))
    return convert.dutch_name([sub[0] if len(sub) == 1 else "&".join(sub) for sub in value], value[0])


def test_the_domain_example_name_reads_by_the_fn_convention():
    name = name_from("van 't Hek - de Vries&de&Vries&van 't&Hek^P^D^^^^L")
    assert name == DutchName(
        surname="van 't Hek - de Vries",
        own_prefix="de",
        own_surname="Vries",
        partner_prefix="van 't",
        partner_surname="Hek",
        initials="P.D.",
        given="",
        use="L",
    )


def test_given_names_are_kept_and_give_initials():
    name = name_from("de Boer&de&Boer^Willem^Hendrik^^^^L")
    assert (name.surname, name.own_prefix, name.own_surname) == ("de Boer", "de", "Boer")
    assert (name.initials, name.given) == ("W.H.", "Willem Hendrik")


def test_written_initials_stay_initials():
    name = name_from("^&&van Leeuwen^Z.Z.".split("^", 1)[1])
    assert name.surname == "van Leeuwen"
    assert (name.initials, name.given) == ("Z.Z.", "")


def test_the_dutch_ij_is_one_initial():
    """IJsbrand's initial is IJ. (the Dutch IJ is one letter, capitalised as one): before, his
    written initials `IJ.J.` and his given names both gave `I.J.`."""
    name = convert.dutch_name(["de Vries", "IJsbrand", "Jan"], [])
    assert (name.initials, name.given) == ("IJ.J.", "IJsbrand Jan")
    assert convert.dutch_name(["de Vries", "IJ.J."], []).initials == "IJ.J."
    assert convert.dutch_name(["de Vries", "IJ. J."], []).initials == "IJ.J."
    assert convert.dutch_name(["de Vries", "I.J."], []).initials == "I.J."  # two initials, as written
    assert convert.dutch_name(["de Vries", "Ids"], []).initials == "I."
    assert convert.dutch_name(["de Vries", "Ijaz"], []).initials == "I."  # not a Dutch IJ


def test_a_hyphenated_given_name_has_an_initial_per_part():
    """Jan-Willem is J.W. (as the BRP writes a hyphenated first name's initials), not J."""
    name = convert.dutch_name(["de Vries", "Jan-Willem", "IJsbrand"], [])
    assert (name.initials, name.given) == ("J.W.IJ.", "Jan-Willem IJsbrand")
    assert convert.dutch_name(["de Vries", "Anne-Marie"], []).initials == "A.M."
    assert convert.dutch_name(["de Vries", "J.-W."], []).initials == "J.W."  # written so
    assert convert.dutch_name(["de Vries", "Jan-"], []).initials == "J."


def test_a_name_without_subcomponents_is_the_surname():
    assert convert.dutch_name(["Everyman", "Adam", "A"], []) == DutchName(
        surname="Everyman", initials="A.A.", given="Adam"
    )


def test_every_zorgdomein_patient_name_reads():
    for sample in sorted(ZD.glob("*.hl7")):
        message = Message.parse(sample.read_bytes(), codec="iso8859-1")
        [value] = components(message, parse_path("PID-5"))
        name = convert.dutch_name([c[0] for c in value], value[0])
        assert name.surname and name.initials and name.use == "L"


def test_a_name_with_nothing_in_it_is_an_error():
    with pytest.raises(ConversionError):
        convert.dutch_name(["", "", ""], ["", "", ""])


@given(st.lists(st.text(max_size=10), max_size=8), st.lists(st.text(max_size=10), max_size=6))
def test_dutch_name_raises_only_conversion_errors(comps, subs):
    try:
        convert.dutch_name(comps, subs)
    except ConversionError:
        pass


# Codes -------------------------------------------------------------------------------------

def test_codes_read_the_primary_triplet():
    assert convert.code(["CARREG001", "consult cardioloog", "99zda"]) == Code(
        code="CARREG001", text="consult cardioloog", system="99zda"
    )
    assert convert.code(["", "consult cardioloog"]) == Code(code="", text="consult cardioloog", system="")
    assert convert.code(["ZD_CLUSTER_NAME"]) == Code(code="ZD_CLUSTER_NAME", text="", system="")


def test_codes_fall_back_to_the_alternate_triplet():
    assert convert.code(["", "", "", "1212", "Biopsy", "L"]) == Code(code="1212", text="Biopsy", system="L")


def test_empty_codes_are_none():
    assert convert.code([]) is None
    assert convert.code(["", "", ""]) is None


@pytest.mark.parametrize("text, same_as", [
    ("20160428&D", "20160428"), ("20160428^D", "20160428"), ("201604&L", "201604"),
    ("20160428103000+0200&S", "20160428103000+0200"), ("20160428&", "20160428"),
])
def test_a_ts_with_its_degree_of_precision_reads_as_its_time(text, same_as):
    """HL7 2.3/2.4 TS.2 (table 0529), read with the time when a path selects the whole TS (a
    DR's start, ARQ-11.1): before, a valid message was a mapping error."""
    value = convert.dtm(text)
    assert value == convert.dtm(same_as)
    assert getattr(value, "hl7", same_as) == same_as  # a date alone goes out as sent, without TS.2
    assert convert.date(text.replace("103000+0200", "")) == convert.date(same_as.replace("103000+0200", ""))


@pytest.mark.parametrize("text", ["20160428&DD", "20160428&X", "2016-04-28", "20160428&D&D", "&D"])
def test_anything_else_after_a_time_is_still_refused(text):
    with pytest.raises(convert.ConversionError):
        convert.dtm(text)


def test_the_bundled_referral_mapping_reads_a_requested_window_sent_with_its_precision():
    from pathlib import Path

    from engine.bundle import load_bundle
    from engine.core.header import read_header
    from engine.core.hl7message import Message
    from tests.conftest import load_sample

    root = Path(__file__).resolve().parent.parent
    mapping = load_bundle(root / "channels", root / "mappings").mappings.mapping("zorgdomein-srm")
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    precise = raw.replace(b"|20160329^20160428|", b"|20160329&D^20160428&D|")
    assert precise != raw
    results = [mapping.apply(Message.parse(r, codec=read_header(r, default_charset="8859/1").codec))
               for r in (raw, precise)]
    assert [r.errors for r in results] == [(), ()]
    window = [(r.event.fields["requested_start"], r.event.fields["requested_end"]) for r in results]
    assert window[0] == window[1]
    assert window[1][1].hl7 == "20160428"



@pytest.mark.parametrize(("text", "expected"), [
    ("06-12345678 (moeder)", "0612345678"),
    ("06-12345678(moeder)", "0612345678"),
    ("(moeder) 06-12345678", "0612345678"),
    ("tel. 020-555 7890", "0205557890"),
    ("+31 (0)20 555 7890 (werk)", "+31205557890"),
    ("(020) 555 7890", "0205557890"),
    ("06-12345678, moeder", "0612345678"),
    ("mobiel: 06-12345678", "0612345678"),
    ("020/5557890", "0205557890"),
])
def test_words_about_a_phone_number_are_left_out_not_a_reason_to_refuse_the_referral(text, expected):
    """A GP system's "06-12345678 (moeder)" in PID-13 made the whole referral a mapping error."""
    assert convert.phone(text) == expected


@given(st.text(alphabet="0123456789 -()./+,:;abcmoederTEL\t", max_size=40))
def test_a_phone_field_gives_digits_or_a_clean_refusal_never_anything_else(text):
    """Whatever a GP system puts in PID-13: a number of 3 to 20 digits (a leading + kept), None
    for nothing, or a ConversionError without the text in it."""
    try:
        value = convert.phone(text)
    except ConversionError as refused:
        assert len(text.strip()) < 6 or text.strip() not in str(refused)  # (short ones match by chance)
        return
    if value is None:
        assert text.strip() == ""
    else:
        digits = value[1:] if value.startswith("+") else value
        assert digits.isdigit() and 3 <= len(digits) <= 20
        sent = iter(c for c in text if c.isdigit())
        assert all(d in sent for d in digits)  # the digits sent, in order (a trunk (0) may be left out)


# ----------------------------------------------------------------------------- base64 (an ED's data)

def test_base64_data_is_one_padded_line_or_an_error():
    from engine.core.convert import base64_data

    assert base64_data("") is None and base64_data(" \r\n") is None
    assert base64_data("JVBE\r\nRi0x\n") == "JVBERi0x"  # line breaks dropped
    assert base64_data("JVBERi0xLjQ") == "JVBERi0xLjQ="  # padding restored
    assert base64_data("JVBERi0xLg") == "JVBERi0xLg=="
    for bad in ("JVBERi0xL", "JVBE%i0x", "JVA=JVBE", "=JVB"):
        with pytest.raises(ConversionError, match="not valid base64"):
            base64_data(bad)


@given(data=st.binary(max_size=300), breaks=st.lists(st.integers(min_value=0, max_value=400), max_size=5),
       padded=st.booleans())
def test_base64_data_of_any_wrapped_unpadded_encoding_decodes_to_the_bytes(data, breaks, padded):
    import base64

    from engine.core.convert import base64_data

    text = base64.b64encode(data).decode()
    if not padded:
        text = text.rstrip("=")
    for at in sorted(breaks, reverse=True):
        text = text[:at] + "\r\n" + text[at:]
    result = base64_data(text)
    assert (result is None) if not data else base64.b64decode(result, validate=True) == data


@pytest.mark.parametrize(("kind", "subtype", "expected"), [
    ("application", "pdf", "application/pdf"),
    ("AP", "PDF", "application/pdf"),
    ("IM", "PNG", "image/png"),
    ("", "application/msword", "application/msword"),
    ("XX", "pdf", "pdf"),  # an ED-2 naming no MIME type: the subtype as sent
    ("application", "", None),
])
def test_an_eds_type_and_subtype_are_one_mime_type(kind, subtype, expected):
    from engine.core.agenda import media_type_of

    assert media_type_of(kind, subtype) == expected
