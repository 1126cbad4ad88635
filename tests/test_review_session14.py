"""Review of 077c2a6..HEAD: the entry-fed SIU^S15 and its `entry.previous_state` rule, phone
words, hex-escape runs, for_each error paths. Tests that fail name a bug; the last few pin
behaviour verified correct. Synthetic data only (test BSN 900073962, made-up names)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from engine.core import convert
from engine.core.agenda import plain
from engine.core.header import Delimiters
from engine.core.hl7message import Message, unescape
from engine.mapping import _format, _resolve
from tests.conftest import load_sample
from tests.test_agenda_orderings import BSN, ZD, Harness, oru, siu, srm, world  # noqa: F401 - the fixture
from tests.test_s15_when_the_his_knows import to_his


def ref(trigger: str) -> bytes:
    """A REF^I12/I14 from another referral source about the same ZorgDomein referral (the ZD
    number as PID-3's ZorgDomein repetition, which mappings/ref.yaml reads), same patient."""
    return "\r".join([
        f"MSH|^~\\&|VERWIJZER|HUISARTS|KOPPEL|ZIEKENHUIS|20261201090000+0100||REF^{trigger}^REF_I12|REF{trigger}|P|2.4",
        "RF1|A|R||||||||",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{ZD}^^^ZorgDomein^VN||Testpatient&&Testpatient^T^^^^^L||19800101|F",
    ]).encode("latin-1") + b"\r"


# --------------------------------------------------------------------------------------------
# The S15 rule: `entry.previous_state: [requested, ...]` taken to mean "the HIS had the S12"


def test_a_request_the_his_had_is_cancelled_to_the_his_even_when_a_ref_i14_closed_it_first(world):
    """SRM^S01 (the HIS gets the SIU^S12), then a REF^I14 for the same referral closes the entry
    (mappings/ref.yaml sends nothing), then ZorgDomein's SRM^S04: it is a second cancel
    (agenda._cancel_again, previous_state 'cancelled'), so the `when` in zorgdomein-srm.yaml
    refuses it. The HIS keeps a request that is off and may book it. Expected: exactly one
    SIU^S15 for a referral the HIS had the S12 of, whichever message closed it."""
    h = world("srm-i14-s04")
    for raw in (srm(), ref("I14"), srm("S04", control_id="cancel")):
        h.receive(raw)
    assert h.entry().state == "cancelled"
    assert to_his(h) == ["SIU^S12", "SIU^S15"]


def test_no_cancel_goes_to_the_his_for_a_ref_referral_it_never_had_an_s12_for(world):
    """A REF^I12 creates the entry as kind `referral`, state `requested`, and nothing goes to the
    HIS (ref.yaml has no outbound). ZorgDomein's SRM^S04 then closes it from `requested`, which
    the S15 rule takes for "the HIS had the SIU^S12": the HIS gets an SIU^S15 for a referral it
    never heard of (and, when the SRM^S01 comes after, still no S12). README: "never for a
    referral closed before its request came". `requested` is not proof of an S12; expected:
    no SIU^S15 (nothing at all to the HIS)."""
    h = world("i12-s04-srm")
    for raw in (ref("I12"), srm("S04", control_id="cancel"), srm()):
        h.receive(raw)
    assert h.entry().state == "cancelled"
    assert to_his(h) == []


def test_a_request_whose_booking_waited_behind_its_cancel_reaches_the_his_with_that_cancel(world):
    """Letter, ZorgDomein's S04 and then the HIS's own booking (SIU^S12, F778) all wait for the
    request; when it comes they are released in arrival order: the S04 cancels, the booking is
    refused ("entry is cancelled"). The review found the S15 that followed the SIU^S12 did not
    name F778 and asked for no S12. Kept (decided): the booking never applied, so the entry has
    no filler id to name; the HIS gets the request and then its cancel (SCH-1 the ZD-number,
    which its booking carries too), in that order, and the refused booking is an `error` for
    on-call (`koppel messages --processing error`)."""
    h = world("oru-s04-book-srm")
    ids = [h.receive(raw) for raw in (oru(), srm("S04", control_id="cancel"), siu("S12"), srm())]
    assert h.entry().state == "cancelled"
    assert to_his(h) == ["SIU^S12", "SIU^S15"]
    assert h.outcome(ids[2]) == ("error", "cannot book: entry is cancelled")


# --------------------------------------------------------------------------------------------
# {entry.<field>}: the same text whether the entry came from this batch or from the store


@pytest.mark.parametrize("name", ["entry.care_product", "entry.patient.name"])
def test_an_entry_record_field_goes_out_the_same_typed_and_as_stored(name):
    """`{care_product}` on an event is the code and `{patient.name}` the surname (mapping._format
    of Code / DutchName); `{entry.care_product}` gives that while the entry's data is typed (the
    batch that mapped it) but "" once the entry is read back from the store (a plain dict,
    _from_stored only handles text). The HIS must get the same message either way."""
    typed = {
        "care_product": convert.Code(code="CARREG001", text="consult cardioloog", system="99zda"),
        "patient.name": convert.dutch_name(["Testpatient", "T"], ["Testpatient", "", "Testpatient"]),
    }
    no_event = SimpleNamespace(fields={})
    texts = [_format(_resolve(name, no_event, SimpleNamespace(id=1, state="cancelled", data=data), None, None))
             for data in (typed, plain(typed))]
    assert texts[0] != ""
    assert texts[1] == texts[0]


# --------------------------------------------------------------------------------------------
# phone: words about the number


def test_two_numbers_joined_by_a_slash_are_an_error_not_one_twenty_digit_number():
    """README: "a letter glued to the digits or two numbers is an error". `06-12345678 /
    020-5557890` (a GP system's two numbers) is one run for _PHONE_RUN (``/`` is allowed inside)
    and phone() strips the punctuation: 06123456780205557890, a 20-digit "number" the HIS
    would dial. Expected: ConversionError."""
    with pytest.raises(convert.ConversionError):
        convert.phone("06-12345678 / 020-5557890")


def test_a_comma_before_the_word_about_the_number_is_still_a_word_about_it():
    """`06-12345678, moeder` is the common way to write whose number it is, like `06-12345678
    (moeder)`; _number_in accepts only a space or bracket after the number, so the comma makes
    it "glued" and the whole referral is refused. Expected: 0612345678."""
    assert convert.phone("06-12345678, moeder") == "0612345678"


# --------------------------------------------------------------------------------------------
# _in_item: a nested group's error


def test_an_error_in_a_group_inside_a_for_each_item_names_the_groups_own_segment(tmp_path):
    """Inside an ORC item, `reason` reads OBX-5 of the OBX whose OBX-3 is REDE. When that OBX is
    the item's second (ANAM first), the error path is rewritten by mapping._in_item counting
    from the item's first OBX: `OBX[1]-5`, the ANAM answer, which is fine; the NAK's ERR points
    at the wrong segment. Expected: `OBX[2]-5` (the REDE OBX)."""
    from tests.test_mapping_live_review import order_mapping

    mapping = order_mapping(tmp_path, """\
      code: {from: OBR-4.1, required: true}
      reason:
        group: {anchor: OBX, members: [NTE], where: {"OBX-3.1": REDE}}
        from: OBX-5
        convert: dtm
""")
    segments = load_sample("zorgdomein/zd_orm_o01_echo_v24_latin1.hl7").split(b"\r")
    rede = next(n for n, s in enumerate(segments) if s.startswith(b"OBX|1|ST|REDE"))
    segments[rede], segments[rede + 1] = (segments[rede + 1].replace(b"OBX|2|", b"OBX|1|"),
                                          segments[rede].replace(b"OBX|1|", b"OBX|2|"))
    result = mapping.apply(Message.parse(b"\r".join(segments), codec="latin-1"))
    assert [(e.field, e.path) for e in result.errors] == [("tests[1].reason", "OBX[2]-5")]


# --------------------------------------------------------------------------------------------
# Pins: verified correct


def test_pin_a_hex_run_stops_at_a_malformed_escape_with_any_escape_character():
    d = Delimiters(field=b"|", encoding=b"^~\\&")
    bang = Delimiters(field=b"|", encoding=b"^~!&")
    assert unescape("\\X41\\\\XZZ\\", d) == "A\\XZZ\\"
    assert unescape("!XC3!!XA9!", bang, codec="utf-8") == "é"
    assert unescape("!X41!!E!!X42!", bang) == "A!B"  # an escaped escape between two runs


def test_pin_no_s15_after_the_his_cancelled_its_own_booking(world):
    """The scheduler's SIU^S15 closed it: ZorgDomein's S04 after that tells the HIS nothing."""
    h = world("srm-book-s15-s04")
    for raw in (srm(), siu("S12"), siu("S15"), srm("S04", control_id="cancel")):
        h.receive(raw)
    assert h.entry().state == "cancelled" and to_his(h) == ["SIU^S12"]
