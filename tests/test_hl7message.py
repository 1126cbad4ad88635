"""Message: lazy segment view, groups, escape/unescape (engine.core.hl7message)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.header import DEFAULT_DELIMITERS, Delimiters
from engine.core.hl7message import Message, Segment, escape, unescape

SAMPLES = Path(__file__).parent / "samples"
ZD = sorted((SAMPLES / "zorgdomein").glob("*.hl7"))
ORU_DELIMS = Delimiters(field=b"|", encoding=b"^_\\&")


def load(path: Path, codec: str = "iso8859-1") -> Message:
    return Message.parse(path.read_bytes(), codec=codec)


@pytest.mark.parametrize("sample", ZD, ids=lambda p: p.name)
def test_every_zorgdomein_sample_parses_with_its_own_delimiters(sample):
    message = load(sample)
    raw = sample.read_bytes()
    assert message.delimiters.encoding == raw[4:raw.index(b"|", 4)]
    assert message.segments()[0].name == "MSH"
    assert len(message.segments()) == raw.count(b"\r")


def test_oru_samples_use_underscore_as_repetition_separator():
    message = load(SAMPLES / "zorgdomein" / "zd_oru_r01_attachments.hl7")
    assert message.delimiters == ORU_DELIMS
    assert message.delimiters.repetition == b"_"


def test_msh_fields_follow_hl7_numbering():
    message = load(SAMPLES / "zorgdomein" / "zd_srm_s01_appointment_request.hl7")
    msh = message.segments("MSH")[0]
    assert msh.field(1) == "|"
    assert msh.field(2) == "^~\\&"
    assert msh.field(3) == "ZorgDomein"
    assert msh.field(9) == "SRM^S01^SRM_S01"
    assert msh.fields()[8] == msh.field(9)
    assert msh.field(99) == ""


def test_other_segments_number_fields_from_one():
    message = load(SAMPLES / "zorgdomein" / "zd_srm_s01_appointment_request.hl7")
    arq = message.segments("ARQ")[0]
    assert arq.field(1) == "ZD200046139"
    assert arq.field(0) == ""
    assert arq.fields()[0] == "ZD200046139"


def test_segments_are_numbered_per_name_in_order():
    message = load(SAMPLES / "zorgdomein" / "zd_orm_o01_lab_v24.hl7")
    obx = message.segments("OBX")
    assert [s.index for s in obx] == [1, 2]
    assert [s.field(1) for s in obx] == ["1", "2"]
    assert message.segments("ZZZ") == []


def test_segment_ends_may_be_cr_lf_or_crlf_and_a_bom_is_skipped():
    body = ["MSH|^~\\&|A|B|||20240101||ADT^A01|1|P|2.5", "PID|1||X", "PV1|1|O"]
    for sep in ("\r", "\n", "\r\n"):
        raw = b"\xef\xbb\xbf" + sep.join(body).encode() + sep.encode() + sep.encode()
        message = Message.parse(raw, codec="utf-8")
        assert [s.name for s in message.segments()] == ["MSH", "PID", "PV1"]
        assert message.segments("PID")[0].field(3) == "X"


def test_a_message_without_msh_is_read_with_default_delimiters():
    message = Message.parse(b"PID|1||X^Y", codec="latin-1")
    assert message.delimiters == DEFAULT_DELIMITERS
    assert message.segments("PID")[0].field(3) == "X^Y"
    assert Message.parse(b"", codec="latin-1").segments() == []


def test_fields_are_split_only_for_segments_that_are_asked_for():
    message = load(SAMPLES / "zorgdomein" / "zd_orm_o01_lab_v24.hl7")
    pid = message.segments("PID")[0]
    pv1 = message.segments("PV1")[0]
    assert pid._fields is None and pv1._fields is None
    pid.field(3)
    assert pid._fields is not None and pv1._fields is None


def test_messages_and_segments_are_immutable():
    message = load(SAMPLES / "zorgdomein" / "zd_orm_o01_lab_v24.hl7")
    with pytest.raises(AttributeError):
        message.codec = "utf-8"  # type: ignore[misc]
    with pytest.raises(AttributeError):
        message.segments()[0].name = "XXX"  # type: ignore[misc]


def test_repr_never_shows_contents():
    message = load(SAMPLES / "zorgdomein" / "zd_orm_o01_lab_v24.hl7")
    pid = message.segments("PID")[0]
    assert "123456782" not in repr(pid) and "123456782" not in repr(message)


def test_orc_groups_collect_their_order_segments():
    message = load(SAMPLES / "zorgdomein" / "zd_oml_o21_lab_v251_latin1.hl7")
    groups = message.groups("ORC", ("OBR", "OBX", "NTE", "TQ1", "SPM"))
    assert [[s.name for s in g] for g in groups] == [["ORC", "TQ1", "OBR"], ["ORC", "TQ1", "OBR", "SPM"]]
    assert groups[1][0].field(2) == "FUYTMNJYGA3TKNRWGA"


def test_orm_groups_keep_obx_with_their_order():
    message = load(SAMPLES / "zorgdomein" / "zd_orm_o01_lab_v24.hl7")
    groups = message.groups("ORC", ("OBR", "OBX", "NTE", "TQ1", "SPM"))
    assert [[s.name for s in g] for g in groups] == [["ORC", "OBR", "OBX", "OBX"], ["ORC", "OBR"]]


def test_a_segment_outside_the_members_ends_the_group():
    message = load(SAMPLES / "public" / "msfc_siu_s12.hl7", "utf-8")
    groups = message.groups("AIS", ("NTE",))
    assert [[s.name for s in g] for g in groups] == [["AIS", "NTE", "NTE"]]
    assert message.groups("ORC", ("OBR",)) == []


def test_attachment_groups_pair_obx_with_its_file_name():
    message = load(SAMPLES / "zorgdomein" / "zd_oru_r01_attachments.hl7")
    groups = message.groups("OBX", ("NTE",))
    assert [[s.name for s in g] for g in groups] == [["OBX", "NTE"], ["OBX", "NTE"]]
    assert isinstance(groups[0][1], Segment)


# Escapes -----------------------------------------------------------------------------------

D = DEFAULT_DELIMITERS


def test_unescape_decodes_the_delimiter_escapes():
    assert unescape(r"a\F\b\S\c\T\d\R\e\E\f", D) == "a|b^c&d~e\\f"


def test_unescape_reads_r_as_the_messages_own_repetition_separator():
    assert unescape(r"ZD\R\logo\R\kleur\R\RGB.png", ORU_DELIMS) == "ZD_logo_kleur_RGB.png"


def test_line_break_becomes_a_newline_and_highlighting_is_dropped():
    assert unescape(r"regel 1\.br\regel 2", D) == "regel 1\nregel 2"
    assert unescape(r"\H\let op\N\!", D) == "let op!"


def test_hex_escapes_are_decoded_with_the_message_codec():
    assert unescape(r"Pati\XEB\nt", D, codec="iso8859-1") == "Patiënt"
    assert unescape(r"Pati\XC3AB\nt", D, codec="utf-8") == "Patiënt"
    assert unescape("\\X0D0A\\", D) == "\r\n"


def test_consecutive_hex_escapes_are_one_run_of_bytes():
    """UTF-8 sent one byte per escape (as some senders write it) was two replacement characters."""
    assert unescape(r"Pati\XC3\\XAB\nt", D, codec="utf-8") == "Patiënt"
    assert unescape(r"\XE2\\X82\\XAC\ 5", D, codec="utf-8") == "€ 5"
    assert unescape("\\XC3\\\\F\\\\XAB\\", D, codec="utf-8") == "\ufffd|\ufffd"  # not consecutive: apart
    assert unescape("\\X41\\\\XZZ\\", D) == "A\\XZZ\\"  # a broken one after it is kept as text
    assert unescape("\\XEB\\\\XEB\\", D, codec="iso8859-1") == "ëë"


def test_unknown_or_broken_escapes_are_kept_as_text():
    assert unescape(r"a\Zfoo\b", D) == r"a\Zfoo\b"
    assert unescape("a\\", D) == "a\\"
    assert unescape(r"\XZZ\ and \X1\ ", D) == r"\XZZ\ and \X1\ "
    assert unescape(r"\Q\F\x", D) == "\\Q|x"


def test_escape_escapes_every_delimiter_and_line_ends():
    assert escape("a|b^c&d~e\\f", D) == r"a\F\b\S\c\T\d\R\e\E\f"
    assert escape("x\ny", D) == r"x\X0A\y"


PUNCT = "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"


@st.composite
def delimiters(draw):
    chars = draw(st.permutations(PUNCT))
    return Delimiters(field=chars[0].encode(), encoding="".join(chars[1:5]).encode())


@given(d=delimiters(), text=st.text(), codec=st.sampled_from(["latin-1", "utf-8"]))
@settings(max_examples=300)
def test_escape_then_unescape_gives_the_text_back(d, text, codec):
    escaped = escape(text, d)
    for delim in (d.field, d.component, d.repetition, d.subcomponent):
        assert delim.decode() not in escaped
    assert "\r" not in escaped and "\n" not in escaped
    assert unescape(escaped, d, codec=codec) == text


@given(text=st.text())
def test_unescape_never_raises(text):
    unescape(text, D, codec="utf-8")
    unescape(text, ORU_DELIMS)


@given(raw=st.binary(max_size=400))
def test_parse_never_raises_on_arbitrary_bytes(raw):
    message = Message.parse(raw, codec="utf-8")
    for segment in message.segments():
        segment.fields()


def test_the_truncation_escape_is_the_messages_truncation_character():
    """2.7 added a fifth encoding character, truncation (`#`), and `\\P\\` for it in text;
    before, `\\P\\` was kept as an unknown escape."""
    five = Delimiters(field=b"|", encoding=b"^~\\&#")
    assert unescape("afgekapt\\P\\", five) == "afgekapt#"
    assert unescape("afgekapt\\P\\", D) == "afgekapt\\P\\"  # no truncation character declared: kept
    raw = b"MSH|^~\\&#|ZD||KOPPEL||20261201||ORU^R01^ORU_R01|1|P|2.7\rOBX|1|TX|||lange tekst\\P\\\r"
    from engine.core.paths import first, parse_path

    assert first(Message.parse(raw, codec="latin-1"), parse_path("OBX-5")) == "lange tekst#"
