"""A channel's accept rules and the judgement of one frame: which messages get AR,
with which table 0357 code, and that a store failure is never answered AA.
"""

from __future__ import annotations

import hashlib

import pytest

from engine.core.errors import ErrorCode
from engine.core.header import read_header
from engine.core.intake import (
    ACCEPT_ALL,
    INTERNAL_ERROR,
    STORE_FAILED,
    TOO_LARGE,
    AcceptRules,
    assess,
    assess_oversize,
    check_accept,
)
from tests.conftest import load_sample, sample_names

TS = "20260102161545+0100"


def header(mtype="SRM^S01^SRM_S01", version="2.4", processing="P", msh15=""):
    raw = (
        f"MSH|^~\\&|ZorgDomein||Koppel||20260102||{mtype}|C1|{processing}|{version}|||{msh15}||NLD|8859/1\r"
        "PID|1||123456782^^^NLMINBIZA^NNNLD"
    ).encode()
    return read_header(raw, default_charset="8859/1")


def code_of(rejection):
    return None if rejection is None else (rejection.ack_code, int(rejection.error_code), rejection.location.field)


ISSUE_RULES = AcceptRules(
    types=frozenset({"SRM^S01", "SRM^S04", "ORU^R01", "ORM^O01", "OML^O21", "REF^I12", "SIU^S12"}),
    versions=frozenset({"2.3", "2.3.1", "2.4", "2.5", "2.5.1"}),
)


@pytest.mark.parametrize("name", sample_names())
def test_accept_all_accepts_every_readable_sample(name):
    h = read_header(load_sample(name), default_charset="8859/1")
    if h.rejection is None:
        assert check_accept(h, ACCEPT_ALL) is None


@pytest.mark.parametrize(
    "name",
    [
        "zorgdomein/zd_srm_s01_appointment_request.hl7",
        "zorgdomein/zd_oru_r01_attachments.hl7",
        "zorgdomein/zd_orm_o01_lab_v24.hl7",
        "zorgdomein/zd_oml_o21_lab_v251_latin1.hl7",
    ],
)
def test_the_zorgdomein_channel_of_the_issue_accepts_every_zorgdomein_sample(name):
    assert assess(load_sample(name), rules=ISSUE_RULES, default_charset="8859/1").accepted


def test_an_exact_type_accepts_that_type_and_trigger():
    assert check_accept(header("SRM^S01^SRM_S01"), AcceptRules(types=frozenset({"SRM^S01"}))) is None


def test_an_exact_type_with_another_trigger_is_rejected_ar_unsupported_event_201():
    rules = AcceptRules(types=frozenset({"SRM^S01"}))
    assert code_of(check_accept(header("SRM^S04^SRM_S01"), rules)) == ("AR", 201, 9)


def test_a_type_not_listed_at_all_is_rejected_ar_unsupported_message_type_200():
    rules = AcceptRules(types=frozenset({"SRM^S01", "ORM"}))
    assert code_of(check_accept(header("ADT^A01^ADT_A01"), rules)) == ("AR", 200, 9)


def test_a_type_only_rule_accepts_every_trigger_of_that_type():
    rules = AcceptRules(types=frozenset({"ORM"}))
    for mtype in ("ORM^O01", "ORM^O02^ORM_O01", "ORM"):
        assert check_accept(header(mtype), rules) is None


def test_a_message_without_a_trigger_matches_a_type_only_rule():
    rules = AcceptRules(types=frozenset({"ACK"}))
    assert check_accept(header("ACK"), rules) is None
    assert code_of(check_accept(header("ACK"), AcceptRules(types=frozenset({"ACK^A01"})))) == ("AR", 201, 9)


def test_types_are_matched_exactly_not_by_prefix_or_case():
    rules = AcceptRules(types=frozenset({"SRM^S01"}))
    assert code_of(check_accept(header("SRM^S011"), rules)) == ("AR", 201, 9)
    assert code_of(check_accept(header("srm^S01"), rules)) == ("AR", 200, 9)


def test_a_listed_version_is_accepted_and_another_is_rejected_ar_unsupported_version_203():
    rules = AcceptRules(versions=frozenset({"2.4", "2.5.1"}))
    assert check_accept(header(version="2.4"), rules) is None
    assert check_accept(header(version="2.5.1"), rules) is None
    assert code_of(check_accept(header(version="2.5"), rules)) == ("AR", 203, 12)
    assert code_of(check_accept(header(version="2.4.1"), rules)) == ("AR", 203, 12)


def test_the_version_is_msh_12_first_component():
    rules = AcceptRules(versions=frozenset({"2.5"}))
    assert check_accept(header(version="2.5^NLD^HL7NL"), rules) is None


def test_processing_ids_are_checked_only_when_listed():
    assert check_accept(header(processing="T"), ACCEPT_ALL) is None
    rules = AcceptRules(processing_ids=frozenset({"P"}))
    assert check_accept(header(processing="P"), rules) is None
    assert check_accept(header(processing="P^T"), rules) is None
    assert code_of(check_accept(header(processing="T"), rules)) == ("AR", 202, 11)
    assert code_of(check_accept(header(processing=""), rules)) == ("AR", 202, 11)


def test_the_type_is_checked_before_the_version_and_the_processing_id():
    rules = AcceptRules(types=frozenset({"SRM^S01"}), versions=frozenset({"2.4"}), processing_ids=frozenset({"P"}))
    assert code_of(check_accept(header("ADT^A01", version="2.9", processing="T"), rules)) == ("AR", 200, 9)
    assert code_of(check_accept(header("SRM^S01", version="2.9", processing="T"), rules)) == ("AR", 203, 12)


def test_accept_texts_name_no_field_values():
    rules = AcceptRules(types=frozenset({"SRM^S01"}), versions=frozenset({"2.4"}), processing_ids=frozenset({"P"}))
    for h in (header("ADT^A01"), header("SRM^S04"), header(version="2.9"), header(processing="T")):
        text = check_accept(h, rules).text
        for value in ("ADT", "S04", "2.9", "A01", "123456782"):
            assert value not in text


# --- assess ---------------------------------------------------------------------------------------


def test_assess_lets_a_header_rejection_win_over_the_accept_rules():
    raw = load_sample("public/trusted-intermediary_MALFORMED_missing_msh9.hl7")
    a = assess(raw, rules=AcceptRules(types=frozenset({"ORU^R01"})), default_charset="8859/1")
    assert code_of(a.rejection) == ("AR", 101, 9)
    assert not a.accepted


def test_assess_hashes_the_exact_payload():
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    a = assess(raw, rules=ACCEPT_ALL, default_charset="8859/1")
    assert a.payload_hash == hashlib.sha256(raw).digest()
    assert a.accepted


def test_an_accepted_message_is_answered_aa_and_a_store_failure_ae_never_aa():
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    a = assess(raw, rules=ACCEPT_ALL, default_charset="8859/1")
    code, out = a.ack(timestamp=TS, control_id="K1")
    assert code == "AA" and b"MSA|AA|g20ce6a9f8ca4f551275" in out
    code, out = a.ack(timestamp=TS, control_id="K2", failure=STORE_FAILED)
    assert code == "AE"
    assert b"MSA|AE|g20ce6a9f8ca4f551275|message could not be stored" in out
    assert b"207" in out.split(b"\r")[2]


def test_a_store_failure_in_enhanced_mode_is_ce_even_when_the_message_was_accepted():
    a = assess(
        load_sample("public/trusted-intermediary_oru_r01_natus_big_base64.hl7"),
        rules=ACCEPT_ALL,
        default_charset="8859/1",
    )
    assert a.ack(timestamp=TS, control_id="K1")[0] == "CA"
    code, out = a.ack(timestamp=TS, control_id="K1", failure=INTERNAL_ERROR)
    assert code == "CE"
    assert b"|CE|" in out


def test_a_withheld_accept_ack_returns_the_code_and_no_bytes():
    raw = (
        "MSH|^~\\&|ZorgDomein||Koppel||20260102||ORU^R01|C1|P|2.5|||NE|AL\r".encode()
    )
    a = assess(raw, rules=ACCEPT_ALL, default_charset="8859/1")
    assert a.ack(timestamp=TS, control_id="K1") == ("CA", b"")


def test_a_rejection_with_msh_15_er_is_sent():
    raw = b"MSH|^~\\&|ZorgDomein||Koppel||20260102||ADT^A01|C1|P|2.5|||ER|AL\r"
    a = assess(raw, rules=AcceptRules(types=frozenset({"ORU"})), default_charset="8859/1")
    code, out = a.ack(timestamp=TS, control_id="K1")
    assert code == "CR"
    assert out.split(b"\r")[1] == b"MSA|CR|C1|message type not accepted on this channel"


def test_an_oversize_frame_is_answered_ar_100_message_too_large():
    raw = load_sample("public/trusted-intermediary_oru_r01_natus_big_base64.hl7")
    a = assess_oversize(raw[:2048], default_charset="8859/1")
    assert a.rejection is TOO_LARGE
    assert (a.rejection.ack_code, int(a.rejection.error_code)) == ("AR", ErrorCode.SEGMENT_SEQUENCE)
    code, out = a.ack(timestamp=TS, control_id="K1")
    assert code == "CR"  # the sender asked for enhanced mode (MSH-15 AL)
    assert b"MSA|CR|20240215200725_0005|message too large" in out


def test_an_oversize_frame_whose_head_has_no_msh_still_gets_an_ar():
    a = assess_oversize(b"\x00\x01garbage", default_charset="8859/1")
    code, out = a.ack(timestamp=TS, control_id="K1")
    assert code == "AR"
    assert out.startswith(b"MSH|^~\\&|")
    assert b"message too large" in out


@pytest.mark.parametrize(
    "payload",
    [
        b"MSH|^~\\&|GP|P|K|H|20260102||ADT^A01^ADT_A01|M1|P|2.5\r",  # a type the channel does not take
        b"PID|1||123456782\r",  # no MSH
        b"BHS|^~\\&|GP|P|K|H|||||B1\r",  # a batch
    ],
    ids=["type", "unreadable", "batch"],
)
def test_rejected_code_ae_turns_every_refusal_into_ae_and_keeps_its_error(payload):
    rules = AcceptRules(types=frozenset({"SRM^S01"}), rejected_code="AE")
    default = assess(payload, rules=AcceptRules(types=frozenset({"SRM^S01"})), default_charset="8859/1")
    changed = assess(payload, rules=rules, default_charset="8859/1")
    assert default.rejection.ack_code == "AR"
    assert changed.rejection.ack_code == "AE"
    assert (changed.rejection.error_code, changed.rejection.text) == (
        default.rejection.error_code, default.rejection.text)
    code, out = changed.ack(timestamp=TS, control_id="K1")
    assert code == "AE" and out.split(b"\r")[1].startswith(b"MSA|AE|")


def test_rejected_code_ae_is_ce_in_enhanced_mode_and_leaves_other_errors_alone():
    rules = AcceptRules(types=frozenset({"SRM^S01"}), rejected_code="AE")
    enhanced = b"MSH|^~\\&|GP|P|K|H|20260102||ADT^A01^ADT_A01|M1|P|2.5|||AL\r"
    assert assess(enhanced, rules=rules, default_charset="8859/1").ack(timestamp=TS, control_id="K1")[0] == "CE"
    unknown_charset = b"MSH|^~\\&|GP|P|K|H|20260102||SRM^S01^SRM_S01|M1|P|2.5||||||KLINGON\r"
    assert assess(unknown_charset, rules=rules, default_charset="8859/1").rejection.ack_code == "AE"


def test_an_oversize_frame_gets_the_channels_rejected_code():
    head = b"MSH|^~\\&|GP|P|K|H|20260102||ORU^R01^ORU_R01|M1|P|2.5\rOBX|1|ED|"
    assert assess_oversize(head, default_charset="8859/1", rejected_code="AE").rejection.ack_code == "AE"
    assert assess_oversize(head, default_charset="8859/1").rejection is TOO_LARGE
