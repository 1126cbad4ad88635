"""Mappings: bundled files load, samples map to concrete events, config errors are located,
message content never escapes as an exception, outbound messages validate and read back."""

from __future__ import annotations

import datetime as dt
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.config import ConfigError
from engine.core.convert import Code
from engine.core.header import read_header
from engine.core.hl7message import Message
from engine.mapping import MappingSet, build_outbound, load_mappings

ROOT = Path(__file__).resolve().parent.parent
MAPPINGS = ROOT / "mappings"
ZD = ROOT / "tests" / "samples" / "zorgdomein"
PUBLIC = ROOT / "tests" / "samples" / "public"
AMS_WINTER = dt.timezone(dt.timedelta(hours=1))
AMS_SUMMER = dt.timezone(dt.timedelta(hours=2))
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=AMS_WINTER)


# The entry a create made, as the processor passes it: the SRM's SIU^S12 goes to the HIS only
# for an entry still `requested` (not for one already booked or closed).
NEW_ENTRY = SimpleNamespace(id=1, state="requested")


def entry_of(event) -> SimpleNamespace:
    """The entry a create leaves, its data as the store gives it back (dates as ISO text)."""
    from engine.core.agenda import plain

    return SimpleNamespace(id=1, state="requested", data=plain(event.fields))
NO_EVENT = SimpleNamespace(fields={})


@pytest.fixture(scope="module")
def bundled() -> MappingSet:
    return load_mappings(MAPPINGS)


def parse(raw: bytes) -> tuple[str, Message]:
    header = read_header(raw, default_charset="8859/1")
    return header.type_and_trigger, Message.parse(raw, codec=header.codec)


def apply(mappings: MappingSet, raw: bytes):
    type_and_trigger, message = parse(raw)
    mapping = mappings.for_type(type_and_trigger)
    assert mapping is not None, type_and_trigger
    return mapping, mapping.apply(message)


def mapped(mappings: MappingSet, raw: bytes):
    mapping, result = apply(mappings, raw)
    assert result.errors == ()
    assert result.event is not None
    return mapping, result.event


def sample(path: Path) -> bytes:
    return path.read_bytes()


def with_segment(raw: bytes, name: bytes, new: bytes) -> bytes:
    """Replace the first segment called `name` (or append `new` when there is none)."""
    lines = raw.replace(b"\r\n", b"\r").replace(b"\n", b"\r").split(b"\r")
    for i, line in enumerate(lines):
        if line[:3] == name:
            lines[i] = new
            return b"\r".join(lines)
    return b"\r".join([*[line for line in lines if line], new]) + b"\r"


# ---------------------------------------------------------------------------------------
# The bundled configuration


def test_the_bundled_mappings_load_and_cover_every_inbound_type(bundled):
    names = {m.name for m in bundled.mappings}
    assert names == {"zorgdomein-srm", "zorgdomein-oru", "zorgdomein-orm", "zorgdomein-oml", "ref", "siu"}
    for message_type in ["SRM^S01", "SRM^S04", "ORU^R01", "ORM^O01", "OML^O21", "REF^I12", "REF^I13",
                         "REF^I14", "SIU^S12", "SIU^S13", "SIU^S14", "SIU^S15"]:
        assert bundled.for_type(message_type) is not None, message_type
    assert bundled.for_type("ADT^A01") is None
    assert set(bundled.templates) == {"his_siu_s12.yaml", "his_siu_s15.yaml", "ris_orm_o01.yaml", "archive_mdm_t02.yaml"}
    assert bundled.tables["sex"]["V"] == "F"


# ---------------------------------------------------------------------------------------
# Golden samples


def test_srm_s01_maps_to_an_appointment_request(bundled):
    _, e = mapped(bundled, sample(ZD / "zd_srm_s01_appointment_request.hl7"))
    assert (e.kind, e.action, e.zd_number, e.placer_id, e.filler_id) == (
        "appointment-request", "create", "ZD200046139", "ZD200046139", None,
    )
    f = e.fields
    assert "patient.bsn" not in f  # ^^^NLMINBIZA^NNNLD: no BSN given
    name = f["patient.name"]
    assert (name.surname, name.own_prefix, name.own_surname, name.initials, name.given) == (
        "de Boer", "de", "Boer", "W.H.", "Willem Hendrik",
    )
    assert f["patient.birth_date"] == dt.date(2000, 1, 1)
    assert f["patient.sex"] == "U"
    assert (f["patient.street"], f["patient.house_number"], f["patient.city"], f["patient.postcode"]) == (
        "Herengracht", "200", "Amsterdam", "1016BS",
    )
    assert (f["patient.phone"], f["patient.mobile"]) == ("0205557890", "0655554444")
    assert (f["referrer.agb"], f["referrer.name"], f["referrer.initials"]) == ("01004567", "van Houten", "Z.Z.")
    assert f["referrer.phone"] == "0152222222"
    assert f["referrer.practice_agb"] == "01059999"
    assert f["care_question"] == Code(code="CARHAR", text="Cardiologie / Hartfalen", system="99zda")
    assert f["care_product"] == Code(code="CARREG001", text="consult cardioloog", system="99zda")
    assert (f["urgency"], f["priority"]) == ("REG", "R")
    assert f["requested_start"] == dt.datetime(2016, 3, 29, tzinfo=AMS_SUMMER)
    assert f["requested_end"] == dt.datetime(2016, 4, 28, tzinfo=AMS_SUMMER)
    assert f["requested_start"].utcoffset() == dt.timedelta(hours=2)
    assert f["patient.remark"] == "Patiënt spreekt uitsluitend Frans."
    assert (f["specialism"], f["location_agb"], f["location_name"]) == ("CAR", "01059998", "Isala, locatie Zwolle")
    assert f["practitioner"] == "Meijer"


@pytest.mark.parametrize("pid8, defaulted", [(b"U", False), (b"F", False), (b"", True), (b"Q", True)])
def test_an_event_names_the_fields_that_took_the_mappings_default(bundled, pid8, defaulted):
    """PID-8 empty, or a code the sex table lacks, gives the default U, marked as such, so
    the agenda never lets it replace a sex another message sent."""
    raw = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(b"|20000101|U|", b"|20000101|" + pid8 + b"|")
    _, e = mapped(bundled, raw)
    assert e.fields["patient.sex"] == (pid8.decode() if not defaulted else "U")
    assert e.defaulted == ({"patient.sex"} if defaulted else set())


def test_srm_s04_cancels_the_request(bundled):
    raw = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S04")
    _, e = mapped(bundled, raw)
    assert (e.kind, e.action, e.zd_number) == ("appointment-request", "cancel", "ZD200046139")


def test_oru_request_form_attaches_the_pdf_to_the_referral(bundled):
    _, e = mapped(bundled, sample(ZD / "zd_oru_r01_request_form_pdf.hl7"))
    assert (e.kind, e.action, e.zd_number, e.placer_id) == ("referral", "attach", "ZD200046119", "ZD200046119")
    f = e.fields
    assert f["patient.name"].surname == "van Dijk"
    assert f["patient.phone"] == "0205551234"
    assert (f["referrer.agb"], f["referrer.name"], f["referrer.initials"]) == ("01004567", "van Houten", "Z.Z.")
    assert f["document"] == Code(code="CIS", text="Cardiologie", system="ZORGDOMEIN")
    assert f["document_date"] == dt.datetime(2016, 3, 24, 16, 34, 32, tzinfo=AMS_WINTER)
    (pdf,) = f["attachments"]  # the NM and FT OBX are not attachments
    assert pdf["media_kind"] == "application" and pdf["media_type"] == "pdf" and pdf["encoding"] == "Base64"
    assert pdf["data"].startswith("JVBERi0xLjQK") and pdf["description"] == "Hartfalen"
    assert "filename" not in pdf


def test_oru_attachments_keep_their_file_names_with_the_repetition_escape_decoded(bundled):
    _, e = mapped(bundled, sample(ZD / "zd_oru_r01_attachments.hl7"))
    assert (e.action, e.zd_number) == ("attach", "ZD200046119")
    assert e.fields["remark"] == "Mijn toelichting op de bijlagen."
    doc, png = e.fields["attachments"]
    assert (doc["filename"], doc["media_type"], doc["data"][:8]) == ("HL7.doc", "msword", "0M8R4KGx")
    assert (png["filename"], png["media_kind"], png["media_type"]) == ("ZD_logo_kleur_RGB.png", "image", "png")
    assert e.fields["referrer.name"] == "van Leeuwen"  # FN.3 when FN.1 is empty


def test_oru_head_without_documents_still_links_by_msh10(bundled):
    mapping, e = mapped(bundled, sample(ZD / "zd_oru_pdf_official_head.hl7"))
    assert (e.kind, e.action, e.zd_number) == ("referral", "attach", "ZD200046119")
    assert e.fields["patient.name"].surname == "de Mannaam"
    assert "attachments" not in e.fields
    # no document, so nothing goes to the archive
    assert build_outbound(mapping, e, NEW_ENTRY, control_id="K1", timestamp=NOW) == []


def test_oru_zd_number_falls_back_to_obr2_when_msh10_is_not_one(bundled):
    raw = sample(ZD / "zd_oru_r01_attachments.hl7").replace(b"|ZD200046119|P|2.4", b"|1234|P|2.4", 1)
    _, e = mapped(bundled, raw)
    assert e.zd_number == "ZD200046119"


def test_orm_echo_order_takes_the_first_orc_and_collects_every_test(bundled):
    _, e = mapped(bundled, sample(ZD / "zd_orm_o01_echo_v24_latin1.hl7"))
    assert (e.kind, e.action, e.zd_number, e.placer_id) == ("diagnostic-order", "create", "ZP100120391", "ZP100120391")
    f = e.fields
    assert f["patient.bsn"] == "900073962"
    name = f["patient.name"]
    assert (name.surname, name.own_prefix, name.own_surname, name.partner_surname) == (
        "Testpatiënt - van Zorg Domein", "van", "Zorg Domein", "Testpatiënt",
    )
    assert (f["patient.birth_date"], f["patient.sex"]) == (dt.date(1990, 12, 31), "F")
    assert f["care_product"] == Code(code="BEEEDG008", text="Echo Inwendig Gynaecologisch Transvaginaal", system="99zda")
    assert (f["insurer.name"], f["insurer.policy"]) == ("VGZ", "7078337300")
    assert (f["referrer.agb"], f["referrer.name"]) == ("01223344", "Jansen, L.")
    assert f["ordered_at"] == dt.datetime(2025, 11, 12, 12, 51, 8, tzinfo=AMS_WINTER)
    assert (f["priority"], f["collection"]) == ("R", "O")
    assert [t["test"].code for t in f["tests"]] == ["ECHOXU", "TIJD"]
    echo = f["tests"][0]  # each test with its own values (its ORC group's)
    assert echo["test"] == Code(code="ECHOXU", text="Echo transvaginaal", system="99zdl")
    assert (echo["control"], echo["priority"], echo["collection"]) == ("NW", "R", "O")
    assert echo["reason"].startswith("perimenopauzaal") and "reason" not in f["tests"][1]
    rede, anam = f["questions"]
    assert (rede["code"], rede["text"]) == ("REDE", "Reden van aanvraag")
    assert rede["answer"].startswith("perimenopauzaal frequent vaginaal BV\naanw voor myomen?")  # \.br\
    assert anam["code"] == "ANAM"


def test_orm_lab_order_reads_the_coded_answer(bundled):
    _, e = mapped(bundled, sample(ZD / "zd_orm_o01_lab_v24.hl7"))
    assert (e.action, e.zd_number) == ("create", "ZD12345678")
    f = e.fields
    assert (f["patient.bsn"], f["patient.sex"], f["insurer.uzovi"]) == ("123456782", "M", "123")
    assert [t["test"].code for t in f["tests"]] == ["CRP", "TIJD"]
    symptom, urgency = f["questions"]
    assert (symptom["code"], symptom["answer"]) == ("COVIDSYM", "false")
    assert (urgency["answer"], urgency["answer_text"]) == ("true", "Urgent (vandaag best effort NIET CITO)")
    assert f["ordered_at"] == dt.datetime(2022, 1, 2, 8, 30, tzinfo=dt.timezone.utc)


@pytest.mark.parametrize(("control", "action"), [(b"CA", "cancel"), (b"XO", "update")])
def test_orm_order_control_decides_the_action(bundled, control, action):
    raw = sample(ZD / "zd_orm_o01_lab_v24.hl7").replace(b"\rORC|NW|", b"\rORC|" + control + b"|")
    _, e = mapped(bundled, raw)
    assert e.action == action and e.fields["order_control"] == control.decode()


def test_oml_lab_order_reads_cluster_priority_and_specimen(bundled):
    _, e = mapped(bundled, sample(ZD / "zd_oml_o21_lab_v251_latin1.hl7"))
    assert (e.kind, e.action, e.zd_number, e.placer_id) == ("diagnostic-order", "create", "ZP100120391", "ZP100120391")
    f = e.fields
    assert f["cluster"] == "Laboratorium"
    assert f["priority"] == "R"  # TQ1-9
    assert [t["test"].code for t in f["tests"]] == ["LABEDG001", "ALAT"]
    assert [t.get("specimen") for t in f["tests"]] == [None, Code(code="BLD", text="Bloed", system="L")]
    assert f["specimen"] == Code(code="BLD", text="Bloed", system="L")
    assert f["insurer.uzovi"] == "0001" and f["insurer.name"] == "ZorgVerzekeraar ZDNL"
    assert "questions" not in f


def test_ref_i12_maps_a_referral_with_its_providers(bundled):
    _, e = mapped(bundled, sample(PUBLIC / "msfc_ref_i12_01.hl7"))
    # RF1-11 (11001^EXTID) is another application's id for the referral, not the HIS's booking
    assert (e.kind, e.action, e.zd_number, e.placer_id, e.filler_id) == ("referral", "create", None, "226839", None)
    f = e.fields
    assert f["referral.external_id"] == "11001"
    assert (f["referral.status"], f["referral.priority"], f["referral.category"]) == ("P", "R", "O")
    assert f["referral.effective_date"] == dt.date(2022, 1, 25)
    assert (f["referrer.name"], f["referred_to.name"]) == ("POWELL", "McWILLIAMS")
    assert "prd_specialty" not in f
    assert f["patient.name"].surname == "EVERYMAN" and f["patient.birth_date"] == dt.date(1961, 6, 15)
    assert f["diagnosis"] == Code(code="K63.3", text="Ulcer of Intestine", system="I10")


REF_NL = (
    "MSH|^~\\&|HUISARTS|PRAKTIJK|KOPPEL|ZIEKENHUIS|20250301101500+0100||REF^{trigger}^REF_I12|R1|P|2.5\r"
    "RF1|A^Accepted|R|Med||O|ZD123456789||||||\r"
    "PRD|RP^Referring Provider|Huisarts^J.||||||\r"
    "PRD|RT^Referred to Provider~0320^Cardiologie^VEKTIS|Cardioloog^K.||||\r"
    "PID|1||123456782^^^NLMINBIZA^NNNLD||de Vries&de&Vries^J^^^^^L||19700101|V\r"
)


@pytest.mark.parametrize(("trigger", "action"), [("I12", "create"), ("I13", "update"), ("I14", "cancel")])
def test_ref_triggers_and_the_referred_to_specialty(bundled, trigger, action):
    _, e = mapped(bundled, REF_NL.format(trigger=trigger).encode("latin-1"))
    assert (e.kind, e.action, e.zd_number, e.placer_id) == ("referral", action, "ZD123456789", "ZD123456789")
    f = e.fields
    assert f["prd_specialty"] == "0320"
    assert (f["patient.bsn"], f["patient.sex"]) == ("123456782", "F")  # V(rouw) -> F
    assert (f["referrer.name"], f["referred_to.name"]) == ("Huisarts", "Cardioloog")


@pytest.mark.parametrize(
    ("name", "action", "status"),
    [("s12", "book", "Booked"), ("s13", "reschedule", "Booked"), ("s14", "update", "Booked"), ("s15", "cancel", "Cancelled")],
)
def test_siu_samples_map_to_appointments(bundled, name, action, status):
    _, e = mapped(bundled, sample(PUBLIC / f"msfc_siu_{name}.hl7"))
    assert (e.kind, e.action, e.zd_number, e.placer_id, e.filler_id) == ("appointment", action, None, "12345", "36996")
    f = e.fields
    expected_start = dt.datetime(2020, 10, 1, 9, 11, tzinfo=dt.timezone.utc)  # 11:26+02:15
    assert f["booked_start"] == expected_start
    assert f["booked_start"].utcoffset() == dt.timedelta(hours=2)  # shown in Amsterdam time
    assert f["filler_status"] == status
    assert f["booked_service"] == Code(code="76164006", text="Biopsy of colon (procedure)", system="SCT")
    assert (f["duration"], f["booked_location"]) == ("60", "055")
    assert f["patient.birth_date"] == dt.date(1988, 8, 18)


def test_siu_booked_start_falls_back_to_ais4(bundled):
    raw = sample(PUBLIC / "msfc_siu_s12.hl7")
    header, _, rest = raw.partition(b"\rSCH|")
    sch, _, tail = rest.partition(b"\r")
    fields = sch.split(b"|")
    fields[10] = b""  # SCH-11 gone
    _, e = mapped(bundled, header + b"\rSCH|" + b"|".join(fields) + b"\r" + tail)
    assert e.fields["booked_start"] == dt.datetime(2021, 9, 24, 7, 15, tzinfo=dt.timezone.utc)  # AIS-4


def test_siu_zd_number_is_taken_from_pid3_when_the_scheduler_sends_it(bundled):
    raw = sample(PUBLIC / "msfc_siu_s12.hl7").replace(b"~123456789^^^USSSA^SS|", b"~ZD200046139^^^ZorgDomein^VN|")
    _, e = mapped(bundled, raw)
    assert e.zd_number == "ZD200046139"


# ---------------------------------------------------------------------------------------
# Mapping errors: clean, located, without values


def test_a_missing_required_field_names_file_line_field_and_path(bundled):
    raw = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(b"ARQ|ZD200046139|", b"ARQ||")
    _, result = apply(bundled, raw)
    assert result.event is None
    (error,) = result.errors
    assert error.file.endswith("zorgdomein-srm.yaml") and error.field == "zd_number" and error.path == "ARQ-1.1"
    assert error.reason == "missing (required)"
    line = next(i for i, text in enumerate((MAPPINGS / "zorgdomein-srm.yaml").read_text().splitlines(), 1)
                if text.startswith("  zd_number:"))
    assert error.line == line
    assert str(error) == f"{error.file}:{line}: zd_number (ARQ-1.1): missing (required)"


def test_a_bad_value_is_an_error_that_does_not_repeat_the_value(bundled):
    raw = sample(ZD / "zd_orm_o01_lab_v24.hl7").replace(b"123456782^^^NLMINBIZA", b"123456789^^^NLMINBIZA")
    _, result = apply(bundled, raw)
    (error,) = result.errors
    assert (error.field, error.path) == ("patient.bsn", "PID-3[4=NLMINBIZA].1")
    assert "bsn" in error.reason and "123456789" not in str(error)


def test_an_unknown_code_is_an_error_naming_the_table(bundled):
    raw = sample(ZD / "zd_orm_o01_lab_v24.hl7").replace(b"\rORC|NW|", b"\rORC|SC|")
    _, result = apply(bundled, raw)
    (error,) = result.errors  # ORC-1 of every test is read: the error names the one refused
    assert (error.field, error.path, error.reason) == ("action", "ORC[1]-1", "value not in table (inline)")


def test_an_attachment_without_data_names_the_item(bundled):
    raw = sample(ZD / "zd_oru_r01_attachments.hl7").replace(b"^image^png^Base64^iVBOR", b"^image^png^Base64^", 1)
    raw = raw.replace(b"^Base64^|", b"^Base64|")
    lines = raw.split(b"\r")
    lines = [line if not line.startswith(b"OBX|2|") else b"OBX|2|ED|BLOB^Bijlage^ZORGDOMEIN|2|^image^png^Base64||||||F"
             for line in lines]
    _, result = apply(bundled, b"\r".join(lines))
    (error,) = result.errors
    # the item's own OBX (the second), not the first one's path
    assert (error.field, error.path, error.reason) == ("attachments[2].data", "OBX[2]-5.5", "missing (required)")


# ---------------------------------------------------------------------------------------
# Never raising on message content


SECRET = "QQSECRET"
_segment_names = st.sampled_from(["PID", "ARQ", "ORC", "OBR", "OBX", "NTE", "SCH", "AIS", "AIL", "AIG", "PRD", "RF1",
                                  "PV2", "IN1", "TQ1", "SPM", "MSH"])
_chars = st.sampled_from(list("|^~\\&_#AZaz09 .-+éX\r\n") + ["\\.br\\", "\\X0D\\", "\\F\\", "\\E\\", "\\X", '""', SECRET])
_text = st.lists(_chars, max_size=40).map("".join)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    base=st.sampled_from(sorted(p.name for p in ZD.glob("*.hl7")) + ["msfc_ref_i12_01.hl7", "msfc_siu_s12.hl7"]),
    edits=st.lists(st.tuples(_segment_names, st.integers(1, 40), _text), max_size=6),
    repeat=st.integers(0, 3),
    drop=st.sets(_segment_names, max_size=3),
)
def test_arbitrary_field_contents_give_an_event_or_clean_errors(bundled, base, edits, repeat, drop):
    raw = ((ZD / base) if (ZD / base).exists() else (PUBLIC / base)).read_bytes()
    header = read_header(raw, default_charset="8859/1")
    mapping = bundled.for_type(header.type_and_trigger)
    text = raw.decode(header.codec)
    lines = [line for line in text.replace("\n", "\r").split("\r") if line]
    lines = [lines[0]] + [line for line in lines[1:] if line[:3] not in drop]
    sep = lines[0][3]
    for name, number, value in edits:
        for i, line in enumerate(lines):
            if line[:3] == name and (name != "MSH" or number > 2):
                fields = line.split(sep)
                fields += [""] * (number + 1 - len(fields))
                fields[number if name != "MSH" else number - 1] = value
                lines[i] = sep.join(fields)
                break
    lines += lines[1:] * repeat  # huge repetitions of whole groups
    message = Message.parse("\r".join(lines).encode(header.codec, "replace"), codec=header.codec)
    result = mapping.apply(message)
    assert (result.event is None) == bool(result.errors)
    for error in result.errors:
        assert SECRET not in str(error) and SECRET not in error.reason
        assert error.file.endswith(".yaml") and error.line >= 1 and error.field
    if result.event is not None:
        build_outbound(mapping, result.event, NEW_ENTRY, control_id="K1", timestamp=NOW)


def test_huge_repetitions_and_groups_still_map(bundled):
    raw = sample(ZD / "zd_oru_r01_attachments.hl7")
    raw = raw.replace(b"PID|1||^^^NLMINBIZA^NNNLD|", b"PID|1||" + b"x^^^OTHER_" * 20000 + b"^^^NLMINBIZA^NNNLD|")
    obx = b"\rOBX|9|ED|BLOB^Bijlage^ZORGDOMEIN|9|^text^plain^Base64^QQ==||||||F\rNTE|9|P|n.txt|RE"
    _, e = mapped(bundled, raw.rstrip(b"\r") + obx * 2000)
    assert len(e.fields["attachments"]) == 2002


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=400))
def test_arbitrary_bytes_never_raise(bundled, data):
    for mapping in bundled.mappings:
        result = mapping.apply(Message.parse(b"MSH|^~\\&|" + data, codec="iso8859-1"))
        assert (result.event is None) == bool(result.errors)


# ---------------------------------------------------------------------------------------
# Outbound messages


def hl7apy_parse(data: bytes, level):
    from hl7apy.parser import parse_message

    return parse_message(data.decode("latin-1"), validation_level=level, find_groups=True)


def strictly_valid(data: bytes):
    """``data`` parsed and validated by hl7apy, tolerant and strict; its header, read back."""
    from hl7apy.consts import VALIDATION_LEVEL

    for level in (VALIDATION_LEVEL.TOLERANT, VALIDATION_LEVEL.STRICT):
        hl7apy_parse(data, level).validate()
    return read_header(data, default_charset="ASCII")


def test_srm_create_builds_a_strictly_valid_siu_s12_for_the_his(bundled):
    mapping, e = mapped(bundled, sample(ZD / "zd_srm_s01_appointment_request.hl7"))
    ((to, data),) = build_outbound(mapping, e, NEW_ENTRY, control_id="K0000001", timestamp=NOW)
    assert to == "his-scheduling"
    header = strictly_valid(data)
    assert header.rejection is None
    assert (header.type_and_trigger, header.structure, header.control_id, header.version) == (
        "SIU^S12", "SIU_S12", "K0000001-1", "2.5",  # -1: the mapping's first outbound (-2: the SIU^S15)
    )
    assert header.hl7_charset == "8859/1" and header.field(7) == b"20260102030405+0100"
    assert "Patiënt".encode("latin-1") in data  # encoded in the template charset
    _, back = parse(data)
    from engine.core.paths import first, parse_path

    assert first(back, parse_path("SCH-1.1")) == "ZD200046139"
    assert first(back, parse_path("PID-5.1.1")) == "de Boer"
    assert first(back, parse_path("SCH-11.4")) == "20160329"  # ARQ-11 sent as dates: as sent
    assert first(back, parse_path("AIL-3.4.1")) == "01059998"


def thin_cancel(raw_request: bytes) -> bytes:
    """ZorgDomein's S04 for a request, carrying less than the request did: no referrer (ARQ-15
    on), no name, birth date or sex (PID-5/7/8)."""
    segments = raw_request.replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S04").split(b"\r")
    for number, segment in enumerate(segments):
        if segment.startswith(b"ARQ|"):
            segments[number] = b"|".join(segment.split(b"|")[:13])
        elif segment.startswith(b"PID|"):
            segments[number] = b"|".join(segment.split(b"|")[:4])
    return b"\r".join(segments)


def test_srm_cancel_sends_the_his_a_strictly_valid_siu_s15_naming_its_booking(bundled):
    """ZorgDomein's SRM^S04: the HIS, which got the request as SIU^S12, must learn it is off
    (before, nothing was sent and a planner could book a cancelled referral); with the HIS's
    own id (SCH-2) when it had booked it. The patient and referrer come from the entry (here
    as the store gives it back: dates as ISO text), so a cancel that carries less than its
    request still gives a complete S15 (before, one without PID-5 or SCH-16, which a strict
    HIS refuses, and sex U)."""
    from engine.core.agenda import plain
    from engine.core.paths import first, parse_path

    request = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(b"|20000101|U|", b"|20000101|M|")
    _, requested = mapped(bundled, request)
    stored = plain(requested.fields)
    mapping, e = mapped(bundled, thin_cancel(request))
    assert "patient.name" not in e.fields and "referrer.agb" not in e.fields  # thin indeed
    for booked_as in ("F778", None):
        entry = SimpleNamespace(id=1, state="cancelled", previous_state="booked" if booked_as else "requested",
                                filler_id=booked_as, zd_number="ZD200046139", data=stored)
        ((to, data),) = build_outbound(mapping, e, entry, control_id="K1", timestamp=NOW,
                                       sent={"his-scheduling": "SIU^S12"})
        assert to == "his-scheduling"
        header = strictly_valid(data)
        assert (header.type_and_trigger, header.structure, header.version) == ("SIU^S15", "SIU_S12", "2.5")
        _, back = parse(data)
        assert first(back, parse_path("SCH-1.1")) == "ZD200046139"  # as in the SIU^S12 it cancels
        assert first(back, parse_path("SCH-2.1")) == (booked_as or None)
        assert first(back, parse_path("SCH-25.1")) == "Cancelled"
        assert first(back, parse_path("PID-3[4=ZorgDomein].1")) == "ZD200046139"
        assert first(back, parse_path("PID-5.1.1")) == "de Boer"
        assert (first(back, parse_path("PID-7")), first(back, parse_path("PID-8"))) == ("20000101", "M")
        assert first(back, parse_path("SCH-16.1")) == "01004567"


@pytest.mark.parametrize(("last_sent", "filler", "previous", "sent"), [
    ("SIU^S12", None, "requested", True),  # the HIS had the request
    ("SIU^S12", None, "cancelled", False),  # closed already: by the HIS itself (its own S15) or a cancel that told it
    ("SIU^S15", None, "requested", False),  # told already
    (None, None, "requested", False),  # a REF^I12's referral: the HIS never had it
    (None, "F778", "booked", True),  # the HIS booked it itself
    (None, "F778", "cancelled", False),  # ... and the HIS cancelled it itself
    (None, None, "ordered", False),  # an order the HIS neither had a request for nor booked
    ("unknown", None, "requested", True),  # stored before Koppel kept what it sent
    ("unknown", None, "ordered", False),
])
def test_a_cancel_goes_to_the_his_only_when_the_his_knows_and_was_not_told(bundled, last_sent, filler, previous, sent):
    raw = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S04")
    mapping, e = mapped(bundled, raw)
    entry = SimpleNamespace(id=1, state="cancelled", previous_state=previous, filler_id=filler, zd_number="ZD200046139",
                            data={})
    built = build_outbound(mapping, e, entry, control_id="K1", timestamp=NOW,
                           sent={} if last_sent is None else {"his-scheduling": last_sent})
    assert [to for to, _ in built] == (["his-scheduling"] if sent else [])


def test_the_s15_from_entry_data_as_stored_equals_the_s15_from_entry_data_as_mapped(bundled):
    """Entry data is typed in the batch that mapped it and plain JSON once read back from the
    store; the HIS must get the same message either way (ISO dates as HL7, a birth month as
    sent)."""
    from engine.core.agenda import plain

    request = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(b"|20000101|", b"|200006|")
    _, requested = mapped(bundled, request)
    assert requested.fields["patient.birth_date"].__class__.__name__ == "PartialDate"
    mapping, e = mapped(bundled, thin_cancel(request))
    built = [build_outbound(mapping, e, SimpleNamespace(id=1, state="cancelled", previous_state="requested",
                                                        filler_id=None, zd_number="ZD200046139", data=data),
                            control_id="K1", timestamp=NOW, sent={"his-scheduling": "SIU^S12"})
             for data in (dict(requested.fields), plain(requested.fields))]
    assert built[0] == built[1]
    _, back = parse(built[0][0][1])
    from engine.core.paths import first, parse_path

    assert first(back, parse_path("PID-7")) == "200006"


def test_srm_create_sends_no_cancellation_and_a_cancel_of_an_open_entry_none_either(bundled):
    raw = sample(ZD / "zd_srm_s01_appointment_request.hl7")
    mapping, e = mapped(bundled, raw)
    sent = build_outbound(mapping, e, SimpleNamespace(id=1, state="cancelled", filler_id=None),
                          control_id="K1", timestamp=NOW)
    assert sent == []  # the request of an entry already cancelled: neither an S12 nor an S15
    cancel = raw.replace(b"SRM^S01^SRM_S01", b"SRM^S04^SRM_S04")
    mapping, e = mapped(bundled, cancel)
    assert build_outbound(mapping, e, NEW_ENTRY, control_id="K1", timestamp=NOW) == []


def test_event_values_are_escaped_with_the_template_delimiters(bundled):
    raw = sample(ZD / "zd_srm_s01_appointment_request.hl7").replace(
        b"de Boer&de&Boer^Willem", b"de Boer\\F\\x\\S\\y\\R\\z\\E\\&de&Boer^Willem"
    )
    mapping, e = mapped(bundled, raw)
    assert e.fields["patient.name"].surname == "de Boer|x^y~z\\"
    ((_, data),) = build_outbound(mapping, e, NEW_ENTRY, control_id="K1", timestamp=NOW)
    assert b"de Boer\\F\\x\\S\\y\\R\\z\\E\\&de&Boer" in data
    _, back = parse(data)
    from engine.core.paths import first, parse_path

    assert first(back, parse_path("PID-5.1.1")) == "de Boer|x^y~z\\"


def test_orm_builds_one_orc_and_obr_per_test_for_the_ris(bundled):
    from hl7apy.consts import VALIDATION_LEVEL

    mapping, e = mapped(bundled, sample(ZD / "zd_orm_o01_echo_v24_latin1.hl7"))
    ((to, data),) = build_outbound(mapping, e, entry_of(e), control_id="K2", timestamp=NOW)
    assert to == "ris-orders"
    for level in (VALIDATION_LEVEL.TOLERANT, VALIDATION_LEVEL.STRICT):
        parsed = hl7apy_parse(data, level)  # hl7apy models ORM's OBR/RQD/... choice as all-required,
        orders = [c for c in parsed.children if c.name == "ORM_O01_ORDER"]  # so validate() is not used
        assert len(orders) == 2
    header = read_header(data, default_charset="ASCII")
    assert (header.type_and_trigger, header.control_id, header.version, header.hl7_charset) == (
        "ORM^O01", "K2-1", "2.4", "8859/1",
    )
    _, back = parse(data)
    assert [s.field(4).split("^")[0] for s in back.segments("OBR")] == ["ECHOXU", "TIJD"]
    assert [s.field(1) for s in back.segments("OBR")] == ["1", "2"]
    assert {s.field(1) for s in back.segments("ORC")} == {"NW"}
    assert "Testpatiënt".encode("latin-1") in data


def test_oru_builds_an_mdm_t02_with_every_attachment_for_the_archive(bundled):
    mapping, e = mapped(bundled, sample(ZD / "zd_oru_r01_attachments.hl7"))
    ((to, data),) = build_outbound(mapping, e, NEW_ENTRY, control_id="K3", timestamp=NOW)
    assert to == "document-archive"
    header = strictly_valid(data)
    assert (header.type_and_trigger, header.control_id, header.version) == ("MDM^T02", "K3", "2.5")
    _, back = parse(data)
    assert [s.field(2) for s in back.segments("OBX")] == ["ED", "ED"]
    assert [s.field(3) for s in back.segments("NTE")] == ["HL7.doc", "ZD_logo_kleur_RGB.png"]
    assert back.segments("OBX")[0].field(5).startswith("ZorgDomein^application^msword^Base64^0M8R4KGx")


def test_a_pdf_letter_builds_a_tolerantly_valid_mdm(bundled):
    from hl7apy.consts import VALIDATION_LEVEL

    mapping, e = mapped(bundled, sample(ZD / "zd_oru_r01_request_form_pdf.hl7"))
    ((_, data),) = build_outbound(mapping, e, NEW_ENTRY, control_id="K4", timestamp=NOW)
    # STRICT refuses ED data over 2.5's 199 characters, which every real letter exceeds
    hl7apy_parse(data, VALIDATION_LEVEL.TOLERANT).validate()
    assert b"^application^pdf^Base64^JVBERi0xLjQK" in data


# ---------------------------------------------------------------------------------------
# Config errors: every problem, located


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def problems(directory: Path) -> list[str]:
    with pytest.raises(ConfigError) as raised:
        load_mappings(directory)
    return [str(p).replace(str(directory) + "/", "") for p in raised.value.problems]


MINIMAL = """
name: test
types: [SRM^S01]
event:
  kind: {value: appointment-request}
  action: {value: create}
"""


def test_a_minimal_mapping_loads(tmp_path):
    write(tmp_path, "test.yaml", MINIMAL)
    write(tmp_path, "agendas.yaml", "not: a mapping file\n")  # the agenda layer's file is not read here
    loaded = load_mappings(tmp_path)
    assert loaded.for_type("SRM^S01").name == "test"


def test_unknown_keys_bad_paths_converts_and_tables_are_all_reported_with_locations(tmp_path):
    write(tmp_path, "tables/sex.csv", "code,value\nM,M\n")
    write(tmp_path, "bad.yaml", """
        name: bad
        types: [SRM^S01]
        event:
          kind: {value: appointment-request}
          action: {value: create, requird: true}
          zd_number: {from: ARQ-1.x}
          patient.bsn: {from: "PID-3[4=NLMINBIZA].1", convert: bsm}
          patient.sex: {from: PID-8, table: gender}
          care_product: {from: ARQ-7.1, convert: code}
          urgency: {from: ARQ-8, value: x}
        outbound:
          - {to: his, template: nope.yaml, whenn: {}}
        """)
    found = problems(tmp_path)
    assert found == [
        "bad.yaml:5:27: event.action.requird: unknown key; did you mean required?",
        # column 27 is the "x" in ARQ-1.x: the path's own column carried into the file
        "bad.yaml:6:27: event.zd_number.from: bad field path at column 7: expected component number (a number)",
        "bad.yaml:7:56: event.patient.bsn.convert: unknown convert 'bsm'; did you mean bsn?",
        "bad.yaml:8:37: event.patient.sex.table: unknown table 'gender' (tables: sex)",
        "bad.yaml:9:24: event.care_product.from: convert code reads the components itself: "
        "name a whole field or repetition, e.g. PID-5 or ARQ-7",
        "bad.yaml:10:12: event.urgency: needs exactly one of from, value, first (got from and value)",
        "bad.yaml:12:36: outbound[0].whenn: unknown key; did you mean when?",
        "bad.yaml:12:25: outbound[0].template: unknown template 'nope.yaml' (templates: none in templates/)",
    ]


def test_a_path_error_points_at_the_column_inside_a_quoted_path(tmp_path):
    write(tmp_path, "bad.yaml", MINIMAL + '  zd_number: {from: "PID-3[x].1"}\n')
    (problem,) = problems(tmp_path)
    assert problem.startswith("bad.yaml:6:")
    line, col = problem.split(":")[1:3]
    text = (tmp_path / "bad.yaml").read_text().splitlines()[int(line) - 1]
    assert text[int(col) - 1 :].startswith("x].1")


def test_kind_action_and_their_tables_are_checked_at_load(tmp_path):
    write(tmp_path, "bad.yaml", """
        name: bad
        types: [SRM]
        event:
          kind: {value: appointment}
          action: {from: MSH-9.2, table: {S01: create, S04: delete}}
          patient.sex: {from: PID-8, default: "", convert: date}
        """)
    assert problems(tmp_path) == [
        "bad.yaml:6:39: event.patient.sex.default: date gives no value for it",
        "bad.yaml:5:53: event.action.table.S04: 'delete' is not one of: "
        "create, update, cancel, complete, attach, book, reschedule",
    ]


def test_missing_kind_and_duplicate_types_across_files(tmp_path):
    write(tmp_path, "a.yaml", MINIMAL)
    write(tmp_path, "b.yaml", """
        name: other
        types: [SRM^S01]
        event:
          kind: {value: referral}
        """)
    found = problems(tmp_path)
    assert "b.yaml:4:3: event.action: missing (required: every event has a kind and an action)" in found
    assert any(p.startswith("b.yaml:2:9: types: SRM^S01 is already mapped by ") and p.endswith("a.yaml:2")
               for p in found)


def test_csv_tables_need_their_header_and_unique_codes(tmp_path):
    write(tmp_path, "tables/sex.csv", "code,value\nM,M\nF,F\nM,F\n")
    write(tmp_path, "tables/bad.csv", "key;value\n")
    write(tmp_path, "test.yaml", MINIMAL + "  patient.sex: {from: PID-8, table: sex}\n")
    assert problems(tmp_path) == [
        "tables/bad.csv:1:1: (table): the first row must be the header code,value",
        "tables/sex.csv:4:1: (table).M: code listed twice (first at line 2)",
    ]


def test_a_broken_table_named_by_kind_is_reported_not_crashed_on(tmp_path):
    write(tmp_path, "tables/kinds.csv", "key;value\n")
    write(tmp_path, "test.yaml", MINIMAL.replace("{value: appointment-request}", "{from: MSH-9.2, table: kinds}"))
    assert problems(tmp_path) == ["tables/kinds.csv:1:1: (table): the first row must be the header code,value"]


def test_template_problems_are_located_in_the_template_file(tmp_path):
    write(tmp_path, "templates/t.yaml", """
        message: SIU^S12
        version: 2.5x
        charset: latin-9
        segments:
          - MSH: {3: A, 10: X}
          - PID: {3: "{patient.bsn", 5: [[a], b], x: y}
          - for_each: tests
            segments:
              - OBR: {4: "{item.code}|"}
          - OBR: {4: "{item.code}"}
        """)
    write(tmp_path, "test.yaml", MINIMAL + "outbound:\n  - {to: his, template: t.yaml}\n")
    assert problems(tmp_path) == [
        "templates/t.yaml:2:10: version: '2.5x' is not an HL7 v2 version like \"2.5\" (quote it)",
        "templates/t.yaml:3:10: charset: unknown HL7 charset 'latin-9'",
        "templates/t.yaml:5:17: segments[0].MSH.10: MSH-10 is filled by the builder",
        "templates/t.yaml:6:14: segments[1].PID.3: unmatched { or } (placeholders look like {patient.bsn})",
        "templates/t.yaml:6:43: segments[1].PID.x: expected a field number from 1 to 999",
        "templates/t.yaml:9:18: segments[2].segments[0].OBR.4: literal text must not contain '|' or line breaks",
        "templates/t.yaml:10:14: segments[3].OBR.4: {item.code} is only known inside a for_each block",
    ]


def test_yaml_syntax_errors_are_located(tmp_path):
    write(tmp_path, "bad.yaml", "name: [unclosed\n")
    (problem,) = problems(tmp_path)
    assert problem.startswith("bad.yaml:2:1: (yaml): YAML syntax:")


def test_merge_keys_share_value_specs_and_list_specs_as_in_channel_files(tmp_path):
    write(tmp_path, "test.yaml", MINIMAL + (
        "  message.id: &msh10 {from: MSH-10, required: true}\n"
        "  message.copy: {<<: *msh10}\n"
        "  resources: &resources\n"
        "    for_each: {anchor: AIS, members: [AIG, AIL, AIP]}\n"
        "    item: {from: AIS-3.2}\n"
        "  resources_again: {<<: *resources}\n"
    ))
    loaded = load_mappings(tmp_path)
    _, e = mapped(loaded, sample(ZD / "zd_srm_s01_appointment_request.hl7"))
    assert e.fields["message.id"] == e.fields["message.copy"] == "g20ce6a9f8ca4f551275"
    assert e.fields["resources"] == e.fields["resources_again"] == ("consult cardioloog",)


def test_a_merge_of_something_other_than_a_mapping_is_reported_where_it_is_written(tmp_path):
    write(tmp_path, "bad.yaml", MINIMAL + "  message.id: {<<: [MSH-10], from: MSH-10}\n")
    assert problems(tmp_path) == ["bad.yaml:6:21: event.message.id.<<: can only merge a mapping, got 'MSH-10'"]


@pytest.mark.parametrize(("stored", "sent"), [
    ("2000-01-01", "20000101"),
    ("2000-06", "200006"),
    ("2000", "2000"),
    ("2016-03-29T09:30:00+02:00", "20160329093000+0200"),
    ("2016-03-29T09:30+01:00", "20160329093000+0100"),
    ("de Boer", "de Boer"),
    ("2000-01-01 and later", "2000-01-01 and later"),  # text, not a stored date
    ("2016-03-29T25:00:00", "2016-03-29T25:00:00"),  # not a time: as it is
    ("CARREG001", "CARREG001"),
])
def test_entry_placeholders_give_stored_dates_in_hl7_form_and_other_text_as_it_is(stored, sent):
    from engine.mapping import _format, _resolve

    entry = SimpleNamespace(id=1, state="requested", data={"patient.birth_date": stored})
    for name in ("entry.patient.birth_date", "entry.data.patient.birth_date"):
        assert _format(_resolve(name, NO_EVENT, entry, None, None)) == sent
    assert _resolve("entry.patient.unknown", NO_EVENT, entry, None, None) is None
    assert _resolve("entry.state", NO_EVENT, entry, None, None) == "requested"  # an entry attribute first


def test_when_as_a_list_of_condition_maps_holds_when_any_does_and_each_problem_is_located(tmp_path):
    write(tmp_path, "templates/t.yaml", """
    message: SIU^S15^SIU_S12
    version: "2.5"
    charset: 8859/1
    segments:
      - SCH: {1: "{zd_number}"}
    """)
    write(tmp_path, "test.yaml", MINIMAL + """outbound:
  - to: his
    when:
      - {action: cancel}
      - {action: create, entry.state: requested}
    template: t.yaml
""")
    (outbound,) = load_mappings(tmp_path).mapping("test").outbound
    event = SimpleNamespace(fields={}, action="create", kind="appointment-request", zd_number="ZD200046139",
                            placer_id=None, filler_id=None)
    from engine.mapping import _when_matches

    assert _when_matches(outbound, event, SimpleNamespace(state="requested"), None)
    assert not _when_matches(outbound, event, SimpleNamespace(state="booked"), None)
    assert _when_matches(outbound, SimpleNamespace(**{**vars(event), "action": "cancel"}),
                         SimpleNamespace(state="booked"), None)
    write(tmp_path, "test.yaml", MINIMAL + """outbound:
  - to: his
    when:
      - {action: cancel}
      - [not, a, map]
    template: t.yaml
  - to: his
    when: []
    template: t.yaml
""")
    assert problems(tmp_path) == [
        "test.yaml:10:9: outbound[0].when[1]: expected a mapping, got a list",
        "test.yaml:13:11: outbound[1].when: expected at least one condition map",
    ]


def test_prefer_picks_among_every_value_the_path_selects_and_is_checked_at_load(tmp_path):
    """ORC[*]-1 of CA and XO: an update (one test changed, one cancelled); all CA: a cancel."""
    write(tmp_path, "orders.yaml", """
        name: orders
        types: [ORM^O01]
        event:
          kind: {value: diagnostic-order}
          action: {from: "ORC[*]-1", table: {NW: create, CA: cancel, XO: update}, prefer: [create, update, cancel]}
    """)
    mapping = load_mappings(tmp_path).mapping("orders")

    def action(*controls: str) -> str:
        raw = "MSH|^~\\&|ZD||K||20260101||ORM^O01|1|P|2.4\r" + "".join(f"ORC|{c}|P{i}\r" for i, c in enumerate(controls))
        return mapping.apply(Message.parse(raw.encode(), codec="latin-1")).event.action

    assert [action("CA", "XO"), action("XO", "CA"), action("CA", "CA"), action("CA", "NW")] == [
        "update", "update", "cancel", "create"]
    (tmp_path / "orders.yaml").unlink()
    write(tmp_path, "bad.yaml", """
        name: bad
        types: [ORM^O01]
        event:
          kind: {value: diagnostic-order, prefer: [x]}
          action: {from: "ORC[*]-1", table: {NW: create}, prefer: [create, remove]}
    """)
    assert problems(tmp_path) == [
        "bad.yaml:4:43: event.kind.prefer: prefer goes with from (a path that selects several values, "
        "e.g. ORC[*]-1) and no structured convert",
        "bad.yaml:5:68: event.action.prefer[1]: 'remove' is not a value of its table",
    ]


NAMED = """
name: named
types: [ORM^O01]
event:
  kind: {value: diagnostic-order}
  action: {from: ORC-1, table: {NW: create, CA: cancel}}
  zd_number: {from: ORC-4.1}
  patient.name: {from: PID-5, convert: dutch_name}
  care_product: {from: PV2-3, convert: code}
  ordered_at: {from: ORC-9, convert: dtm}
  tests:
    for_each: {anchor: ORC, members: [OBR]}
    item:
      test: {from: OBR-4, convert: code}
      placer: {from: ORC-2.1}
outbound:
  - to: ris
    when: {%s}
    template: t.yaml
"""
TEMPLATE_HEAD = 'message: ORM^O01^ORM_O01\nversion: "2.4"\ncharset: 8859/1\nsegments:\n  - MSH: {3: KOPPEL}\n'


@pytest.mark.parametrize("segments, when, expected", [
    # names every mapping can read: no problem
    ('  - PID: {5: "{patient.name.surname}", 7: "{ordered_at.year}", 9: "{entry.care_product.code}"}\n'
     '  - for_each: tests\n    segments:\n      - OBR: {1: "{index}", 2: "{item.placer}", 4: "{item.test.text}"}\n',
     "action: [create, cancel], entry.state: [ordered, scheduled], entry.last_sent: ORM^O01, kind: diagnostic-order",
     []),
    ('  - PID: {5: "{patient.nme.surname}"}\n', "action: create",
     ["templates/t.yaml:6:14: segments[1].PID.5: {patient.nme.surname}: no mapping that uses this template sets "
      "'patient.nme.surname' (did you mean 'patient.name'?)"]),
    ('  - PID: {5: "{patient.name.surnam}", 6: "{care_product.cod}"}\n', "action: create",
     ["templates/t.yaml:6:14: segments[1].PID.5: {patient.name.surnam}: no mapping that uses this template sets 'patient.name.surnam' (did you mean 'patient.name'?)",
      "templates/t.yaml:6:42: segments[1].PID.6: {care_product.cod}: no mapping that uses this template sets 'care_product.cod' (did you mean 'care_product'?)"]),
    ('  - for_each: tests\n    segments:\n      - OBR: {2: "{item.placr}"}\n', "action: create",
     ["templates/t.yaml:8:18: segments[1].segments[0].OBR.2: {item.placr}: no item of 'tests' has 'placr'"]),
    ('  - PID: {3: "{entry.zd_numbr}"}\n', "action: create",
     ["templates/t.yaml:6:14: segments[1].PID.3: {entry.zd_numbr}: no mapping sets 'zd_numbr', so entry data never holds it (did you mean 'zd_number'?)"]),
    ('  - PID: {3: "{zd_number}"}\n', "acton: create, entry.state: requestd",
     ["named.yaml:17:12: outbound[0].when.acton: this mapping never sets 'acton' (did you mean 'action'?)",
      "named.yaml:17:27: outbound[0].when.entry.state: 'requestd' is never the entry.state: did you mean 'requested'? "
      "(requested, booked, rescheduled, modified, cancelled, completed, ordered, scheduled)"]),
    ('  - PID: {3: "{zd_number}"}\n', "action: [create, 'cancel*', ''], entry.previous_state: '*'", []),
    ('  - AIL: {3: ["{agenda.id}", "{agenda.nme}"]}\n', "agenda.id: cardiology",
     ["named.yaml:17:12: outbound[0].when.agenda.id: a when reads the agenda as entry.agenda_id",
      "templates/t.yaml:6:30: segments[1].AIL.3[1]: {agenda.nme}: an agenda has id, name, department, location_agb"]),
])
def test_a_name_that_no_mapping_sets_is_a_config_error_where_it_is_written(tmp_path, segments, when, expected):
    """A placeholder or `when` key that can never have a value, or a `when` value that kind,
    action or a state never is, would leave a field empty or an outbound never built."""
    write(tmp_path, "named.yaml", NAMED % when)
    write(tmp_path, "templates/t.yaml", TEMPLATE_HEAD + segments)
    if not expected:
        load_mappings(tmp_path)
    else:
        assert problems(tmp_path) == expected


@pytest.mark.parametrize("name", ["agenda.name", "entry.note", "item", "index", "timestamp", "control_id"])
def test_an_event_field_named_as_a_template_reads_something_else_is_refused(tmp_path, name):
    """{agenda.name} is the agenda's, {entry.x} the entry's, {index} the block's: an event field
    of that name could never be read."""
    write(tmp_path, "m.yaml", MINIMAL + f"  {name}: {{from: PID-5}}\n")
    head = name.split(".")[0]
    assert problems(tmp_path) == [f"m.yaml:6:3: event.{name}: {head!r} is what a template's {{{head}...}} reads, "
                                  "not an event field: name it otherwise"]


@pytest.mark.parametrize("name", ["_agenda", "_sources", "_x.y"])
def test_an_event_field_named_like_the_entrys_own_bookkeeping_is_refused(tmp_path, name):
    """Entry data keeps its agenda choice and its fields' sources under _agenda and _sources: an
    event field of such a name would overwrite them (the session-18 review: a defaulted _agenda)."""
    write(tmp_path, "m.yaml", MINIMAL + f"  {name}: {{from: PID-5, default: x}}\n")
    assert problems(tmp_path) == [f"m.yaml:6:3: event.{name}: a name starting with '_' is the entry's own "
                                  "bookkeeping (_agenda, _sources, ...), not an event field: name it otherwise"]
