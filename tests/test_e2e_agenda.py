"""End to end over real sockets: ZorgDomein-style messages -> ``koppel run`` on the bundled
channels and mappings -> agenda entries (seen with ``koppel agenda``) and outbound messages at
four sinks standing in for the HIS, RIS, LIS and document archive.

The bundled ``channels/*.yaml`` are copied with only their addresses changed: listeners on
``tcp:0`` (127.0.0.1), destination endpoints at tests/sink.py sinks on 127.0.0.1:0. The
mappings are the bundled ones, untouched. Messages go in with ``koppel send`` (one connection
per call, each message only after the previous one's ACK, so arrival order is send order).

Two referrals, all data synthetic (test BSN 123456782, made-up names, AGB codes and PDFs):

* A (cardiology): the referral letter (ORU^R01) arrives *before* its request (SRM^S01), then
  the hospital scheduler books it (SIU^S12 on the scheduler channel), then ZorgDomein cancels
  it (SRM^S04);
* B (radiology echo): a diagnostic order (ORM^O01), then its letter (ORU^R01).

Waiting is by polling the store with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sink import BUNDLE_DESTINATIONS, KOPPEL, KoppelProcess, MLLPClient, Sink, write_bundle  # noqa: E402

from engine.core.header import read_header  # noqa: E402
from engine.store import open_store  # noqa: E402

TIMEOUT = 15.0
ZD_A = "ZD900000011"
ZD_B = "ZD900000022"
FILLER_A = "F900001"
BSN = "123456782"  # the test BSN (passes the 11-proof, belongs to nobody)
PDF_A = b"%PDF-1.4\n% synthetic referral letter A (test data)\n%%EOF\n"
PDF_B = b"%PDF-1.4\n% synthetic request form B (test data)\n%%EOF\n"
DESTINATIONS = BUNDLE_DESTINATIONS


# ------------------------------------------------------------------------------- messages
def _hl7(*segments: str) -> bytes:
    return ("\r".join(segments) + "\r").encode("latin-1")


def srm(zd: str, control_id: str, trigger: str = "S01") -> bytes:
    """ZorgDomein appointment request (S01) or its cancellation (S04), shaped like ZD's own."""
    return _hl7(
        f"MSH|^~\\&|ZorgDomein||KOPPEL|ZIEKENHUIS|20261123120000+0100||SRM^{trigger}^SRM_S01|{control_id}|P|2.4"
        "|||||NLD|8859/1",
        f"ARQ|{zd}|||||CARHAR^Cardiologie / Hartfalen^99zda|CARREG001^consult cardioloog^99zda|REG^regulier^99zda"
        "|||20261201^20261231|R|||01000001^Testarts^T.^^^^^^VEKTIS|010-5550000^^PH",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{zd}^^^ZorgDomein^VN||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F"
        "|||Teststraat 1&Teststraat&1^^Koppelstad^^1234AB^NL^M||010-5550001^PRN^PH",
        "RGS|1|U",
        "AIS|1|U|^consult cardioloog",
        "AIG|1|U|CAR^Cardiologie^99zda",
        "AIL|1|U|^^^06990001&Ziekenhuis Koppelstad",
        "AIP|1|U|^Testdokter^T.",
    )


def oru(zd: str, pdf: bytes, filename: str) -> bytes:
    """ZorgDomein letter: delimiters ^_\\&, MSH-10 = OBR-2 = ORC-2 = the ZD-number, PDF in OBX-5."""
    data = base64.b64encode(pdf).decode("ascii")
    return _hl7(
        f"MSH|^_\\&|ZorgDomein||KOPPEL|ZIEKENHUIS|20261123115900+0100||ORU^R01|{zd}|P|2.4",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F",
        "PV1|1|O",
        f"ORC|NW|{zd}|||||||20261123115800+0100|||01000001^&&Testarts^T.^^^^^^VEKTIS",
        f"OBR|1|{zd}||CIS^Verwijzing^ZORGDOMEIN|||20261123115800+0100",
        f"OBX|1|ED|LETTER^Verwijsbrief^ZORGDOMEIN||^application^pdf^Base64^{data}||||||F",
        f"NTE|1|L|{filename}",
    )


def orm(zd: str, control_id: str) -> bytes:
    """ZorgDomein diagnostic order (2.4): cluster NTE, PV2-3 care product, ORC-4 = ZD-number."""
    return _hl7(
        f"MSH|^~\\&|ZorgDomein||OrderModule||20261123121000+0100||ORM^O01^ORM_O01|{control_id}|P|2.4|||||NLD|8859/1",
        "NTE|1||Radiologie|ZD_CLUSTER_NAME",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD~{zd}^^^ZorgDomein^VN||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F"
        "|||Teststraat 1&Teststraat&1^^Koppelstad^^1234AB^NL^M",
        "PV1|1|O",
        "PV2|||BEEEDG008^Echo test^99zda",
        "IN1|1|^null|0^^^LOCAL|Testverzekeraar",
        f"ORC|NW|{zd}||{zd}|||^^^^^R||20261123121000+0100|01000001^Testarts, T.^T.^^^^^^vektis",
        f"OBR|1|{zd}||ECHOXU^Echo test^99zdl|||||||O",
        "OBX|1|ST|REDE^Reden van aanvraag^99zda||synthetische testvraag||||||F",
    )


def siu(zd: str, filler: str, control_id: str, trigger: str = "S12") -> bytes:
    """The hospital scheduler's booking: SCH-1 = the placer's id (here the ZD-number), SCH-2 its own."""
    return _hl7(
        f"MSH|^~\\&|HIX|ZIEKENHUIS|KOPPEL|ZIEKENHUIS|20261201090000+0100||SIU^{trigger}^SIU_{trigger}|{control_id}|P|2.5",
        f"SCH|{zd}|{filler}|||||^Controle||30|MIN|^^30^20261210093000+0100^20261210100000+0100||||||||||||||Booked",
        f"PID|1||{BSN}^^^NLMINBIZA^NNNLD||Testpatiënt&&Testpatiënt^T^^^^^L||19800101|F",
        "AIS|1||CARPOLI^Polikliniek cardiologie",
    )


# ------------------------------------------------------------------------------- harness
class Harness:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sinks = {name: Sink(name=name).start() for name in DESTINATIONS}
        self.store_url = f"sqlite:///{tmp / 'koppel.db'}"
        channels = write_bundle(tmp, {name: sink.port for name, sink in self.sinks.items()})
        self.engine = KoppelProcess(channels, self.store_url, workdir=tmp,
                                    metrics="tcp:0:interface=127.0.0.1")
        self.engine.start(until="engine.started")
        self.ports = self.engine.ports
        self.sent = 0

    def koppel(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([str(KOPPEL), *args], capture_output=True, text=True, cwd=self.tmp, timeout=30)

    def send(self, channel: str, *messages: bytes) -> list[list[str]]:
        """``koppel send`` on one connection, in order; every answer must be AA for its MSH-10."""
        paths = []
        for message in messages:
            self.sent += 1
            path = self.tmp / f"msg{self.sent:02d}.hl7"
            path.write_bytes(message)
            paths.append(str(path))
        done = self.koppel("send", "--to", f"127.0.0.1:{self.ports[channel]}", "--timeout", "10", *paths)
        rows = [line.split("\t") for line in done.stdout.splitlines()]
        assert done.returncode == 0, (done.stdout, done.stderr, self.engine.tail())
        expected = [read_header(m, default_charset="8859/1").control_id for m in messages]
        assert [(r[1], r[2]) for r in rows] == [("AA", cid) for cid in expected], rows
        return rows

    def agenda(self, *args: str):
        done = self.koppel("agenda", *args, "--store", self.store_url, "--json")
        assert done.returncode == 0, (done.stdout, done.stderr)
        return json.loads(done.stdout)

    def wait_processed(self, counts: dict[str, int]) -> None:
        """Until the store says the inbound messages were processed so (mapped, held, error...)."""
        store = open_store(self.store_url)
        try:
            deadline = time.monotonic() + TIMEOUT
            while (got := store.processing_counts()) != counts:
                if time.monotonic() > deadline:
                    raise AssertionError(f"processing counts {got}, expected {counts}\n{self.engine.tail()}")
                time.sleep(0.02)
        finally:
            store.close()

    def received(self, destination: str, count: int) -> list[bytes]:
        sink = self.sinks[destination]
        assert sink.wait_until(lambda s: len(s.records) >= count, TIMEOUT), (destination, sink.stats())
        return [r.raw for r in sink.records]

    def close(self) -> None:
        self.engine.terminate()
        for sink in self.sinks.values():
            sink.down()


@pytest.fixture
def harness(tmp_path):
    h = Harness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def msh9(raw: bytes) -> str:
    header = read_header(raw, default_charset="8859/1")
    assert header.rejection is None, header.rejection
    return header.text(header.field(9))


def segment(raw: bytes, name: str) -> str:
    (found,) = [s for s in raw.decode("latin-1").split("\r") if s.startswith(name + "|")]
    return found


# ------------------------------------------------------------------------------- the test
def test_referrals_land_in_their_agendas_and_their_messages_reach_the_hospital_systems(harness):
    h = harness
    # Referral A's letter comes before its request; B's order before its letter.
    h.send("zorgdomein-in",
           oru(ZD_A, PDF_A, "verwijsbrief-a.pdf"), srm(ZD_A, "SRMA1"), orm(ZD_B, "ORMB1"),
           oru(ZD_B, PDF_B, "aanvraag-b.pdf"))
    h.send("scheduler-in", siu(ZD_A, FILLER_A, "SIUA1"))
    h.wait_processed({"mapped": 5})

    # -- the agendas, as the operator sees them
    entries = {e["zd_number"]: e for e in h.agenda("list")}
    assert set(entries) == {ZD_A, ZD_B}
    a, b = entries[ZD_A], entries[ZD_B]
    assert (a["agenda"], a["kind"], a["state"], a["filler_id"]) == (
        "cardiology", "appointment-request", "booked", FILLER_A)
    assert (b["agenda"], b["kind"], b["state"]) == ("radiology-echo", "diagnostic-order", "ordered")
    assert len(a["attachments"]) == 1 and len(b["attachments"]) == 1
    assert "data" not in a  # list shows keys and states, no patient fields
    assert [e["zd_number"] for e in h.agenda("list", "--agenda", "cardiology")] == [ZD_A]
    assert [e["zd_number"] for e in h.agenda("list", "--state", "ordered")] == [ZD_B]

    shown = h.agenda("show", ZD_A, "--data")
    assert shown["state"] == "booked" and shown["agenda"] == "cardiology"
    assert [x["action"] for x in shown["history"]][0] == "create"
    assert [(x["from"], x["to"]) for x in shown["history"]][-1] == ("requested", "booked")
    (letter,) = shown["attachments"]  # the letter that came first is attached, not lost
    assert (letter["filename"], letter["size"]) == ("verwijsbrief-a.pdf", len(PDF_A))
    assert letter["media_type"].lower().endswith("pdf")  # the mapping stores OBX-5.3 ("pdf"), not a MIME type
    assert shown["data"]["patient.bsn"] == BSN
    assert shown["data"]["care_product"]["code"] == "CARREG001"
    shown_b = h.agenda("show", ZD_B)
    assert [a["filename"] for a in shown_b["attachments"]] == ["aanvraag-b.pdf"]
    assert shown_b["data"]["care_product"]["code"] == "BEEEDG008"

    # -- what the hospital's systems received
    (his,) = h.received("his-scheduling", 1)
    assert msh9(his) == "SIU^S12^SIU_S12"
    assert read_header(his, default_charset="8859/1").field(5) == b"HIS"  # the destination's rewrite
    assert segment(his, "SCH").split("|")[1].split("^")[0] == ZD_A
    assert f"{BSN}^^^NLMINBIZA" in segment(his, "PID")

    (ris,) = h.received("ris-orders", 1)
    assert msh9(ris) == "ORM^O01^ORM_O01"
    assert segment(ris, "ORC").split("|")[4].split("^")[0] == ZD_B
    assert segment(ris, "OBR").split("|")[4].startswith("ECHOXU^")

    archived = h.received("document-archive", 1)
    assert all(msh9(m) == "MDM^T02^MDM_T02" for m in archived)
    by_zd = {segment(m, "TXA").split("|")[14].split("^")[0]: m for m in archived}  # TXA-14: the referral
    assert len({segment(m, "TXA").split("|")[12] for m in archived}) == len(archived)  # TXA-12: one per document
    assert base64.b64encode(PDF_B).decode() in segment(by_zd[ZD_B], "OBX")
    assert segment(by_zd[ZD_B], "NTE").endswith("|aanvraag-b.pdf")
    assert h.sinks["lis-orders"].records == []

    # -- ZorgDomein cancels A
    h.send("zorgdomein-in", srm(ZD_A, "SRMA2", trigger="S04"))
    h.wait_processed({"mapped": 6})
    shown = h.agenda("show", ZD_A)
    assert shown["state"] == "cancelled"
    assert (shown["history"][-1]["action"], shown["history"][-1]["from"]) == ("cancel", "booked")
    assert [e["zd_number"] for e in h.agenda("list", "--state", "cancelled")] == [ZD_A]
    assert h.agenda("show", ZD_B)["state"] == "ordered"
    # the HIS, which got the request and booked it, is told: SIU^S15 naming its own booking
    _, cancelled = h.received("his-scheduling", 2)
    assert msh9(cancelled) == "SIU^S15^SIU_S12"
    sch = segment(cancelled, "SCH").split("|")
    assert (sch[1].split("^")[0], sch[2], sch[25].split("^")[0]) == (ZD_A, FILLER_A, "Cancelled")
    assert read_header(cancelled, default_charset="8859/1").field(5) == b"HIS"  # the destination's rewrite


def test_a_letter_that_came_before_its_request_still_reaches_the_document_archive(harness):
    h = harness
    h.send("zorgdomein-in", oru(ZD_A, PDF_A, "verwijsbrief-a.pdf"), srm(ZD_A, "SRMA1"))
    h.wait_processed({"mapped": 2})
    assert h.sinks["document-archive"].wait_until(lambda s: len(s.records) >= 1, 3.0)
    (archived,) = [r.raw for r in h.sinks["document-archive"].records]
    assert base64.b64encode(PDF_A).decode() in segment(archived, "OBX")


def test_referrals_acknowledged_just_before_a_kill_9_are_mapped_after_the_restart(harness):
    """ACK after the store commit, mapping a turn later: a kill -9 in between leaves messages
    'pending', and the restarted engine maps them (agenda entry, SIU^S12 to the HIS)."""
    sent: list[str] = []
    pending = 0
    for attempt in range(5):  # until a kill lands between an ACK and its mapping commit
        port = harness.engine.ports["zorgdomein-in"]
        batch = [f"ZD77{attempt}{n:05d}" for n in range(60)]
        with MLLPClient(port) as client:
            for n, zd in enumerate(batch):
                assert b"MSA|AA|" in client.request(srm(zd, f"K{attempt}-{n}"))
        harness.engine.kill()
        sent += batch
        store = open_store(harness.store_url)
        try:
            pending = len(store.pending_processing(limit=1000))
        finally:
            store.close()
        harness.engine.start(until="engine.started")
        if pending:
            break
    assert pending, "no kill landed between an ACK and its mapping (the test proved nothing)"
    harness.wait_processed({"mapped": len(sent)})
    entries = harness.agenda("list", "--agenda", "cardiology")
    assert sorted(e["zd_number"] for e in entries) == sorted(sent)
    assert harness.engine.events.get("mapping.resumed", 0) >= 1
    harness.received("his-scheduling", len(sent))  # every SIU^S12 reached the HIS
