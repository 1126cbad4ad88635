"""The SIU^S15 that tells the HIS a referral is cancelled, built through the processor from
the entry (what the request and every later message said), not from ZorgDomein's SRM^S04
alone, which may carry less than its request. Real SQLite store, bundled channels and
mappings. Synthetic data only (test BSN 900073962, which passes the 11-proof)."""

from __future__ import annotations

import pytest
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.parser import parse_message

from engine.core.header import read_header
from engine.core.hl7message import Message
from engine.core.paths import first, parse_path
from tests.test_agenda_orderings import Harness, oru, srm, world  # noqa: F401 - the fixture
from tests.test_mapping import thin_cancel


def s15(h: Harness) -> bytes:
    (raw,) = [h.store.get_message(m.id).raw for m in h.store.list_messages(limit=1000)
              if m.origin_id is not None and m.message_type == "SIU^S15"]
    return raw


def field(raw: bytes, path: str) -> str | None:
    header = read_header(raw, default_charset="8859/1")
    return first(Message.parse(raw, codec=header.codec), parse_path(path))


@pytest.mark.parametrize("order", [("SRM", "S04"), ("SRM", "ORU", "S04"), ("ORU", "S04", "SRM")],
                         ids="-".join)
def test_a_thin_cancel_gives_the_his_a_complete_strictly_valid_s15(world, order):  # noqa: F811
    """Before, the S15 took PID-5, PID-7, PID-8 and SCH-16 from the S04: missing here, so hl7apy's
    strict validation refused it (no SCH-16) and the HIS got sex U for a man."""
    h = world("-".join(order))
    request = srm().replace(b"|20000101|U|", b"|20000101|M|")
    make = {"SRM": lambda: request, "ORU": oru, "S04": lambda: thin_cancel(srm(control_id="cancel"))}
    for name in order:
        h.receive(make[name]())
    assert h.entry().state == "cancelled"
    raw = s15(h)
    parse_message(raw.replace(b"\n", b"\r").decode("latin-1"),
                  validation_level=VALIDATION_LEVEL.STRICT).validate()
    assert field(raw, "PID-5.1.1") == "de Boer"
    assert (field(raw, "PID-7"), field(raw, "PID-8")) == ("20000101", "M")
    assert (field(raw, "SCH-16.1"), field(raw, "SCH-16.2")) == ("01004567", "van Houten")
    assert field(raw, "PID-3[4=NLMINBIZA].1") == "900073962"
