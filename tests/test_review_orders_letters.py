"""Review: how the bundled configuration handles ZorgDomein Integrator CE's diagnostic orders
(ORM^O01 2.4, OML^O21 2.5.1), appointment requests (SRM^S01) and letters (ORU^R01), and what
the hospital's systems get from them. Each test here fails for one defect found.

Synthetic data only: made-up names, test BSN 999999990 (passes the 11-proof), synthetic AGB
codes and test ZD-numbers.
"""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path

import pytest

from engine.bundle import load_bundle
from engine.preview import preview
from tests.conftest import load_sample
from tests.test_agenda_orderings import Harness, world  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parent.parent
BSN = "999999990"
ZD = "ZD300000001"
REFERRER = "01004567^Arts^A.B.^^^^^^VEKTIS"


def _raw(segments: list[str]) -> bytes:
    return ("\r".join(segments) + "\r").encode("latin-1")


def orm(tests: list[dict], *, version: str = "2.4", control_id: str = "ORM1",
        address: str = "Dorpsstraat 12 b&Dorpsstraat&12^b^Koppelstad^^1234 AB^NL^M") -> bytes:
    """A ZorgDomein ORM^O01 as its samples have it: one ORC + OBR (+ OBX questions) per test.
    Each test: code, control (ORC-1), placer (ORC-2), priority (ORC-7.6), collection (OBR-11),
    obx (list of OBX segments' fields after OBX-1)."""
    segments = [
        f"MSH|^~\\&|ZorgDomein||OrderModule||20261201090000+0100||ORM^O01^ORM_O01|{control_id}|P|{version}|||||NLD|8859/1",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{ZD}^^^ZorgDomein^VN||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F|||{address}",
        "PV1|1|O|||||||||||||||||||||||||||||||||||||||||||||||||V",
        "PV2|||BEEEDG008^Echo buik^99zda",
        "IN1|1|^null|0001^^^VEKTIS^UZOVI|Testverzekeraar||||||||||||||||||||||||||||||||123456789",
    ]
    obx_n = 0
    for index, test in enumerate(tests, start=1):
        segments.append(f"ORC|{test.get('control', 'NW')}|{test['placer']}||{ZD}|||^^^^^{test.get('priority', 'R')}"
                        f"||20261201085900+0100|{REFERRER}||{REFERRER}")
        segments.append(f"OBR|{index}|{test['placer']}||{test['code']}^{test['code']} tekst^99zdl|||||||"
                        f"{test.get('collection', 'O')}|||||{REFERRER}")
        for obx in test.get("obx", ()):
            obx_n += 1
            segments.append(f"OBX|{obx_n}|{obx}")
    return _raw(segments)


def groups(raw: bytes) -> list[list[str]]:
    """The ORC groups of a built message (ORC and the segments up to the next ORC)."""
    result: list[list[str]] = []
    for line in raw.decode("latin-1").split("\r"):
        if line.startswith("ORC|"):
            result.append([line])
        elif result and line:
            result[-1].append(line)
    return result


def fld(segment: str, number: int, component: int = 0) -> str:
    parts = segment.split("|")
    value = parts[number] if len(parts) > number else ""
    if component:
        comps = value.split("~")[0].split("^")
        return comps[component - 1] if len(comps) >= component else ""
    return value


def segment(raw: bytes, name: str) -> str:
    for line in raw.decode("latin-1").split("\r"):
        if line.startswith(name + "|"):
            return line
    raise AssertionError(f"no {name} in the message")


def built(h: Harness, message_type: str) -> list[bytes]:
    return [h.store.get_message(m.id).raw for m in sorted(h.store.list_messages(limit=1000), key=lambda m: m.id)
            if m.origin_id is not None and m.message_type == message_type]


def mapped(raw: bytes) -> dict:
    """What `koppel map --channel zorgdomein-in FILE` says, in process."""
    bundle = load_bundle(REPO / "channels", REPO / "mappings")
    return preview(bundle, "zorgdomein-in", raw, now=dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc))


def ris_orders(raw: bytes) -> list[bytes]:
    return [o["message"].replace("\n", "\r").encode("latin-1")
            for o in mapped(raw)["outbound"] if o["to"] == "ris-orders"]


# ---------------------------------------------------------------------------------------------
# ORM^O01: every ORC/OBR group is one test with its own placer number, order control, timing
# and questions. The RIS order is built from the first group's values for every test.


def test_each_test_reaches_the_ris_with_its_own_placer_order_number():
    """DOMAIN.md: "per test: ORC (ORC-1 NW/CA/XO, ORC-2 placer number, ...)" (the OML sample
    has a different ORC-2 per test). HL7 2.4 4.5.1.2: ORC-2/OBR-2 identify each order. The
    mapping reads one `placer_id` (the first ORC-2) and the RIS template writes it on every
    test, so two exams go to the RIS under one placer number and results cannot be matched."""
    raw = orm([{"code": "ECHOABD", "placer": "PL-1"}, {"code": "ECHONIER", "placer": "PL-2"}])
    (ris,) = ris_orders(raw)
    placers = [(fld(g[0], 2, 1), fld(g[1], 2, 1)) for g in groups(ris)]
    assert placers == [("PL-1", "PL-1"), ("PL-2", "PL-2")]


def test_each_test_reaches_the_ris_with_its_own_priority_and_collection():
    """DOMAIN.md: ORC-7 priority and OBR-11 (`O` in house / `L` at home) are per test. The
    mapping reads the first ORC-7.6 and OBR-11 and the RIS template repeats them: a second,
    urgent (S) test goes to the worklist as routine (R), and one `L` as `O`."""
    raw = orm([{"code": "ECHOABD", "placer": "PL-1"},
               {"code": "ECHONIER", "placer": "PL-2", "priority": "S", "collection": "L"}])
    (ris,) = ris_orders(raw)
    second = groups(ris)[1]
    assert fld(second[1], 4, 1) == "ECHONIER"
    assert (fld(second[0], 7, 6), fld(second[1], 11)) == ("S", "L")


@pytest.mark.parametrize("controls", [("XO", "CA"), ("CA", "XO")], ids=["cancel-second", "cancel-first"])
def test_a_cancel_of_one_test_of_a_two_test_order_cancels_that_test_only(world, controls):
    """DOMAIN.md: ORC-1 NW/CA/XO is per test; HL7 2.4 4.5.1.1: ORC-1 applies to its own order.
    The event's action and `order_control` come from the first ORC alone: with CA first the
    whole entry is cancelled (and the RIS gets CA for the test that stays); with XO first the
    RIS gets XO for the cancelled test, so it never hears of the cancel."""
    h = world("partial")
    h.receive(orm([{"code": "ECHOABD", "placer": "PL-1"}, {"code": "ECHONIER", "placer": "PL-2"}]))
    h.receive(orm([{"code": "ECHOABD", "placer": "PL-1", "control": controls[0]},
                   {"code": "ECHONIER", "placer": "PL-2", "control": controls[1]}], control_id="ORM2"))
    assert h.entry().state == "ordered"  # one test is still to be done
    last = built(h, "ORM^O01")[-1]
    sent = {fld(g[1], 4, 1): fld(g[0], 1) for g in groups(last)}
    assert sent == {"ECHOABD": controls[0], "ECHONIER": controls[1]}


def test_the_ris_order_carries_each_tests_clinical_question():
    """DOMAIN.md: per test, OBX question/answer pairs (`REDE` reason, `ANAM` history). The RIS
    template has no OBX (nor OBR-13/31): the radiologist gets the exam without the reason for
    it. Each test's answers belong in its own order group."""
    raw = orm([
        {"code": "ECHOABD", "placer": "PL-1",
         "obx": ["ST|REDE^Reden van aanvraag^99zda||Pijn rechtsboven, galstenen?||||||F"]},
        {"code": "ECHONIER", "placer": "PL-2",
         "obx": ["ST|REDE^Reden van aanvraag^99zda||Nierfunctie verminderd||||||F"]},
    ])
    (ris,) = ris_orders(raw)
    first, second = ("\r".join(g) for g in groups(ris))
    assert "galstenen?" in first and "Nierfunctie" not in first
    assert "Nierfunctie verminderd" in second and "galstenen" not in second


# ---------------------------------------------------------------------------------------------
# The house-number addition (XAD-2) is lost on the way out.


def srm_with_address(address: str) -> bytes:
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    raw = raw.replace(b"PID|1||^^^NLMINBIZA", f"PID|1||{BSN}^^^NLMINBIZA".encode())
    return raw.replace(b"Herengracht 200&Herengracht&200^^Amsterdam^^1016BS^NL^M", address.encode("latin-1"))


@pytest.mark.parametrize("kind", ["ORM-to-RIS", "SRM-to-HIS"])
def test_the_house_number_addition_reaches_the_hospitals_systems(kind):
    """DOMAIN.md: "Address (XAD-1 as SAD): `street nr addition&street&nr`, XAD-2 house-number
    addition"; both ZorgDomein order samples send `...3456 b&...&3456^b^...`. The mappings
    read street and number only, and the templates write PID-11 without XAD-1.1 or XAD-2:
    the RIS and the HIS get `Dorpsstraat 12`, another address than `12 b`."""
    address = "Dorpsstraat 12 b&Dorpsstraat&12^b^Koppelstad^^1234 AB^NL^M"
    if kind == "ORM-to-RIS":
        (out,) = ris_orders(orm([{"code": "ECHOABD", "placer": "PL-1"}], address=address))
    else:
        (out,) = [o["message"].replace("\n", "\r").encode("latin-1")
                  for o in mapped(srm_with_address(address))["outbound"] if o["to"] == "his-scheduling"]
    pid11 = fld(segment(out, "PID"), 11)
    assert pid11.split("^")[0].split("&")[1:3] == ["Dorpsstraat", "12"]
    assert fld(segment(out, "PID"), 11, 2) == "b"


# ---------------------------------------------------------------------------------------------
# ORU^R01 letters: every document of a referral carries the same ZD-number.


def test_every_archived_document_of_one_referral_has_its_own_unique_document_number(world):
    """DOMAIN.md: "every document of one referral carries the same ZD-number" (the request
    form and the attachments ORU both have MSH-10 ZD200046119). HL7 2.5 9.6.1.12: TXA-12
    Unique Document Number identifies one document. The archive template writes the
    ZD-number as TXA-12 of every MDM^T02, so the archive gets the letter and its attachments
    under one document number (a duplicate key, or the second replaces the first). The
    ZD-number belongs elsewhere (TXA-14 placer order number, PID-3 VN)."""
    h = world("letters")
    srm = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7").replace(b"ZD200046139", b"ZD200046119")
    h.receive(srm)
    h.receive(load_sample("zorgdomein/zd_oru_r01_request_form_pdf.hl7"))
    h.receive(load_sample("zorgdomein/zd_oru_r01_attachments.hl7"))
    archived = built(h, "MDM^T02")
    assert len(archived) == 2
    numbers = [fld(segment(m, "TXA"), 12) for m in archived]
    assert numbers[0] != numbers[1], numbers


# ---------------------------------------------------------------------------------------------
# SRM^S01 -> SIU^S12: the referrer is the placer's contact.


def test_the_his_gets_the_referrer_as_the_placer_contact_person():
    """ARQ-15..18 are the Placer Contact Person/Phone/Address/Location (DOMAIN.md: responsible
    referrer, AGB ...^VEKTIS, phone). HL7 2.5 10.6.2: SCH-12 Placer Contact Person and SCH-13
    its phone carry them; SCH-16 is the Filler Contact Person, the hospital's own scheduler.
    The SIU^S12 puts the GP only in SCH-16 and leaves SCH-12/13 empty (the referrer's phone
    is mapped but never sent), so a HIS reading the standard takes the GP for its own staff."""
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7").replace(
        b"PID|1||^^^NLMINBIZA", f"PID|1||{BSN}^^^NLMINBIZA".encode())
    (siu,) = [o["message"].replace("\n", "\r").encode("latin-1")
              for o in mapped(raw)["outbound"] if o["to"] == "his-scheduling"]
    sch = segment(siu, "SCH")
    assert (fld(sch, 12, 1), fld(sch, 12, 9)) == ("01004567", "VEKTIS")
    assert fld(sch, 13, 1).replace("-", "") == "0152222222"


# ---------------------------------------------------------------------------------------------
# OML^O21 2.5.1: ORDER = ORC, TIMING (TQ1), OBSERVATION_REQUEST (OBR ... SPECIMEN (SPM)).


def oml(tests: list[dict], *, control_id: str = "OML1") -> bytes:
    segments = [
        f"MSH|^~\\&|ZorgDomein||Labtrain|SALT|20261201090000+0100||OML^O21^OML_O21|{control_id}|P|2.5.1|||||NLD|8859/1",
        "NTE|1|P|Laboratorium|ZD_CLUSTER_NAME^ZorgDomein clusternaam^L",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{ZD}^^^ZorgDomein^VN||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F",
        "PV1|1|O|||||||||||||||||||||||||||||||||||||||||||||||||V",
        "PV2|||LABEDG001^laboratorium^L",
        "IN1|1|^null|0001^^^VEKTIS^UZOVI|Testverzekeraar||||||||||||||||||||||||||||||||123456789",
    ]
    for index, test in enumerate(tests, start=1):
        segments += [
            f"ORC|{test.get('control', 'NW')}|{test['placer']}||{ZD}|||^^^^^{test['priority']}||20261201085900+0100|"
            f"{REFERRER}||{REFERRER}",
            f"TQ1|{index}||||||||{test['priority']}^{test['priority_text']}^HL70485",
            f"OBR|{index}|{test['placer']}||{test['code']}^{test['code']}^L|||||||O|||||{REFERRER}",
            f"SPM|1|||{test['specimen']}^{test['specimen']} tekst^L",
        ]
    return _raw(segments)


def test_an_oml_keeps_each_tests_own_priority_and_specimen():
    """HL7 2.5.1 OML_O21: each ORDER has its own TIMING (TQ1-9 priority) and its OBR its own
    SPECIMEN (SPM-4 type); DOMAIN.md: TQ1 and SPM per test. The mapping reads the first TQ1 and
    the first SPM for the whole order, so the entry of a routine blood test plus an urgent
    urine test says routine, blood only: the urine specimen and the urgency are lost."""
    raw = oml([
        {"placer": "PL-1", "code": "ALAT", "priority": "R", "priority_text": "Routine", "specimen": "BLD"},
        {"placer": "PL-2", "code": "SEDIM", "priority": "S", "priority_text": "Stat", "specimen": "UR"},
    ])
    result = mapped(raw)
    assert result["outcome"] == "mapped"
    tests = result["entry"]["data"]["tests"]
    text = json.dumps(tests)
    by_code = {}
    for test in tests:  # whatever shape a fix gives each test, its own values are inside it
        blob = json.dumps(test)
        by_code["ALAT" if "ALAT" in blob else "SEDIM" if "SEDIM" in blob else "?"] = blob
    assert set(by_code) == {"ALAT", "SEDIM"}, text
    assert '"UR"' in by_code["SEDIM"] and '"BLD"' not in by_code["SEDIM"]
    assert '"S"' in by_code["SEDIM"]
    assert '"BLD"' in by_code["ALAT"] and '"UR"' not in by_code["ALAT"]


# ---------------------------------------------------------------------------------------------
# IN1-3: the insurer's UZOVI number.


def test_an_insurer_id_that_is_not_a_uzovi_number_is_not_stored_as_one():
    """DOMAIN.md: IN1-3 insurer UZOVI `0001^^^VEKTIS^UZOVI`. ZorgDomein's echo sample sends
    `0^^^LOCAL` (a local id, no UZOVI type) with IN1-4 `VGZ`; the mapping reads IN1-3.1 whatever
    its type, so the entry records UZOVI `0`, a number no insurer has. The repetition with
    CX-5 `UZOVI` (`IN1-3[5=UZOVI].1`) is the UZOVI number."""
    raw = load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7").replace(b"900073962", BSN.encode())
    fields = mapped(raw)["event"]["fields"]
    assert fields.get("insurer.name") == "VGZ"
    assert fields.get("insurer.uzovi") in (None, "")
