"""Errors that say whose fault they are.

A ``RemoteError`` is the peer's fault: it carries what to answer on the wire (the
original-mode ACK code, an HL7 table 0357 error code, where in the message, and a
text that never contains patient data). A ``LocalError`` is our own misuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class ErrorCode(IntEnum):
    """HL7 table 0357 (message error condition codes)."""

    OK = 0
    SEGMENT_SEQUENCE = 100
    REQUIRED_FIELD_MISSING = 101
    DATA_TYPE = 102
    TABLE_VALUE_NOT_FOUND = 103
    UNSUPPORTED_MESSAGE_TYPE = 200
    UNSUPPORTED_EVENT = 201
    UNSUPPORTED_PROCESSING_ID = 202
    UNSUPPORTED_VERSION = 203
    UNKNOWN_KEY = 204
    DUPLICATE_KEY = 205
    RECORD_LOCKED = 206
    APPLICATION_INTERNAL_ERROR = 207

    @property
    def label(self) -> str:
        return _LABELS[self]


_LABELS = {
    ErrorCode.OK: "Message accepted",
    ErrorCode.SEGMENT_SEQUENCE: "Segment sequence error",
    ErrorCode.REQUIRED_FIELD_MISSING: "Required field missing",
    ErrorCode.DATA_TYPE: "Data type error",
    ErrorCode.TABLE_VALUE_NOT_FOUND: "Table value not found",
    ErrorCode.UNSUPPORTED_MESSAGE_TYPE: "Unsupported message type",
    ErrorCode.UNSUPPORTED_EVENT: "Unsupported event code",
    ErrorCode.UNSUPPORTED_PROCESSING_ID: "Unsupported processing id",
    ErrorCode.UNSUPPORTED_VERSION: "Unsupported version id",
    ErrorCode.UNKNOWN_KEY: "Unknown key identifier",
    ErrorCode.DUPLICATE_KEY: "Duplicate key identifier",
    ErrorCode.RECORD_LOCKED: "Application record locked",
    ErrorCode.APPLICATION_INTERNAL_ERROR: "Application internal error",
}


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorLocation:
    """Where an error sits: segment id, segment sequence (1-based), field number."""

    segment: str = "MSH"
    sequence: int = 1
    field: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class Rejection:
    """What to answer for a message we do not accept (value form of a RemoteError)."""

    ack_code: str  # original-mode code: "AR" or "AE"
    error_code: ErrorCode
    text: str  # safe: never patient data, never Python exception names
    location: ErrorLocation | None = None


class RemoteError(Exception):
    """The peer sent something we cannot take; ``rejection`` says what to answer."""

    def __init__(self, rejection: Rejection) -> None:
        super().__init__(rejection.text)
        self.rejection = rejection


def reject(
    ack_code: str,
    error_code: ErrorCode,
    text: str,
    *,
    segment: str = "MSH",
    field: int | None = None,
) -> RemoteError:
    """Shorthand used by the core's readers to raise a located remote error."""
    location = ErrorLocation(segment=segment, sequence=1, field=field)
    return RemoteError(
        Rejection(ack_code=ack_code, error_code=error_code, text=text, location=location)
    )


class LocalError(Exception):
    """Koppel itself misused an API (a bug or bad wiring), never the peer's fault."""
