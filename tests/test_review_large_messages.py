"""Review: multi-megabyte ZorgDomein letters (ORU^R01 with a base64 PDF in OBX-5) through Koppel.

Synthetic data only: a made-up patient with the test BSN 123456782 and random bytes as the
"PDF". Memory is measured with tracemalloc around pure or in-process calls, never servers.
The first group failed before the fixes they name; the second pins what was found right.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import tracemalloc
from pathlib import Path

import pytest
from twisted.internet import defer
from twisted.internet.testing import MemoryReactorClock

from engine.core import agenda as ag
from engine.core import mllp
from engine.core.header import read_header
from engine.core.hl7message import Message
from engine.mapping import build_outbound, load_mappings
from engine.store import PutAttachment, SaveAgendaEntry, open_store

ROOT = Path(__file__).resolve().parent.parent
MB = 1 << 20
ZD = "ZD200046119"


def letter_b64(size: int) -> tuple[bytes, str]:
    """Random bytes posing as a PDF, and their base64."""
    pdf = b"%PDF-1.4\n" + os.urandom(size)
    return pdf, base64.b64encode(pdf).decode("ascii")


def oru(data: str, *, filename: str = "verwijsbrief.pdf", control_id: str = ZD) -> bytes:
    """A ZorgDomein ORU^R01 (delimiters ^_\\&) carrying ``data`` as the OBX-5.5 of one ED."""
    return (
        f"MSH|^_\\&|ZorgDomein||||20160324163507+0100||ORU^R01|{control_id}|P|2.4\r"
        "PID|1||123456782^^^NLMINBIZA^NNNLD||Testpatient&&Testpatient^Jan^J^^^^L||19800101|M\r"
        "PV1|1|O\r"
        f"ORC|XO|{control_id}|||||||20160324163432+0100\r"
        f"OBR|1|{control_id}||CARCOA001^zorgproductcode^ZORGDOMEIN|||20160324163432+0100\r"
        f"OBX|1|ED|BLOB^Bijlage^ZORGDOMEIN|1|^application^pdf^Base64^{data}||||||F\r"
        f"NTE|1|P|{filename}|RE\r"
    ).encode("latin-1")


@pytest.fixture(scope="module")
def oru_mapping():
    return load_mappings(ROOT / "mappings").mapping("zorgdomein-oru")


def mapped_event(mapping, raw: bytes) -> ag.AgendaEvent:
    result = mapping.apply(Message.parse(raw, codec="latin-1"))
    assert result.ok, result.errors
    return result.event


def peak_of(fn):
    """(result, peak bytes allocated while fn ran)."""
    tracemalloc.start()
    tracemalloc.reset_peak()
    try:
        result = fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, peak


# ------------------------------------------------------------------------------------ defects (fixed)


def test_sender_holds_one_large_body_in_memory_not_a_page_of_them(tmp_path):
    """A queue of large letters costs the sender one body in memory, not a page of 100 bodies."""
    from tests.test_sender import Harness  # the sender harness (memory reactor, real store)

    h = Harness(tmp_path)
    _, body = letter_b64(MB)
    for n in range(12):
        control_id = f"ZD9000{n:05d}"
        h.enqueue(control_id, raw=oru(body, control_id=control_id))
    _, peak = peak_of(h.start)
    assert h.destination.connections, "the first letter went out"
    # one 1.4 MB letter on the wire (plus its frame copy) is fine; 12 of them read at once is not
    assert peak < 6 * MB, f"sender start allocated {peak / MB:.1f} MB for 12 queued 1.4 MB letters"


def test_processor_batch_is_bounded_by_bytes_as_well_as_by_count():
    """The processor plans at most a bounded number of bytes per batch (not 256 letters of 15 MB)."""
    from engine.metrics import Metrics
    from engine.shell.processor import Outcome, Processor, Work

    clock = MemoryReactorClock()
    batches: list[int] = []
    processor = Processor(mappings=None, book=None, store=None, committer=None, clock=clock, metrics=Metrics(),
                          destinations={}, control_ids=lambda: "K1")

    def commit_batch(works):
        batches.append(sum(len(w.raw) for w in works))
        return defer.succeed([Outcome(status="mapped", detail="") for _ in works])

    processor._commit_batch = commit_batch  # only the batching is under test
    raw = b"x" * (15 * MB)  # one object shared by every Work: 40 letters of 15 MB, 15 MB in memory
    for n in range(40):
        processor.submit(Work(message_id=n + 1, channel="zorgdomein-in", mapping="zorgdomein-oru", raw=raw,
                              codec="latin-1"))
    clock.advance(0)
    assert sum(batches) == 40 * 15 * MB
    # each planned letter also holds its decoded PDF and its outbound MDM^T02 until the commit
    assert max(batches) <= 64 * MB, f"one batch planned {max(batches) / MB:.0f} MB of letters at once"


def test_processor_plans_a_message_larger_than_the_byte_bound_alone_and_keeps_the_order(monkeypatch):
    """A message over BATCH_BYTES is still planned (a batch of one); the others follow in order."""
    from engine.metrics import Metrics
    from engine.shell import processor as proc

    monkeypatch.setattr(proc, "BATCH_BYTES", 100)
    clock = MemoryReactorClock()
    batches: list[list[int]] = []
    processor = proc.Processor(mappings=None, book=None, store=None, committer=None, clock=clock,
                               metrics=Metrics(), destinations={}, control_ids=lambda: "K1")

    def commit_batch(works):
        batches.append([w.message_id for w in works])
        return defer.succeed([proc.Outcome(status="mapped", detail="") for _ in works])

    processor._commit_batch = commit_batch
    for n, size in enumerate([40, 500, 40, 40, 40], start=1):
        processor.submit(proc.Work(message_id=n, channel="zorgdomein-in", mapping="zorgdomein-oru",
                                   raw=b"x" * size, codec="latin-1"))
    clock.advance(0)
    assert batches == [[1], [2], [3, 4], [5]]


def test_agenda_show_does_not_read_the_attachment_bodies(tmp_path, capsys):
    """`koppel agenda show` lists attachments (hash, type, size, name) without loading their bytes."""
    from engine.cli import main

    url = f"sqlite:///{tmp_path}/k.db"
    store = open_store(url)
    digests = []
    for n in range(3):
        pdf = bytes([n]) * (4 * MB)
        digest = hashlib.sha256(pdf).hexdigest()
        digests.append(digest)
        store.write([PutAttachment(sha256=digest, media_type="application/pdf", filename=f"bijlage{n}.pdf",
                                   data=pdf)])
    store.write([SaveAgendaEntry(
        entry_id=None, agenda_id="cardio-poli", kind="referral", state="requested", zd_number=ZD,
        placer_id=None, filler_id=None, data=json.dumps({"patient.bsn": "123456782"}),
        attachments=tuple(digests), keys=(f"zd:{ZD}",), at=1795430000.0, message_id=7, action="create",
        from_state=None, changed=("patient.bsn",))])
    store.close()
    # once unmeasured: the modules it imports lazily (compiled from source where no .pyc can be
    # written, PYTHONDONTWRITEBYTECODE) cost MBs for a moment that are not attachment bytes
    assert main(["agenda", "show", ZD, "--store", url, "--json"]) == 0
    capsys.readouterr()
    status, peak = peak_of(lambda: main(["agenda", "show", ZD, "--store", url, "--json"]))
    assert status == 0
    shown = json.loads(capsys.readouterr().out)
    assert [a["size"] for a in shown["attachments"]] == [4 * MB] * 3
    assert peak < 2 * MB, f"agenda show allocated {peak / MB:.1f} MB to list 3 attachments of 4 MB"


def test_base64_without_padding_is_decoded_not_stored_as_text(oru_mapping):
    """A base64 letter sent without its '=' padding is stored as the decoded document."""
    pdf = b"%PDF-1.4\n" + os.urandom(1000)  # 1009 bytes: base64 ends in '='
    data = base64.b64encode(pdf).decode("ascii")
    assert data.endswith("=")
    event = mapped_event(oru_mapping, oru(data.rstrip("=")))
    (attachment,) = ag.attachments_of(event)
    assert attachment.payload == pdf
    assert attachment.sha256 == hashlib.sha256(pdf).hexdigest()  # the same letter padded: stored once


@pytest.mark.parametrize("spoil", [
    lambda data: data[:4 * 500 + 1],  # cut one character past a 4-character group: no padding makes it whole
    lambda data: data[:1000] + "%" + data[1000:],  # a character outside base64's alphabet
    lambda data: data[:1000] + "==" + data[1000:],  # padding in the middle: two documents glued
])
def test_base64_that_does_not_decode_is_a_mapping_error_not_a_stored_document(oru_mapping, spoil):
    """A base64 field that does not decode is refused, naming OBX-5.5, not stored as its text.
    (A letter cut on a 2- or 3-character boundary decodes once padded: base64 alone cannot tell.)"""
    _, data = letter_b64(3001)
    result = oru_mapping.apply(Message.parse(oru(spoil(data)), codec="latin-1"))
    assert not result.ok
    assert [(e.field, e.reason) for e in result.errors] == [("attachments[1].data", "cannot convert with base64: not valid base64")]
    assert "OBX" in result.errors[0].path and "5.5" in result.errors[0].path


def test_stored_attachment_media_type_is_the_mime_type(oru_mapping):
    """The attachment is stored as application/pdf (OBX-5.2/5.3), not as the bare subtype 'pdf'."""
    _, data = letter_b64(300)
    (attachment,) = ag.attachments_of(mapped_event(oru_mapping, oru(data)))
    assert attachment.media_type == "application/pdf"


def test_map_preview_does_not_print_the_whole_base64_letter(tmp_path, oru_mapping):
    """`koppel map` shows the outbound MDM^T02 with the base64 data elided, not megabytes of it."""
    from engine.bundle import load_bundle
    from engine.preview import preview

    bundle = load_bundle(ROOT / "channels", ROOT / "mappings")
    store = open_store(f"sqlite:///{tmp_path}/k.db")
    store.write([SaveAgendaEntry(
        entry_id=None, agenda_id="cardio-poli", kind="referral", state="requested", zd_number=ZD,
        placer_id=None, filler_id=None, data=json.dumps({"patient.bsn": "123456782"}), attachments=(),
        keys=(f"zd:{ZD}",), at=1795430000.0, message_id=7, action="create", from_state=None,
        changed=("patient.bsn",))])
    _, data = letter_b64(2 * MB)
    try:
        result = preview(bundle, "zorgdomein-in", oru(data), store=store, patient_data=False)
    finally:
        store.close()
    assert result["outcome"] == "mapped", result
    text = json.dumps(result)
    assert len(text) < 64 * 1024, f"koppel map prints {len(text) / MB:.1f} MB for a 2 MB letter"


# ------------------------------------------------------------------- good behaviour, pinned


def test_framing_20_mb_in_64_kib_chunks_is_linear_and_exact():
    """A 20 MB frame fed in 64 KiB reads comes out whole, once."""
    payload = oru("A" * (20 * MB))
    frame = mllp.encode_frame(payload)
    reader = mllp.FrameReader(max_frame_bytes=64 * MB)
    events = []
    for i in range(0, len(frame), 65536):
        events += reader.feed(frame[i:i + 65536])
    assert [type(e) for e in events] == [mllp.FrameReceived]
    assert events[0].payload == payload


def test_header_of_a_large_letter_reads_only_msh():
    """read_header does not scan the body: MSH-9/10 of a 20 MB letter."""
    header = read_header(oru("A" * (20 * MB)), default_charset="8859/1")
    assert header.rejection is None
    assert (header.type_and_trigger, header.control_id) == ("ORU^R01", ZD)


@pytest.mark.parametrize("line_end", ["\\X0D\\\\X0A\\", "\\X0A\\", "\\.br\\", "\\X0D0A\\"])
def test_base64_with_escaped_line_breaks_decodes_to_the_letter(oru_mapping, line_end):
    """Base64 wrapped at 76 characters with escaped line breaks decodes to the exact bytes."""
    pdf, data = letter_b64(4000)
    wrapped = line_end.join(data[i:i + 76] for i in range(0, len(data), 76))
    (attachment,) = ag.attachments_of(mapped_event(oru_mapping, oru(wrapped)))
    assert attachment.payload == pdf


def test_filename_with_escaped_repetition_is_unescaped(oru_mapping):
    """NTE-3 `ZD\\R\\logo.png` is the file name `ZD_logo.png` (ZorgDomein's repetition is `_`)."""
    _, data = letter_b64(300)
    (attachment,) = ag.attachments_of(mapped_event(oru_mapping, oru(data, filename="ZD\\R\\logo.png")))
    assert attachment.filename == "ZD_logo.png"


def test_same_letter_twice_in_one_message_is_one_attachment(oru_mapping):
    """The same document in two OBX (differently wrapped) is one attachment by sha256."""
    pdf, data = letter_b64(3000)
    wrapped = "\\.br\\".join(data[i:i + 76] for i in range(0, len(data), 76))
    raw = oru(data).replace(
        b"NTE|1|P|verwijsbrief.pdf|RE\r",
        b"NTE|1|P|verwijsbrief.pdf|RE\rOBX|2|ED|BLOB^Bijlage^ZORGDOMEIN|2|^application^pdf^Base64^"
        + wrapped.encode() + b"||||||F\rNTE|2|P|kopie.pdf|RE\r",
    )
    attachments = ag.attachments_of(mapped_event(oru_mapping, raw))
    assert [a.payload for a in attachments] == [pdf]


def test_outbound_mdm_carries_the_letter_unchanged(oru_mapping):
    """The MDM^T02 built for the archive carries the same base64 as received."""
    pdf, data = letter_b64(MB)
    event = mapped_event(oru_mapping, oru(data))
    entry = ag.AgendaEntry(id="1", agenda_id="cardio-poli", kind="referral", state="requested", zd_number=ZD)
    ((to, built),) = build_outbound(oru_mapping, event, entry, control_id="K1",
                                    timestamp=dt.datetime(2026, 1, 2, 12, tzinfo=dt.timezone.utc))
    assert to == "document-archive"
    obx = next(s for s in built.split(b"\r") if s.startswith(b"OBX"))
    assert base64.b64decode(obx.split(b"|")[5].split(b"^")[4]) == pdf
