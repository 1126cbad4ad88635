"""What to do with one received frame: read its header, apply the channel's accept
rules, and decide the acknowledgement. Pure: the shell stores and writes.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from engine.core.ack import AckDecision, build_ack, decide
from engine.core.errors import ErrorCode, ErrorLocation, Rejection
from engine.core.header import Header, read_header


@dataclass(frozen=True, slots=True, kw_only=True)
class AcceptRules:
    """A channel's accept list; ``None`` means "any"."""

    types: frozenset[str] | None = None  # "SRM^S01" exact, or "SRM" for any trigger
    versions: frozenset[str] | None = None
    processing_ids: frozenset[str] | None = None
    rejected_code: str = "AR"  # what a refused message gets in original mode: AR, or AE (see AckConfig)


ACCEPT_ALL = AcceptRules()


def check_accept(header: Header, rules: AcceptRules) -> Rejection | None:
    """The AR a channel answers for a message outside its accept list, or None."""
    if rules.types is not None:
        msg_type, trigger = header.message_type, header.trigger
        if f"{msg_type}^{trigger}" not in rules.types and msg_type not in rules.types:
            known_type = any(t.split("^", 1)[0] == msg_type for t in rules.types)
            if known_type:
                return _ar(ErrorCode.UNSUPPORTED_EVENT, "message trigger event not accepted on this channel", 9)
            return _ar(ErrorCode.UNSUPPORTED_MESSAGE_TYPE, "message type not accepted on this channel", 9)
    if rules.versions is not None and header.version not in rules.versions:
        return _ar(ErrorCode.UNSUPPORTED_VERSION, "HL7 version not accepted on this channel", 12)
    if rules.processing_ids is not None and header.processing_id not in rules.processing_ids:
        return _ar(ErrorCode.UNSUPPORTED_PROCESSING_ID, "processing id not accepted on this channel", 11)
    return None


def _ar(code: ErrorCode, text: str, field: int) -> Rejection:
    return Rejection(ack_code="AR", error_code=code, text=text, location=ErrorLocation(field=field))


STORE_FAILED = Rejection(
    ack_code="AE",
    error_code=ErrorCode.APPLICATION_INTERNAL_ERROR,
    text="message could not be stored; send it again",
)
INTERNAL_ERROR = Rejection(
    ack_code="AE",
    error_code=ErrorCode.APPLICATION_INTERNAL_ERROR,
    text="internal error while receiving the message; send it again",
)
QUEUE_FULL = Rejection(
    ack_code="AE",
    error_code=ErrorCode.APPLICATION_INTERNAL_ERROR,
    text="destination queue full; send it again later",
)
# A resend of an on-map message whose first copy is still being mapped: its answer is not
# decided yet, and the first copy's provisional AA must not go out for it.
IN_PROGRESS = Rejection(
    ack_code="AE",
    error_code=ErrorCode.RECORD_LOCKED,
    text="the first copy of this message is still being processed; send it again later",
)
TOO_LARGE = Rejection(
    ack_code="AR",
    error_code=ErrorCode.SEGMENT_SEQUENCE,
    text="message too large",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class Assessment:
    """One frame, read and judged: stored as ``accepted`` only if ``rejection`` is None."""

    header: Header
    rejection: Rejection | None
    payload_hash: bytes

    @property
    def accepted(self) -> bool:
        return self.rejection is None

    def decision(self, failure: Rejection | None = None, *, always: bool = False) -> AckDecision:
        rejection = failure or self.rejection
        return decide(self.header, rejection.ack_code if rejection else "AA", always=always)

    def ack(self, *, timestamp: str, control_id: str, failure: Rejection | None = None,
            always: bool = False) -> tuple[str, bytes]:
        """(wire code, ACK payload); the payload is b"" when MSH-15 says to withhold it
        (unless ``always``)."""
        rejection = failure or self.rejection
        decision = self.decision(failure, always=always)
        if not decision.send:
            return decision.code, b""
        return decision.code, build_ack(
            self.header,
            code=decision.code,
            timestamp=timestamp,
            control_id=control_id,
            rejection=rejection,
        )


def assess(payload: bytes, *, rules: AcceptRules, default_charset: str) -> Assessment:
    header = read_header(payload, default_charset=default_charset)
    rejection = header.rejection or check_accept(header, rules)
    if rejection is not None:
        rejection = as_refused(rejection, rules.rejected_code)
    return Assessment(
        header=header, rejection=rejection, payload_hash=hashlib.sha256(payload).digest()
    )


def assess_oversize(head: bytes, *, default_charset: str, rejected_code: str = "AR") -> Assessment:
    """An over-limit frame: answer AR "too large", mirroring what its head lets us read."""
    header = read_header(head, default_charset=default_charset)
    return Assessment(header=header, rejection=as_refused(TOO_LARGE, rejected_code), payload_hash=b"")


def as_refused(rejection: Rejection, code: str) -> Rejection:
    """``rejection`` answered with the channel's code for a refusal (``ack.rejected``) where
    HL7 says AR; every other answer as it is."""
    if rejection.ack_code != "AR" or code == "AR":
        return rejection
    return replace(rejection, ack_code=code)
