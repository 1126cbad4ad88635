"""Field paths: parse once, select from messages and groups (engine.core.paths)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.hl7message import Message
from engine.core.paths import FieldPath, PathError, components, first, parse_path, select

SAMPLES = Path(__file__).parent / "samples"
ZD = SAMPLES / "zorgdomein"
PUBLIC = SAMPLES / "public"


def load(name: str, codec: str = "iso8859-1") -> Message:
    folder = ZD if name.startswith("zd_") else PUBLIC
    return Message.parse((folder / name).read_bytes(), codec=codec)


def sel(message, text):
    return select(message, parse_path(text))


@pytest.fixture(scope="module")
def srm():
    return load("zd_srm_s01_appointment_request.hl7")


# Parsing -----------------------------------------------------------------------------------

def test_a_full_path_parses_into_its_parts():
    path = parse_path("PID-3[4=NLMINBIZA].1")
    assert path == FieldPath(
        text="PID-3[4=NLMINBIZA].1", segment="PID", occurrence=1, field=3,
        repetition="*", match=(4, "NLMINBIZA"), component=1, subcomponent=None,
    )
    assert parse_path("OBX[*]-5").occurrence == "*"
    assert parse_path("OBX[2]-5[3].4.2") == FieldPath(
        text="OBX[2]-5[3].4.2", segment="OBX", occurrence=2, field=5, repetition=3,
        component=4, subcomponent=2,
    )
    assert str(parse_path("MSH-9.2")) == "MSH-9.2"


@pytest.mark.parametrize(
    ("text", "column"),
    [
        ("", 1),
        ("PI", 3),
        ("pid-3", 1),
        ("PID3", 4),
        ("PID-", 5),
        ("PID-x", 5),
        ("PID-0", 5),
        ("PID-3.", 7),
        ("PID-3.1.", 9),
        ("PID-3.1.2.3", 10),
        ("PID[-3", 5),
        ("PID[0]-3", 5),
        ("PID[1-3", 6),
        ("PID[2=X]-3", 6),
        ("PID-3[4=NLMINBIZA", 18),
        ("PID-3[]", 7),
        ("PID-3[4=].1", 9),  # the value forgotten: never silently "component 4 empty"
        ("PID-3 ", 6),
        ("MSH-2.1", 5),
    ],
)
def test_parse_errors_name_the_column_of_the_problem(text, column):
    with pytest.raises(PathError) as info:
        parse_path(text)
    assert info.value.column == column
    assert f"column {column}" in str(info.value)


@given(st.text(max_size=30))
def test_parse_path_raises_only_path_errors(text):
    try:
        path = parse_path(text)
    except PathError as error:
        assert 1 <= error.column <= len(text) + 1
    else:
        assert path.text == text


# Selection on the ZorgDomein samples --------------------------------------------------------

def test_srm_appointment_request_fields(srm):
    assert sel(srm, "ARQ-1") == ["ZD200046139"]
    assert sel(srm, "MSH-9.2") == ["S01"]
    assert sel(srm, "ARQ-7.1") == ["CARREG001"]
    assert sel(srm, "ARQ-11.1") == ["20160329"]
    assert sel(srm, "ARQ-11.2") == ["20160428"]
    assert sel(srm, "ARQ-15.1") == ["01004567"]
    assert sel(srm, "AIG-3.1") == ["CAR"]
    assert sel(srm, "AIL-3.4.2") == ["Isala, locatie Zwolle"]
    assert sel(srm, "AIL-3.4.1") == ["01059998"]
    assert sel(srm, "AIS-11.2") == ["Patiënt spreekt uitsluitend Frans."]


def test_bsn_repetition_is_found_by_its_assigning_authority(srm):
    assert sel(srm, "PID-3[4=NLMINBIZA].1") == [""]
    assert first(srm, parse_path("PID-3[4=NLMINBIZA].1")) is None
    assert sel(srm, "PID-3[4=ZorgDomein].1") == ["ZD200046139"]
    assert sel(srm, "PID-3[4=NOBODY].1") == []
    orm = load("zd_orm_o01_lab_v24.hl7")
    assert first(orm, parse_path("PID-3[4=NLMINBIZA].1")) == "123456782"


def test_repetitions_default_to_the_first_and_can_be_all_or_numbered(srm):
    assert sel(srm, "PID-13.1") == ["020-5557890"]
    assert sel(srm, "PID-13[*].1") == ["020-5557890", "06-55554444"]
    assert sel(srm, "PID-13[2].3") == ["CP"]
    assert sel(srm, "PID-13[3].1") == []


def test_names_follow_the_fn_convention(srm):
    assert sel(srm, "PID-5.1.1") == ["de Boer"]
    assert sel(srm, "PID-5.1.2") == ["de"]
    assert sel(srm, "PID-5.1.3") == ["Boer"]
    assert sel(srm, "PID-5.2") == ["Willem"]
    assert sel(srm, "PID-5.7") == ["L"]
    orm = load("zd_orm_o01_echo_v24_latin1.hl7")
    assert sel(orm, "PID-5.1.2") == ["van"]
    assert sel(orm, "PID-5.1.5") == ["Testpatiënt"]


def test_a_whole_field_reads_unescaped_with_its_delimiters(srm):
    assert sel(srm, "PID-5") == ["de Boer&de&Boer^Willem^Hendrik^^^^L"]


def test_components_keep_the_structure_of_a_field(srm):
    assert components(srm, parse_path("PID-5")) == [
        [["de Boer", "de", "Boer"], ["Willem"], ["Hendrik"], [""], [""], [""], ["L"]]
    ]
    assert components(srm, parse_path("ARQ-7")) == [
        [["CARREG001"], ["consult cardioloog"], ["99zda"]]
    ]
    assert components(srm, parse_path("ZZZ-1")) == []


def test_components_split_before_unescaping():
    raw = b"MSH|^~\\&|A||||20240101||ADT^A01|1|P|2.5\rPID|1||||a\\S\\b^c\r"
    message = Message.parse(raw, codec="latin-1")
    assert components(message, parse_path("PID-5")) == [[["a^b"], ["c"]]]


def test_oru_reads_escaped_repetition_separator_as_underscore():
    oru = load("zd_oru_r01_attachments.hl7")
    assert sel(oru, "NTE[*]-3") == ["HL7.doc", "ZD_logo_kleur_RGB.png"]
    assert sel(oru, "OBX[*]-5.3") == ["msword", "png"]
    assert sel(oru, "OBX[*]-2") == ["ED", "ED"]
    assert sel(oru, "MSH-10") == ["ZD200046119"]
    assert sel(oru, "MSH-2") == ["^_\\&"]
    assert sel(oru, "OBR-46.2").pop().startswith("Overzicht van de bijlagen:\n")


def test_obx_star_selects_every_observation_value():
    form = load("zd_oru_r01_request_form_pdf.hl7")
    values = sel(form, "OBX[*]-5")
    assert len(values) == 3
    assert values[0] == "" and values[2] == ""
    assert values[1].startswith("^application^pdf^Base64^JVBERi0x")
    assert sel(form, "OBX[2]-5.5").pop().startswith("JVBERi0x")
    assert sel(form, "OBX[9]-5") == []


def test_line_breaks_in_orm_answers_become_newlines():
    orm = load("zd_orm_o01_echo_v24_latin1.hl7")
    assert sel(orm, "OBX[1]-5") == [
        "perimenopauzaal frequent vaginaal BV\naanw voor myomen? overige afw? normale endometriumdikte?"
    ]
    assert sel(orm, "PV2-3.1") == ["BEEEDG008"]


def test_select_on_a_group_reads_only_that_group():
    oml = load("zd_oml_o21_lab_v251_latin1.hl7")
    groups = oml.groups("ORC", ("OBR", "OBX", "NTE", "TQ1", "SPM"))
    assert [sel(g, "OBR-4.1") for g in groups] == [["LABEDG001"], ["ALAT"]]
    assert [sel(g, "SPM-4.2") for g in groups] == [[], ["Bloed"]]
    assert [first(g, parse_path("ORC-2")) for g in groups] == ["ZP100120391", "FUYTMNJYGA3TKNRWGA"]
    assert sel(oml, "ORC[*]-4") == ["ZP100120391", "ZP100120391"]
    assert sel(oml, "NTE-4.1") == ["ZD_CLUSTER_NAME"]
    assert sel(oml, "IN1-3.1") == ["0001"]


def test_attachment_groups_pair_data_and_file_name():
    oru = load("zd_oru_r01_attachments.hl7")
    groups = [g for g in oru.groups("OBX", ("NTE",)) if sel(g, "OBX-2") == ["ED"]]
    assert [(first(g, parse_path("OBX-5.3")), first(g, parse_path("NTE-3"))) for g in groups] == [
        ("msword", "HL7.doc"),
        ("png", "ZD_logo_kleur_RGB.png"),
    ]


@pytest.mark.parametrize("sample", sorted(ZD.glob("*.hl7")), ids=lambda p: p.name)
def test_every_zorgdomein_sample_reads_its_header_and_patient(sample):
    message = Message.parse(sample.read_bytes(), codec="iso8859-1")
    assert first(message, parse_path("MSH-3")) == "ZorgDomein"
    assert first(message, parse_path("MSH-9.1")) in {"SRM", "ORU", "ORM", "OML"}
    assert first(message, parse_path("PID-5.1.1"))
    assert sel(message, "PID-3[4=NLMINBIZA].4") == ["NLMINBIZA"]


# The standard kin: REF and SIU --------------------------------------------------------------

def test_ref_i12_providers_by_role():
    ref = load("msfc_ref_i12_01.hl7", "utf-8")
    assert sel(ref, "PRD[*]-1.1") == ["RP", "RT"]
    assert sel(ref, "PRD[2]-2.1") == ["McWILLIAMS"]
    assert sel(ref, "RF1-1.1") == ["P"]
    assert sel(ref, "DG1-3.1") == ["K63.3"]
    assert sel(ref, "PID-3[*].1") == ["PATID1234", "123456789"]
    assert sel(ref, "MSH-9") == ["REF^I12^REF_I12"]


@pytest.mark.parametrize(("name", "trigger"), [("msfc_siu_s12.hl7", "S12"), ("msfc_siu_s13.hl7", "S13"),
                                               ("msfc_siu_s14.hl7", "S14"), ("msfc_siu_s15.hl7", "S15")])
def test_siu_placer_and_filler_ids(name, trigger):
    siu = load(name, "utf-8")
    assert sel(siu, "MSH-9.2") == [trigger]
    assert first(siu, parse_path("SCH-1")) == "12345"
    assert first(siu, parse_path("SCH-2"))
    assert sel(siu, "SCH-11.4") and sel(siu, "SCH-11.4")[0].startswith("2020")


def test_siu_s12_resources():
    siu = load("msfc_siu_s12.hl7", "utf-8")
    assert sel(siu, "SCH-2") == ["36996"]
    assert sel(siu, "AIS-3.1") == ["76164006"]
    assert sel(siu, "AIL-3.4") == ["GH Clinic"]
    assert sel(siu, "AIP-3.2") == ["GE"]
    assert sel(siu, "PID-5.1.5") == ["Aniston"]


def test_missing_fields_read_empty_and_missing_segments_read_nothing(srm):
    assert sel(srm, "ARQ-99") == [""]
    assert sel(srm, "ARQ-1.9") == [""]
    assert sel(srm, "ARQ-1.1.9") == [""]
    assert first(srm, parse_path("ARQ-99")) is None
    assert sel(srm, "ZZZ-1") == []
    assert first(srm, parse_path("ZZZ-1")) is None
    assert sel(srm, "MSH-1") == ["|"]


def test_first_skips_empty_values():
    raw = b"MSH|^~\\&|A||||20240101||ADT^A01|1|P|2.5\rOBX|1||\rOBX|2||\rOBX|3||x\\S\\y\r"
    message = Message.parse(raw, codec="latin-1")
    assert first(message, parse_path("OBX[*]-3")) == "x^y"
    assert first(message, parse_path("OBX-3")) is None


# Never raises ------------------------------------------------------------------------------

PATHS = [parse_path(p) for p in (
    "MSH-1", "MSH-2", "MSH-9.2", "ARQ-1", "PID-3[4=NLMINBIZA].1", "PID-5.1.2", "OBX[*]-5",
    "OBX[3]-5[*].2.1", "NTE[*]-3", "PID-3[2=\\]", "ZZZ[*]-200[7].3.2",
)]
HL7ISH = st.text(alphabet="MSHPIDOBXNTE|^~\\&_#\r\n0123 FSTRXE.br", max_size=300)


@given(body=HL7ISH, codec=st.sampled_from(["latin-1", "utf-8"]))
@settings(max_examples=300)
def test_select_never_raises_on_arbitrary_message_text(body, codec):
    for raw in (body.encode("utf-8"), ("MSH" + body).encode("utf-8")):
        message = Message.parse(raw, codec=codec)
        for path in PATHS:
            assert all(isinstance(v, str) for v in select(message, path))
            first(message, path)
            components(message, path)
        for group in message.groups("OBX", ("NTE",)):
            for path in PATHS:
                select(group, path)


@given(raw=st.binary(max_size=300))
def test_select_never_raises_on_arbitrary_bytes(raw):
    message = Message.parse(b"MSH" + raw, codec="utf-8")
    for path in PATHS:
        select(message, path)


FIRST_PATHS = PATHS + [parse_path(p) for p in (
    "MSH-3", "MSH-9", "PID-5", "PID-5.1", "PID-5.1.1", "PID[2]-3.2.1", "OBX-5", "OBX[2]-5.3", "NTE-3.1.2",
    "PID-3[1].1", "PID-3[2]", "OBX-5[*]", "ZZZ-1",
)]


@given(body=HL7ISH, codec=st.sampled_from(["latin-1", "utf-8"]))
@settings(max_examples=300)
def test_first_is_the_first_non_empty_selected_value(body, codec):
    """``first`` (with its straight line for one occurrence and the first repetition) agrees
    with ``select`` on messages, with any delimiters, and on groups."""
    for raw in (body.encode("utf-8"), ("MSH" + body).encode("utf-8"), ("MSH|^~\\&|" + body).encode("utf-8")):
        message = Message.parse(raw, codec=codec)
        for path in FIRST_PATHS:
            assert first(message, path) == next((v for v in select(message, path) if v), None), path
        for group in message.groups("PID", ("OBX", "NTE")):
            for path in FIRST_PATHS:
                assert first(group, path) == next((v for v in select(group, path) if v), None), path


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet='ab^&~\\"XE0FHN', max_size=24), st.sampled_from(["OBR-4", "OBR-4[*]", "OBR[*]-4", "OBR-4.2"]))
def test_first_subcomponents_agree_with_components(field, path_text):
    """The `code` convert's fast path reads what the full split would give it: each component's
    first subcomponent, and whether the value has any content besides HL7's null."""
    from engine.core.paths import first_subcomponents

    raw = f"MSH|^~\\&|A||B||20260101||ORM^O01|1|P|2.4\rOBR|1||{field.replace(chr(13), '')}\rOBR|2||x^y\r"
    message = Message.parse(raw.encode("latin-1"), codec="latin-1")
    path = parse_path(path_text)
    expected = [([c[0] for c in value], any(s not in ("", '""') for c in value for s in c), value[0])
                for value in components(message, path)]
    assert first_subcomponents(message, path) == expected
