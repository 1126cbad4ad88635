"""Reading MSH without parsing the message: every sample, odd delimiters, charsets,
and the rejection each unreadable header earns. ``read_header`` must never raise on
what a peer sends: a header that cannot be read still gets an AR.
"""

from __future__ import annotations

import re

import hl7
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core import charsets
from engine.core.errors import ErrorCode
from engine.core.header import DEFAULT_DELIMITERS, Header, read_header
from tests.conftest import load_sample, sample_names

BOM = b"\xef\xbb\xbf"


def read(raw: bytes, default_charset: str = "8859/1") -> Header:
    return read_header(raw, default_charset=default_charset)


def independent_msh(raw: bytes) -> dict[int, bytes]:
    """MSH-n -> raw bytes, split here without the engine's code (BOM, CR/LF/CRLF)."""
    if raw.startswith(BOM):
        raw = raw[3:]
    first = re.split(rb"\r\n|\r|\n", raw.lstrip(b"\r\n"), maxsplit=1)[0]
    assert first.startswith(b"MSH")
    sep = first[3:4]
    parts = first[4:].split(sep)
    return {n: value for n, value in enumerate(parts, start=2)}


# name, MSH-9 type^trigger, structure, MSH-10, MSH-12, charset used, MSH-1+MSH-2, rejection
EXPECTED = [
    ("public/DERIVED_oru_r01_micro_latin1.hl7", "ORU^R01", "ORU_R01", "008", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/hapi_ack_v21_brace.hl7", "ACK", "", "589888ADT30502184808", "2.1", "8859/1", b"|^~\\}", None),
    ("public/hapi_adt_a03.hl7", "ADT^A03", "", "263206", "2.5", "8859/1", b"|^~\\&", None),
    ("public/hapi_bar_p01_subcomp_brace.hl7", "BAR^P01", "", "589888ADT30502184808", "2.4", "8859/1", b"|^~\\}", None),
    ("public/hapi_bar_p01_three_enc_chars.hl7", "BAR^P01", "", "908594ADT30502185327", "2.4", "8859/1", b"|^~}", None),
    ("public/hapi_erp_z99_olis_zsegment_LF.hl7", "ERP^Z99", "ERP_R09", "bf3dd577-2108-47ad-abd2-4f06284f3b55", "2.3.1", "8859/1", b"|^~\\&", None),
    ("public/hapi_omd_o03_diet.hl7", "OMD^O03", "OMD_O03", "20101027181706", "2.5", "8859/1", b"|^~\\&", None),
    ("public/hapi_oml_o21_v251.hl7", "OML^O21", "OML_O21", "msgOP123", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/hapi_oru_r01_v22_radiology.hl7", "ORU^R01", "", "1994050216163360", "2.2", "8859/1", b"|^~\\&", None),
    ("public/hl7apy_adt_a01_basic.hl7", "ADT^A01", "ADT_A01", "0123456789", "2.5", "8859/1", b"|^~\\&", None),
    # component separator is "$" here, so the "^" in MSH-9 is data: one component
    ("public/hl7apy_msh_only_custom_delimiters.hl7", "RSP^SLI^RSP_K11", "", "430102", "2.5", "8859/1", b"!$r?@", None),
    ("public/hl7apy_msh_only_highlight_escapes.hl7", "RSP^SLI", "RSP_K11", "430102", "2.5", "8859/1", b"|^~\\&", None),
    ("public/hl7apy_oml_o33_multi_order.hl7", "OML^O33", "OML_O33", "978226056138290600", "2.5", "8859/1", b"|^~\\&", None),
    ("public/hl7apy_qbp_q22_pdq_query.hl7", "QBP^Q22", "QBP_Q21", "1", "2.5", "8859/1", b"|^~\\&", None),
    ("public/hl7apy_rsp_k22_pdq.hl7", "RSP^K22", "RSP_K21", "1234", "2.5", "8859/1", b"|^~\\&", None),
    ("public/hl7apy_rsp_k22_v27_truncation_char.hl7", "RSP^K22", "RSP_K21", "1234", "2.7", "8859/1", b"|^~\\&#", None),
    ("public/msfc_adt_a01_v28.hl7", "ADT^A01", "ADT_A01", "MSG00001", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_adt_a04_v28.hl7", "ADT^A04", "ADT_A04", "MSG00001", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_adt_a08_v28.hl7", "ADT^A08", "ADT_A08", "MSG00001", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_adt_a40_merge.hl7", "ADT^A40", "ADT_A40", "8919-40", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_mdm_t02_v23_ascii.hl7", "MDM^T02", "MDM_T02", "112", "2.3", "ASCII", b"|^~\\&", None),
    ("public/msfc_omg_o19_BOM_ed.hl7", "OMG^O19", "OMG_O19", "MSG00019", "2.8", "UNICODE UTF-8", b"|^~\\&", None),
    ("public/msfc_orm_o01_02_BOM.hl7", "ORM^O01", "ORM_O01", "MSG00019", "2.6", "UNICODE UTF-8", b"|^~\\&", None),
    ("public/msfc_orm_o01_utf8_BOM.hl7", "ORM^O01", "ORM_O01", "MSG00018", "2.6", "UNICODE UTF-8", b"|^~\\&", None),
    ("public/msfc_oru_r01_v24_small.hl7", "ORU^R01", "", "CNTRL-3456", "2.4", "8859/1", b"|^~\\&", None),
    ("public/msfc_oru_r01_v251_ed.hl7", "ORU^R01", "ORU_R01", "2.16.840.1.114222.4.3.3.5.1.2-20120314235954.325", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/msfc_oul_r22_utf8_ed.hl7", "OUL^R22", "OUL_R22", "1932", "2.8", "UNICODE UTF-8", b"|^~\\&", None),
    ("public/msfc_ref_i12_01.hl7", "REF^I12", "REF_I12", "MSG00112", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_ref_i12_02_ed.hl7", "REF^I12", "REF_I12", "MSG00012", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_siu_s12.hl7", "SIU^S12", "SIU_S12", "MSG00012", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_siu_s13.hl7", "SIU^S13", "SIU_S13", "MSG00013", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_siu_s14.hl7", "SIU^S14", "SIU_S14", "MSG00014", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_siu_s15.hl7", "SIU^S15", "SIU_S15", "MSG00015", "2.8", "8859/1", b"|^~\\&", None),
    ("public/msfc_vxu_v04_BOM.hl7", "VXU^V04", "VXU_V04", "NIST-IZ-AD-2.1_Send_V04_Z22", "2.5.1", "UNICODE UTF-8", b"|^~\\&", None),
    ("public/node-hl7-client_batch_fhs_msh_text_in_obx.hl7", "", "", "", "", None, b"|^~\\&", ("AR", 200)),
    ("public/node-hl7-complete_adt_a01_space_separated_MALFORMED.hl7", "ADT^A01", "", "599102", "2.3", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_dft_p03_two_messages.hl7", "DFT^P03", "", "DSD1184185250", "2.5", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_mdm_t04_wrapped_MALFORMED.hl7", "MDM^T04", "", "{6AF4DC6C-5BF1-", "", "8859/1", b"|^~\\&", ("AR", 101)),
    ("public/node-hl7-complete_mfn_m02_8859_1_fr.hl7", "MFN^M02", "", "0", "2.3.1", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_orm_o01_v23.hl7", "ORM^O01", "", "497", "2.3", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_oru_r01_nist_tc1.hl7", "ORU^R01", "ORU_R01", "NIST-100929110701660", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_oru_r01_realm_hcv.hl7", "ORU^R01", "ORU_R01", "1234567890", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_siu_s12_bad_phone.hl7", "SIU^S12", "", "FA0DC9EA-5446-42E6-G6D5-A8414B663676", "2.3.1", "8859/1", b"|^~\\&", None),
    ("public/node-hl7-complete_siu_s14_v23.hl7", "SIU^S14", "", "20080306953450", "2.3", "8859/1", b"|^~\\&", None),
    ("public/python-hl7_adt_a01_nulls_reps.hl7", "ADT^A01", "", "Q150084616T145947960", "2.3", "8859/1", b"|^~\\&", None),
    ("public/python-hl7_batch_bhs_bts.hl7", "", "", "abchs20070101123401-1", "", None, b"|^~\\&", ("AR", 200)),
    ("public/python-hl7_file_fhs_two_batches.hl7", "", "", "", "", None, b"|^~\\&", ("AR", 200)),
    ("public/python-hl7_malformed_batch_nested_bhs.hl7", "", "", "abchs20070101123401-1", "", None, b"|^~\\&", ("AR", 200)),
    ("public/python-hl7_malformed_batch_no_msh.hl7", "", "", "abchs20070101123401-1", "", None, b"|^~\\&", ("AR", 200)),
    ("public/python-hl7_oru_r01_ghh_lab.hl7", "ORU^R01", "", "CNTRL-3456", "2.4", "8859/1", b"|^~\\&", None),
    ("public/python-hl7_rep_subcomponents.hl7", "ORU^R01", "", "CNTRL-3456", "2.4", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_MALFORMED_missing_msh10.hl7", "ORM^O01", "ORM_O01", "", "2.5.1", "8859/1", b"|^~\\&", ("AR", 101)),
    ("public/trusted-intermediary_MALFORMED_missing_msh2.hl7", "ORM^O01", "ORM_O01", "111111", "2.5.1", None, b"|^~\\&", ("AR", 102)),
    ("public/trusted-intermediary_MALFORMED_missing_msh9.hl7", "", "", "111111", "2.5.1", "8859/1", b"|^~\\&", ("AR", 101)),
    ("public/trusted-intermediary_MALFORMED_msh_only_pipe.hl7", "", "", "", "", None, b"|^~\\&", ("AR", 102)),
    ("public/trusted-intermediary_ack_natus.hl7", "ACK", "", "A0A173B79-D7AC-444F-99E7-C96B4A68B188", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_adt_a01_mn_v23.hl7", "ADT^A01", "", "407750281", "2.3", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_oml_o21_utf8_quotes.hl7", "OML^O21", "OML_O21", "MessageControlID", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_orm_o01_epic_v23.hl7", "ORM^O01", "", "550162", "2.3", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_orm_o01_oracle_8859_1.hl7", "ORM^O01", "", "Q1283765463T1850878697", "2.3", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_oru_r01_ca_CRLF_utf8.hl7", "ORU^R01", "ORU_R01", "243408787", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_oru_r01_micro_utf8.hl7", "ORU^R01", "ORU_R01", "008", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_oru_r01_natus_big_base64.hl7", "ORU^R01", "ORU_R01", "20240215200725_0005", "2.5.1", "8859/1", b"|^~\\&", None),
    ("public/trusted-intermediary_oru_r01_tn_lri_ed.hl7", "ORU^R01", "ORU_R01", "20221114210300_0001", "2.5.1", "8859/1", b"|^~\\&", None),
    ("zorgdomein/zd_oml_o21_lab_v251_latin1.hl7", "OML^O21", "OML_O21", "d0a06274854e4824a8a4", "2.5.1", "8859/1", b"|^~\\&", None),
    ("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7", "ORM^O01", "ORM_O01", "1234567", "2.4", "8859/1", b"|^~\\&", None),
    ("zorgdomein/zd_orm_o01_lab_v24.hl7", "ORM^O01", "ORM_O01", "e49ce31d", "2.4", "8859/1", b"|^~\\&", None),
    ("zorgdomein/zd_oru_pdf_official_head.hl7", "ORU^R01", "", "ZD200046119", "2.4", "8859/1", b"|^_\\&", None),
    ("zorgdomein/zd_oru_r01_attachments.hl7", "ORU^R01", "", "ZD200046119", "2.4", "8859/1", b"|^_\\&", None),
    ("zorgdomein/zd_oru_r01_request_form_pdf.hl7", "ORU^R01", "", "ZD200046119", "2.4", "8859/1", b"|^_\\&", None),
    ("zorgdomein/zd_srm_s01_appointment_request.hl7", "SRM^S01", "SRM_S01", "g20ce6a9f8ca4f551275", "2.4", "8859/1", b"|^~\\&", None),
]


def test_the_expected_table_covers_every_sample_exactly_once():
    assert sorted(row[0] for row in EXPECTED) == sample_names()


@pytest.mark.parametrize(
    ("name", "type_trigger", "structure", "control_id", "version", "charset", "delims", "rejection"),
    EXPECTED,
    ids=[row[0] for row in EXPECTED],
)
def test_every_sample_header_reads_as_expected(name, type_trigger, structure, control_id, version, charset, delims, rejection):
    h = read(load_sample(name))
    assert h.type_and_trigger == type_trigger
    assert h.structure == structure
    assert h.control_id == control_id
    assert h.version == version
    assert h.hl7_charset == charset
    assert h.delimiters.field + h.delimiters.encoding == delims
    got = (h.rejection.ack_code, int(h.rejection.error_code)) if h.rejection else None
    assert got == rejection


MSH_SAMPLES = [n for n in sample_names() if load_sample(n).lstrip(BOM).lstrip(b"\r\n").startswith(b"MSH")]


@pytest.mark.parametrize("name", MSH_SAMPLES)
def test_every_sample_msh_fields_match_an_independent_split(name):
    raw = load_sample(name)
    h = read(raw)
    expected = independent_msh(raw)
    if h.rejection is not None and h.rejection.error_code is ErrorCode.DATA_TYPE:
        return  # MSH-2 unreadable: fields are kept only to mirror them
    for n in range(2, 25):
        assert h.field(n) == expected.get(n, b""), f"MSH-{n}"


@pytest.mark.parametrize("name", MSH_SAMPLES)
def test_every_sample_msh_9_10_12_18_agree_with_python_hl7_where_it_can_parse(name):
    raw = load_sample(name)
    if raw.startswith(BOM) or b"\n" in raw.split(b"\r", 1)[0]:
        pytest.skip("python-hl7 reads neither BOMs nor LF segment ends")
    try:
        msh = hl7.parse(raw.decode("latin-1")).segment("MSH")
    except Exception:  # python-hl7 gives up on some malformed samples; we do not
        pytest.skip("python-hl7 cannot parse this sample")
    h = read(raw)
    for n in (9, 10, 12, 18):
        theirs = str(msh[n]) if len(msh) > n else ""
        assert h.field(n).decode("latin-1") == theirs, f"MSH-{n}"


# --- BOM, delimiters, segment ends ---------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in sample_names() if load_sample(n).startswith(BOM)])
def test_a_utf8_bom_before_msh_is_skipped_and_remembered(name):
    raw = load_sample(name)
    h = read(raw)
    assert h.bom
    assert h.rejection is None
    assert h.fields == read(raw[3:]).fields
    assert not read(raw[3:]).bom


def test_zorgdomein_oru_delimiters_use_underscore_for_repetition():
    h = read(load_sample("zorgdomein/zd_oru_r01_attachments.hl7"))
    d = h.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == (b"|", b"^", b"_", b"\\", b"&")
    assert d.truncation == b""
    assert h.trigger == "R01"


def test_five_encoding_characters_give_a_truncation_character():
    h = read(load_sample("public/hl7apy_rsp_k22_v27_truncation_char.hl7"))
    assert h.delimiters.truncation == b"#"
    assert h.delimiters.subcomponent == b"&"
    assert h.rejection is None


def test_three_encoding_characters_are_tolerated_without_a_subcomponent_separator():
    h = read(load_sample("public/hapi_bar_p01_three_enc_chars.hl7"))
    assert h.delimiters.encoding == b"^~}"
    assert h.delimiters.subcomponent == b""
    assert h.rejection is None
    assert h.type_and_trigger == "BAR^P01"


def test_custom_delimiters_are_taken_from_msh_1_and_msh_2():
    h = read(load_sample("public/hl7apy_msh_only_custom_delimiters.hl7"))
    d = h.delimiters
    assert (d.field, d.component, d.repetition, d.escape, d.subcomponent) == (b"!", b"$", b"r", b"?", b"@")
    assert h.processing_id == "D"
    assert h.field(3) == b"LIP"


def test_custom_component_separator_splits_msh_9():
    h = read(b"MSH!$r?@!A!B!C!D!20260101!!SRM$S01$SRM_S01!ID1!P!2.4")
    assert (h.message_type, h.trigger, h.structure) == ("SRM", "S01", "SRM_S01")
    assert h.control_id == "ID1"


@pytest.mark.parametrize("end", [b"\r", b"\n", b"\r\n", b"\n\r"])
def test_the_msh_segment_ends_at_cr_lf_or_crlf(end):
    raw = b"MSH|^~\\&|ZD||K||20260101||ORU^R01|C1|P|2.4|||||NLD|8859/1" + end + b"PID|1||123456782"
    h = read(raw)
    assert h.field(18) == b"8859/1"
    assert h.hl7_charset == "8859/1"
    assert h.rejection is None


def test_blank_lines_before_msh_are_skipped():
    h = read(b"\r\n\r\nMSH|^~\\&|ZD||K||20260101||ORU^R01|C1|P|2.4")
    assert h.rejection is None
    assert h.control_id == "C1"


def test_a_message_without_a_segment_terminator_is_still_read():
    h = read(b"MSH|^~\\&|ZD||K||20260101||ORU^R01|C1|P|2.4")
    assert h.version == "2.4"


def test_a_crlf_sample_keeps_msh_12_free_of_the_line_end():
    h = read(load_sample("public/trusted-intermediary_oru_r01_ca_CRLF_utf8.hl7"))
    assert h.field(12) == b"2.5.1"


def test_header_values_stay_raw_bytes_in_the_message_encoding():
    raw = "MSH|^~\\&|Zörg||K||20260101||ORU^R01|C1|P|2.4|||||NLD|8859/1".encode("latin-1")
    h = read(raw)
    assert h.field(3) == "Zörg".encode("latin-1")
    assert h.sender == "Zörg|"


def test_msh_15_and_16_are_read_trimmed_and_upper_cased():
    h = read(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|C1|P|2.5|||al | ne")
    assert (h.accept_ack_type, h.application_ack_type) == ("AL", "NE")


def test_field_and_component_accessors_give_empty_bytes_for_absent_values():
    h = read(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01|C1|P|2.5")
    assert h.field(1) == b"|"
    assert h.field(2) == b"^~\\&"
    assert h.field(40) == b""
    assert h.component(9, 3) == b""
    assert h.component(40, 1) == b""


def test_components_are_read_from_the_first_repetition_only():
    h = read(b"MSH|^~\\&|A|B|C|D|20260101||ADT^A01~ORU^R01|C1|P^T|2.5^NLD")
    assert h.type_and_trigger == "ADT^A01"
    assert h.processing_id == "P"
    assert h.version == "2.5"


# --- charsets ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "codec"),
    [
        ("ASCII", "ascii"),
        ("8859/1", "iso8859-1"),
        ("8859/2", "iso8859-2"),
        ("8859/5", "iso8859-5"),
        ("8859/9", "iso8859-9"),
        ("8859/15", "iso8859-15"),
        ("UNICODE UTF-8", "utf-8"),
        ("UNICODE", "utf-8"),
        ("ISO IR192", "utf-8"),
        ("ISO IR100", "iso8859-1"),
        ("ISO IR6", "ascii"),
        ("BIG-5", "big5"),
        ("GB 18030-2000", "gb18030"),
        ("unicode utf-8", "utf-8"),
        (" 8859/1 ", "iso8859-1"),
        ("UTF-8", "utf-8"),
        ("ISO-8859-1", "iso8859-1"),
    ],
)
def test_hl7_charset_names_map_to_python_codecs(name, codec):
    assert charsets.codec_for(name) == codec


@pytest.mark.parametrize("name", ["UNICODE UTF-16", "UNICODE UTF-32", "KLINGON", "", "latin1", "8859/16"])
def test_unreadable_or_unknown_charset_names_are_refused_not_guessed(name):
    with pytest.raises(charsets.UnknownCharset):
        charsets.canonical(name)


def test_every_charset_in_the_table_keeps_hl7_delimiters_single_ascii_bytes():
    for codec in set(charsets.HL7_CHARSETS.values()):
        assert "MSH|^~\\&\r".encode(codec) == b"MSH|^~\\&\r"


def test_msh_18_unicode_utf8_decodes_a_copy_as_utf8():
    raw = "MSH|^~\\&|Zörg||K||20260101||ORU^R01|C1|P|2.5.1|||||NLD|UNICODE UTF-8".encode()
    h = read(raw)
    assert (h.hl7_charset, h.codec) == ("UNICODE UTF-8", "utf-8")
    assert h.sender == "Zörg|"


def test_msh_18_repetitions_use_the_first_character_set():
    h = read(b"MSH|^~\\&|A||C||20260101||ORU^R01|C1|P|2.5|||||NLD|8859/15~UNICODE UTF-8")
    assert h.hl7_charset == "8859/15"


def test_empty_msh_18_uses_the_channel_default_charset():
    raw = b"MSH|^~\\&|A||C||20260101||ORU^R01|C1|P|2.5"
    assert read(raw, default_charset="UNICODE UTF-8").codec == "utf-8"
    assert read(raw, default_charset="8859/1").codec == "iso8859-1"


@pytest.mark.parametrize("value", [b"KLINGON", b"UNICODE UTF-16", b"8859/99"])
def test_an_unknown_msh_18_is_rejected_with_ae_table_value_not_found(value):
    h = read(b"MSH|^~\\&|A||C||20260101||ORU^R01|C1|P|2.5|||||NLD|" + value)
    assert h.rejection is not None
    assert h.rejection.ack_code == "AE"
    assert h.rejection.error_code is ErrorCode.TABLE_VALUE_NOT_FOUND
    assert int(h.rejection.error_code) == 103
    assert h.rejection.location.field == 18
    assert h.hl7_charset is None and h.codec == "latin-1"
    assert value.decode() not in h.rejection.text
    assert h.control_id == "C1"  # the rest is still read, so the AE can be addressed


# --- rejections -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        (b"MSH|^~\\&|A||C||20260101|||C1|P|2.5", 9),
        (b"MSH|^~\\&|A||C||20260101||^A01|C1|P|2.5", 9),
        (b"MSH|^~\\&|A||C||20260101||ADT^A01||P|2.5", 10),
        (b"MSH|^~\\&|A||C||20260101||ADT^A01|  |P|2.5", 10),
        (b"MSH|^~\\&|A||C||20260101||ADT^A01|C1|P|", 12),
        (b"MSH|^~\\&|A||C||20260101||ADT^A01|C1|P", 12),
    ],
)
def test_a_missing_msh_9_10_or_12_is_rejected_ar_required_field_missing(raw, field):
    r = read(raw).rejection
    assert (r.ack_code, int(r.error_code), r.location.field) == ("AR", 101, field)


@pytest.mark.parametrize(
    "raw",
    [
        b"MSH||A||C||20260101||ADT^A01|C1|P|2.5",
        b"MSH|",
        b"MSH|^|A",
        b"MSH|^^\\&|A||C||20260101||ADT^A01|C1|P|2.5",
        b"MSH|^~|&|A||C||20260101||ADT^A01|C1|P|2.5",
        b"MSH|^~\\&x#!|A",
        b"MSH|^~\\ &|A",
    ],
)
def test_missing_or_invalid_msh_2_is_rejected_ar_data_type_error(raw):
    r = read(raw).rejection
    assert (r.ack_code, int(r.error_code), r.location.field) == ("AR", 102, 2)


@pytest.mark.parametrize("raw", [b"MSH", b"MSHA^~\\&|", b"MSH ^~\\&", b"MSH\r", b"MSH\x00^~\\&"])
def test_a_missing_or_invalid_field_separator_is_rejected_ar_data_type_error(raw):
    r = read(raw).rejection
    assert (r.ack_code, int(r.error_code)) == ("AR", 102)
    assert r.location.field == 1


@pytest.mark.parametrize("raw", [b"", b"PID|1||123456782", b"\xef\xbb\xbf", b"\r\n", b"msh|^~\\&|A", b"EVN|A01"])
def test_a_payload_without_msh_is_rejected_ar_segment_sequence(raw):
    h = read(raw)
    assert (h.rejection.ack_code, int(h.rejection.error_code)) == ("AR", 100)
    assert h.delimiters == DEFAULT_DELIMITERS


@pytest.mark.parametrize(
    "name",
    ["public/python-hl7_batch_bhs_bts.hl7", "public/python-hl7_file_fhs_two_batches.hl7", "public/node-hl7-client_batch_fhs_msh_text_in_obx.hl7"],
)
def test_a_batch_is_rejected_ar_with_a_text_that_says_so(name):
    r = read(load_sample(name)).rejection
    assert r.ack_code == "AR"
    assert "batch" in r.text


@pytest.mark.parametrize("name", sample_names())
def test_no_rejection_text_contains_field_values_from_the_message(name):
    raw = load_sample(name)
    h = read(raw)
    if h.rejection is None:
        return
    text = h.rejection.text
    values = [v for v in raw.replace(b"\n", b"\r").replace(b"|", b"\r").split(b"\r") if len(v) >= 4]
    for value in values:
        assert value.decode("latin-1") not in text


# --- never raises -------------------------------------------------------------------------------


@given(raw=st.binary(max_size=300), default=st.sampled_from(sorted(charsets.HL7_CHARSETS)))
@settings(max_examples=500)
def test_read_header_never_raises_on_arbitrary_bytes(raw, default):
    h = read_header(raw, default_charset=default)
    assert isinstance(h, Header)
    h.type_and_trigger, h.control_id, h.version, h.sender, h.processing_id  # noqa: B018


header_ish = st.tuples(
    st.sampled_from([b"", b"\xef\xbb\xbf", b"\r\n"]),
    st.sampled_from([b"|", b"!", b"^", b"A", b"", b"\r", b"\xff"]),
    st.binary(max_size=6),
    st.lists(st.binary(max_size=12), max_size=22),
    st.sampled_from([b"|", b"\r", b"\n", b"^"]),
).map(lambda t: t[0] + b"MSH" + t[1] + t[2] + t[1] + t[1].join(t[3]) + t[4] + b"PID|1")


@given(raw=header_ish, default=st.sampled_from(["8859/1", "UNICODE UTF-8", "ASCII", "KLINGON"]))
@settings(max_examples=500)
def test_read_header_never_raises_on_msh_shaped_garbage(raw, default):
    h = read_header(raw, default_charset=default)
    h.type_and_trigger, h.control_id, h.version, h.accept_ack_type  # noqa: B018
    if h.rejection is None:
        assert h.delimiters.field not in h.delimiters.encoding
        assert 3 <= len(h.delimiters.encoding) <= 5


def test_cns_11643_is_answered_ae_not_read_with_a_codec_for_another_script():
    """HAPI reads it as x-EUC-TW, Camel as ISO-2022-CN; Python has neither."""
    raw = b"MSH|^~\\&|S|SF|R|RF|20260101||ORU^R01|C1|P|2.5||||||CNS 11643-1992\rPID|1\r"
    header = read(raw)
    assert header.rejection is not None and header.rejection.ack_code == "AE"
    assert header.rejection.location.field == 18


@pytest.mark.parametrize("raw", [
    b"MSH+^~\\&+S+SF+R+RF+20260102+ +ORU^R01+C1+P+2.5\r",  # '+': our timestamp's UTC offset
    b"MSH|^~\\-|S|SF|R|RF|20260102||ORU^R01|C1|P|2.5\r",  # '-': our control ids' dash
    b"MSH|^~\\7|S|SF|R|RF|20260102||ORU^R01|C1|P|2.5\r",  # a digit: our timestamp
])
def test_delimiters_our_ack_values_contain_are_refused_rather_than_answered_garbled(raw):
    header = read(raw)
    assert header.rejection is not None and header.rejection.ack_code == "AR"
