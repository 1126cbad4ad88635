"""What an answer from a destination means for the message that was sent.

Pure: the sender passes in what came back (an ACK payload, or nothing because of a
timeout or a broken connection) and gets one of three verdicts. A mismatched MSA-2,
an unreadable answer or a late one never counts as delivered.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from engine.core.response import AckReply, read_ack

Verdict = Literal["delivered", "retry", "dead-letter"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    verdict: Verdict
    code: str  # the ACK code received ("" when none could be read)
    reason: str  # safe text for logs and the queue's last error
    resync: bool = False  # the connection can no longer be trusted: close it before retrying
    mismatch: bool = False  # an ACK for another message (MSA-2): its code says nothing about ours


def judge(
    answer: bytes | None,
    *,
    sent_control_id: str,
    on_nak: dict[str, str],
    failure: str | None = None,
) -> Outcome:
    """Verdict for one attempt; ``failure`` names what went wrong when no answer came."""
    if answer is None:
        return Outcome(verdict="retry", code="", reason=failure or "no answer", resync=True)
    reply: AckReply = read_ack(answer)
    if not reply.readable:
        return Outcome(verdict="retry", code="", reason="unreadable acknowledgement", resync=True)
    if reply.control_id != sent_control_id:
        return Outcome(
            verdict="retry",
            code=reply.code,
            reason="acknowledgement for another message (MSA-2 mismatch)",
            resync=True,
            mismatch=True,
        )
    if reply.success:
        return Outcome(verdict="delivered", code=reply.code, reason="")
    action = on_nak.get(reply.code, "retry")
    verdict: Verdict = "dead-letter" if action == "dead-letter" else "retry"
    return Outcome(verdict=verdict, code=reply.code, reason=f"destination answered {reply.code}")
