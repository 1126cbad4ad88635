"""End to end over real sockets, the on-call flow `koppel reprocess` exists for: ZorgDomein's
cancellation (SRM^S04) of a referral arrives before its request (SRM^S01), so it is stored,
acknowledged and recorded `error` ("cannot cancel: no entry"); the request then arrives and the
HIS gets its SIU^S12. The operator finds the failed cancellation (`koppel messages --processing
error`) and hands it to mapping again through the running engine's admin API: the entry ends
cancelled and the HIS gets the SIU^S15. Synthetic data (test BSN 123456782)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sink import KoppelProcess, Sink, write_bundle  # noqa: E402
from test_e2e_agenda import DESTINATIONS, Harness, msh9, segment, srm  # noqa: E402

ZD = "ZD900000033"
TOKEN = "e2e-reprocess-token"


class AdminHarness(Harness):
    """The bundled channels and mappings with the admin API on 127.0.0.1 port 0."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.sinks = {name: Sink(name=name).start() for name in DESTINATIONS}
        self.store_url = f"sqlite:///{tmp / 'koppel.db'}"
        channels = write_bundle(tmp, {name: sink.port for name, sink in self.sinks.items()})
        env = {**os.environ, "KOPPEL_ADMIN_TOKEN": TOKEN}
        self.engine = KoppelProcess(channels, self.store_url, workdir=tmp, admin="tcp:0:interface=127.0.0.1",
                                    env=env)
        self.engine.launch()
        self.admin = self.engine.wait_for("admin.started")["port"]
        self.engine.wait_for("engine.started")
        self.ports = self.engine.ports
        self.sent = 0

    def post(self, path: str, body: dict) -> tuple[int, dict]:
        import requests

        answer = requests.post(f"http://127.0.0.1:{self.admin}{path}", json=body, timeout=10,
                               headers={"Authorization": f"Bearer {TOKEN}"})
        return answer.status_code, answer.json()


@pytest.fixture
def harness(tmp_path):
    h = AdminHarness(tmp_path)
    try:
        yield h
    finally:
        h.close()


def test_a_cancellation_that_came_before_its_request_is_reprocessed_and_reaches_the_his(harness):
    h = harness
    h.send("zorgdomein-in", srm(ZD, "SRMC4", trigger="S04"))
    h.wait_processed({"error": 1})
    h.send("zorgdomein-in", srm(ZD, "SRMC1"))
    h.wait_processed({"error": 1, "mapped": 1})
    (request,) = h.received("his-scheduling", 1)
    assert msh9(request) == "SIU^S12^SIU_S12"

    listed = h.koppel("messages", "--store", h.store_url, "--processing", "error", "--json")
    assert listed.returncode == 0, listed.stderr
    (failed,) = json.loads(listed.stdout)
    assert (failed["control_id"], failed["message_type"]) == ("SRMC4", "SRM^S04")
    assert "cannot cancel" in failed["processing_detail"]

    status, answer = h.post(f"/api/messages/{failed['id']}/reprocess", {"reason": "request came after"})
    assert (status, answer["was"], answer["mapping"]) == (200, "error", "started"), answer
    h.wait_processed({"mapped": 2})
    assert h.agenda("show", ZD)["state"] == "cancelled"
    _, cancelled = h.received("his-scheduling", 2)
    assert msh9(cancelled) == "SIU^S15^SIU_S12"
    assert segment(cancelled, "SCH").split("|")[1].split("^")[0] == ZD

    audit = h.koppel("audit", "--store", h.store_url)
    assert "reprocess" in audit.stdout and str(failed["id"]) in audit.stdout
    # a second reprocess of the same message is refused: it is mapped now
    status, answer = h.post(f"/api/messages/{failed['id']}/reprocess", {})
    assert status == 409 and "is mapped" in answer["message"]
