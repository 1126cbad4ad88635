"""koppel_agenda_held and koppel_agenda_held_oldest_age_seconds: a message held for an agenda
entry that does not come (a letter whose request was refused upstream) must not wait unseen.
The processor refreshes them with the other agenda gauges; alert KoppelAgendaHeldLong."""

from __future__ import annotations

from tests.test_agenda_orderings import Harness, oru, srm, world  # noqa: F401 - the fixture


def gauges(harness: Harness) -> tuple[float, float]:
    harness.processor.refresh_gauges()
    sample = harness.metrics.registry.get_sample_value
    return sample("koppel_agenda_held"), sample("koppel_agenda_held_oldest_age_seconds")


def test_a_letter_waiting_for_its_request_is_counted_with_its_age_until_the_request_comes(world):  # noqa: F811
    harness = world("held")
    assert gauges(harness) == (0, 0)
    letter = harness.receive(oru())
    assert harness.outcome(letter)[0] == "held"
    harness.reactor.advance(3 * 3600)
    assert gauges(harness) == (1, 3 * 3600)
    harness.receive(srm())  # the request: the letter is applied, nothing waits any more
    assert harness.outcome(letter)[0] == "mapped"
    assert gauges(harness) == (0, 0)


def test_the_gauges_fail_soft_when_the_store_cannot_answer(world):  # noqa: F811
    harness = world("failing")
    harness.receive(oru())
    harness.reactor.advance(60)
    assert gauges(harness) == (1, 60)

    def broken():
        raise OSError("disk gone")

    harness.store.held_backlog = broken
    harness.processor.refresh_gauges()  # logs agenda.gauge_failed; the last values stay
    assert gauges(harness) == (1, 60)
