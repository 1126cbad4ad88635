"""The test sink judges Koppel's deliveries in the e2e tests and the benchmarks, so its own
bookkeeping is tested: counts kept as answers happen must agree with what it answered."""

from __future__ import annotations

import time

from sink import MLLPClient, Sink, SinkProcess, make_message


def _send(port: int, ids: list[str]) -> list[str]:
    codes = []
    with MLLPClient(port) as client:
        for cid in ids:
            answer = client.request(make_message(cid))
            codes.append(answer.split(b"MSA|", 1)[1][:2].decode())
    return codes


def test_stats_count_answers_duplicates_and_the_first_and_last_success():
    with Sink(keep_raw=False) as sink:
        sink.nak_next("AE")
        before = time.monotonic()
        assert _send(sink.port, ["A1", "A1", "A2", "A1"]) == ["AE", "AA", "AA", "AA"]
        stats = sink.stats()
        first, last = sink.first_last_delivery()
    assert (stats["received"], stats["delivered"], stats["duplicates"]) == (4, 2, 1)
    assert stats["answers"] == {"AE": 1, "AA": 3}
    assert before < first < last <= time.monotonic()
    assert (stats["first"], stats["last"]) == (first, last)
    assert sink.delivered_ids() == ["A1", "A2"]


def test_a_sink_process_answers_and_reports_like_an_in_process_sink():
    sink = SinkProcess()
    try:
        assert sink.first_last_delivery() is None
        assert _send(sink.port, ["P1", "P2", "P1"]) == ["AA", "AA", "AA"]
        assert sink.wait_until(lambda s: s.delivered_count() == 2, 5)
        assert sink.delivered_ids() == ["P1", "P2"]
        assert sink.duplicates() == 1
        first, last = sink.first_last_delivery()
        assert first < last
        sink.down()
        sink.up()
        assert _send(sink.port, ["P3"]) == ["AA"]  # the same port after down/up
        assert sink.stats()["delivered"] == 3
    finally:
        sink.close()
    assert sink.proc.returncode == 0
