"""Koppel: an HL7 v2 interface engine (MLLP in, durable store, ordered delivery)."""

__version__ = "0.1.0"
