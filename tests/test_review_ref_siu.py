"""Review: how the bundled configuration maps the standard REF^I12-I14 and SIU^S12-S15
(non-ZorgDomein senders, HL7 2.3-2.5.1). Each test here fails for one defect found.

Synthetic data only: made-up names, test BSN 999999990 (passes the 11-proof:
9*9+9*8+...+9*2 - 0 = 396 = 11*36), synthetic AGB codes and ids.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

from engine.bundle import load_bundle
from engine.preview import preview
from tests.test_agenda_orderings import Harness, world  # noqa: F401 - the fixture

REPO = Path(__file__).resolve().parent.parent
BSN = "999999990"
PLACER = "VW-1001"  # the referral source's own referral id (RF1-6)
EXTERNAL = "EXT-77"  # another application's id for the referral (RF1-11)
HIS_BOOKING = "HIS-555"  # the scheduler's own appointment id (SCH-2)


def _raw(segments: list[str]) -> bytes:
    return ("\r".join(segments) + "\r").encode("latin-1")


def ref(trigger: str = "I12", *, version: str = "2.4", prd: list[str] | None = None,
        rf1_11: str = "") -> bytes:
    """A REF from a referral source other than ZorgDomein (no ZD-number anywhere)."""
    prd = prd if prd is not None else [
        "PRD|RP|Jansen^J^^^^^L|Dorpsstraat 1^^Koppelstad^^1234AB^NL||^WPN^PH^^^^^^^^^0101234567||01001234^VEKTIS",
        "PRD|RT~0320^Cardiologie^VEKTIS|de Wit^P",
    ]
    return _raw([
        f"MSH|^~\\&|VERWIJZER|HUISARTS|KOPPEL|ZIEKENHUIS|20261201090000+0100||REF^{trigger}^REF_I12|REF{trigger}|P|{version}",
        f"RF1|P^Pending^HL70283|R^Routine^HL70280|MED|||{PLACER}^VERWIJSSYS|20261201|20270301||"
        f"REDEN^Verwijsreden^L|{rf1_11}",
        *prd,
        f"PID|1||445566^^^KOPPELSTAD^PI~{BSN}^^^NLMINBIZA^NNNLD||Testpatient^T^^^^^L||19800101|F|||"
        "Teststraat 1^^Koppelstad^^1234AB^NL",
        "DG1|1||I20.9^Angina pectoris^I10",
        "OBR|1|||ECG^Elektrocardiogram^L",
    ])


def siu(trigger: str = "S12", *, version: str = "2.5", sch11: str = "^^30^20261210093000+0100^20261210100000+0100",
        after_sch: tuple[str, ...] = (), ais4: str = "") -> bytes:
    """The hospital scheduler's booking of the REF referral (SCH-1 its placer id, SCH-2 its own id)."""
    return _raw([
        f"MSH|^~\\&|HIX|ZIEKENHUIS|KOPPEL|ZIEKENHUIS|20261201090000+0100||SIU^{trigger}^SIU_S12|SIU{trigger}|P|{version}",
        f"SCH|{PLACER}|{HIS_BOOKING}|||||^Controle||30|MIN|{sch11}||||||||||||||Booked",
        *after_sch,
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD||Testpatient^T^^^^^L||19800101|F",
        "RGS|1|A",
        f"AIS|1|A|CARPOLI^Polikliniek cardiologie^L|{ais4}",
        "AIG|1|A|CAR^Cardiologie",
        "AIL|1|A|POLI1^^^06990001",
        "AIP|1|A|123^de Vries^A",
    ])


def mapped(channel: str, raw: bytes) -> dict:
    """What `koppel map --channel CHANNEL FILE` says, in process."""
    bundle = load_bundle(REPO / "channels", REPO / "mappings")
    return preview(bundle, channel, raw, now=dt.datetime(2026, 12, 1, 12, tzinfo=dt.timezone.utc))


def built(h: Harness, message_type: str) -> list[bytes]:
    """The raw outbound messages of this type Koppel built (what the destination gets)."""
    return [h.store.get_message(m.id).raw for m in sorted(h.store.list_messages(limit=1000), key=lambda m: m.id)
            if m.origin_id is not None and m.message_type == message_type]


def field(raw: bytes, name: str) -> str:
    """SEG-N(.C) of the first such segment of a built message (its delimiters are ^~\\&)."""
    seg, _, rest = name.partition("-")
    number, _, component = rest.partition(".")
    for line in raw.decode("latin-1").split("\r"):
        parts = line.split("|")
        if parts[0] == seg:
            value = parts[int(number)] if len(parts) > int(number) else ""
            if component:
                comps = value.split("~")[0].split("^")
                return comps[int(component) - 1] if len(comps) >= int(component) else ""
            return value
    raise AssertionError(f"no {seg} in the message")


# ---------------------------------------------------------------------------------------------
# REF: PRD-1 (Provider Role) repeats; a provider may hold more than one role.


def test_a_referring_provider_whose_prd_1_lists_more_than_one_role_is_still_the_referrer():
    """HL7 2.3-2.5.1 PRD-1 Provider Role is a repeating CE (table 0286): a GP who is the
    patient's primary care provider and the referrer sends `PP~RP`. The mapping's group filter
    `PRD-1.1: RP` looks at the first repetition only, so the referrer's name and AGB are lost."""
    raw = ref(prd=["PRD|PP~RP|Jansen^J|||||01001234^VEKTIS", "PRD|RT~0320^Cardiologie^VEKTIS|de Wit^P"])
    result = mapped("zorgdomein-in", raw)
    assert result["outcome"] == "mapped"
    fields = result["event"]["fields"]
    assert fields.get("referrer.name") == "Jansen"
    assert fields.get("referrer.agb") == "01001234"


# ---------------------------------------------------------------------------------------------
# SIU 2.5+: the appointment timing is in TQ1 (SCH-11 is kept only for backward compatibility).


def test_a_251_booking_takes_its_end_time_from_tq1_when_sch_11_is_empty():
    """From v2.5 SCH-11 (TQ) is retained for backward compatibility only; the timing is the TQ1
    segment after SCH (TQ1-7 start, TQ1-8 end), as hl7apy's 2.5 SIU_S12 structure has it. A
    2.5.1 scheduler that sends TQ1 and no SCH-11 gets its booked end dropped (only SCH-11.5 is
    read)."""
    raw = siu(version="2.5.1", sch11="", ais4="20261210093000+0100",
              after_sch=("TQ1|||||||20261210093000+0100|20261210100000+0100",))
    result = mapped("scheduler-in", raw)
    fields = result["event"]["fields"]
    assert fields.get("booked_start") == "2026-12-10T09:30:00+01:00"
    assert fields.get("booked_end") == "2026-12-10T10:00:00+01:00"


def test_a_251_booking_with_only_tq1_timing_has_a_booked_start():
    """As above, without AIS-4 (it is conditional: AIS-5 may give an offset instead): the
    booking's start, TQ1-7, is not read at all, so the agenda shows a booking without a time."""
    raw = siu(version="2.5.1", sch11="",
              after_sch=("TQ1|||||||20261210093000+0100|20261210100000+0100",))
    result = mapped("scheduler-in", raw)
    assert result["event"]["fields"].get("booked_start") == "2026-12-10T09:30:00+01:00"


# ---------------------------------------------------------------------------------------------
# REF + the scheduler's booking + REF^I14: what the HIS gets.


def test_rf1_11_is_not_taken_for_the_his_booking_so_the_s15_names_the_his_booking(world):  # noqa: F811
    """RF1-11 (External Referral Identifier) is another application's id for the *referral*;
    the HIS's appointment id is the scheduler's SCH-2 (filler appointment id). ref.yaml maps
    RF1-11 to `filler_id`, the entry keeps the first filler id it got, so after the scheduler
    booked the referral (SCH-2 HIS-555) and the source cancelled it (REF^I14), the SIU^S15 the
    HIS gets names SCH-2 = EXT-77, a booking the HIS does not have: its appointment stays."""
    h = world("rf1-11")
    for raw in (ref(rf1_11=f"{EXTERNAL}^EXTERN"), siu("S12"), ref("I14", rf1_11=f"{EXTERNAL}^EXTERN")):
        h.receive(raw)
    entry = h.entry()
    assert entry.state == "cancelled"
    (s15,) = built(h, "SIU^S15")
    assert field(s15, "SCH-2.1") == HIS_BOOKING
    assert entry.filler_id == HIS_BOOKING


def test_the_s15_for_a_referral_from_a_ref_sender_is_a_valid_25_message(world):  # noqa: F811
    """The HIS booked a REF^I12 referral (SIU^S12 from the scheduler) and the source cancelled it
    (REF^I14): Koppel sends the HIS an SIU^S15 (2.5). Its AIS-3 (Universal Service Identifier,
    required in AIS in 2.3-2.5.1) comes only from `entry.care_product`, which a REF referral
    never has, so the S15 goes out with an empty AIS-3 and fails hl7apy's strict validation
    (a strict HIS refuses it, as the README says of an S15 without PID-5 or SCH-16)."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.parser import parse_message

    h = world("ref-s15")
    for raw in (ref(), siu("S12"), ref("I14")):
        h.receive(raw)
    assert h.entry().state == "cancelled"
    (s15,) = built(h, "SIU^S15")
    parse_message(s15.decode("latin-1"), validation_level=VALIDATION_LEVEL.STRICT, find_groups=True).validate()


def test_a_ref_i13_that_redirects_the_referral_to_another_specialty_moves_it_to_that_agenda(world):  # noqa: F811
    """REF^I13 (modify patient referral) that changes the referred-to provider (PRD role RT) from
    cardiology (Vektis 0320) to gynaecology (0307): the entry's `prd_specialty` becomes 0307,
    which mappings/agendas.yaml selects for the gynaecology agenda, but the entry stays in
    cardiology's agenda (the agenda is chosen only at create), so the referral waits in the
    wrong clinic's work list while its own data says gynaecology."""
    h = world("redirect")
    h.receive(ref())
    assert h.entry().agenda_id == "cardiology"
    h.receive(ref("I13", prd=["PRD|RP|Jansen^J|||||01001234^VEKTIS", "PRD|RT~0307^Gynaecologie^VEKTIS|de Wit^P"]))
    entry = h.entry()
    assert entry.state == "requested"
    assert entry.agenda_id == "gynaecology"
