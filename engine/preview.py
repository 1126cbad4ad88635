"""``koppel map``: what a message would become, without side effects.

Runs the same code as the engine (header, channel routes, mapping, agenda decision,
outbound templates) on a file and prints JSON: the route and mapping chosen, the
event, the agenda entry it would create or change, and the outbound messages. With
``--store`` it decides against the entry already stored for the message's keys
(read-only); without, as if nothing were stored yet.
"""

from __future__ import annotations

import datetime as dt
import json
import re
import sys
from pathlib import Path

from engine.core import agenda as ag
from engine.core.ack import ControlIds
from engine.core.files import split_messages
from engine.core.header import read_header
from engine.core.convert import DayTime, hospital_zone
from engine.core.intake import AcceptRules, check_accept
from engine.core.routing import parsed_once, routes_taking
from engine.core.agenda import plain as _agenda_plain
from engine.operator import is_patient_field
from engine.shell.processor import entry_from_record


def _plain(fields: dict) -> dict:
    """Fields as the agenda stores and shows them: a dtm sent without a time of day at the
    precision sent (``2016-04``), see ``engine.shell.processor.to_json``."""
    return {name: value.stored() if value.__class__ is DayTime and value.hl7 else _agenda_plain(value)
            for name, value in fields.items()}


def preview(bundle, channel_name: str, raw: bytes, *, store=None, now: dt.datetime | None = None,
            patient_data: bool = True) -> dict:
    """``patient_data=False``: the entry's ``patient.*`` fields are hidden (with ``--store``
    they are the stored entry's, not only the file's)."""
    config = bundle.config
    try:
        channel = config.channel(channel_name)
    except KeyError:
        raise ValueError(f"no channel {channel_name!r} (channels: {', '.join(c.name for c in config.channels)})")
    now = now or dt.datetime.now(hospital_zone())
    header = read_header(raw, default_charset=channel.source.charset)
    result: dict = {"channel": channel.name, "type": header.type_and_trigger, "control_id": header.control_id}
    rules = AcceptRules(types=channel.accept.types, versions=channel.accept.versions,
                        processing_ids=channel.accept.processing_ids)
    rejection = header.rejection or check_accept(header, rules)
    if rejection is not None:
        result["accepted"] = False
        result["answer"] = {"code": rejection.ack_code, "error_code": int(rejection.error_code), "text": rejection.text}
        return result
    result["accepted"] = True
    message = parsed_once(raw, header.codec)
    routes = routes_taking(channel.routes, header.message_type, header.trigger, message)
    result["forward_to"] = sorted({name for r in routes for name in r.to})
    map_route = next((r for r in routes if r.map), None)
    if map_route is None:
        result["mapping"] = None
        result["outcome"] = "forwarded" if result["forward_to"] else "filtered"
        return result
    mapping = bundle.mappings.mapping(map_route.map)
    result["mapping"] = {"name": mapping.name, "file": str(mapping.file)}
    mapped = mapping.apply(message())
    if not mapped.ok:
        result["outcome"] = "error"
        result["errors"] = [str(e) for e in mapped.errors]
        return result
    event = mapped.event
    result["event"] = {"kind": event.kind, "action": event.action, "zd_number": event.zd_number,
                       "placer_id": event.placer_id, "filler_id": event.filler_id,
                       "fields": _plain({k: v for k, v in event.fields.items() if k != "attachments"}),
                       "attachments": len(event.fields.get("attachments") or ())}
    existing = None
    if store is not None:
        record = store.find_agenda_entry(ag.correlation_keys(event))
        existing = entry_from_record(record) if record else None
    decision = ag.decide(event, existing, now=now, message_id="preview", book=bundle.book)
    result["decision"] = type(decision).__name__.lower()
    if isinstance(decision, (ag.Reject, ag.Hold)):
        result["outcome"] = "error" if isinstance(decision, ag.Reject) else "held"
        result["reason"] = decision.reason
        return result
    entry = decision.entry
    result["outcome"] = "mapped"
    result["fallback_agenda"] = bool(getattr(decision, "fallback", False))
    result["entry"] = {"agenda": entry.agenda_id, "kind": entry.kind, "state": entry.state,
                       "zd_number": entry.zd_number, "placer_id": entry.placer_id, "filler_id": entry.filler_id,
                       "data": _plain({k: (v if patient_data or not is_patient_field(k) else
                                           "(hidden: --data shows it)")
                                       for k, v in entry.data.items() if k not in ("attachments", ag.SOURCES, ag.AGENDA)}),
                       "attachments": list(entry.attachments)}
    from engine.mapping import RECEIVED, build_outbound, sent_so_far

    sent = sent_so_far(entry.data, new=existing is None)  # what each system last had (with --store)
    outbound = build_outbound(mapping, event, entry, control_id=ControlIds("PREVIEW-")(), timestamp=now, sent=sent,
                              agenda=bundle.book.find(entry.agenda_id))
    result["outbound"] = [{"to": name, "message": "(the message as received)" if data is RECEIVED
                           else _shown(data, patient_data)} for name, data in outbound]
    return result


# a run this long of base64's alphabet is an embedded document (an ED's data): elided
_ENCODED_RUN = re.compile(r"[A-Za-z0-9+/=]{257,}")


def _shown(data: bytes, patient_data: bool) -> str:
    """An outbound message as `koppel map` prints it: segments on lines, an embedded
    document as ``<N characters of encoded data>`` (not megabytes of base64 on the
    terminal). Without ``patient_data`` only MSH and the segment names: with ``--store`` the
    message carries the stored entry's patient fields, which only ``--data`` shows."""
    text = data.decode(read_header(data, default_charset="8859/1").codec, "replace")
    segments = [s for s in text.replace("\n", "\r").split("\r") if s]
    if not patient_data:
        names = [s[:3] for s in segments[1:]]
        return "\n".join(segments[:1] + [f"({' '.join(names)}: hidden, --data shows them)"] if names else segments[:1])
    text = "\n".join(segments)
    return _ENCODED_RUN.sub(lambda m: f"<{len(m.group())} characters of encoded data>", text)


def run(args) -> int:
    from engine.bundle import load_bundle
    from engine.config import ConfigError

    try:
        bundle = load_bundle(Path(args.channels), Path(args.mappings))
    except ConfigError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    store = None
    if args.store:
        from engine.operator import open_existing_store

        store, problem = open_existing_store(args.store)
        if store is None:
            sys.stderr.write(f"error: {problem}\n")
            return 1
    status = 0
    try:
        with open(args.file, "rb") as handle:
            messages = split_messages(handle.read(), raw=args.raw)
        out = []
        patient_data = store is None or args.data  # the stored entry's patient fields only on request
        if store is not None and args.data:  # in the audit trail first, as `agenda show --data`
            from engine.operator import audit_data_read

            audit_data_read(store, "koppel map --store --data")
        for raw in messages:
            try:
                out.append(preview(bundle, args.channel, raw, store=store, patient_data=patient_data))
            except ValueError as error:
                sys.stderr.write(f"error: {error}\n")
                return 2
        for item in out:
            if item.get("outcome") not in ("mapped", "held", "forwarded"):
                status = 1
        print(json.dumps(out[0] if len(out) == 1 else out, indent=2, ensure_ascii=False, default=str))
    finally:
        if store is not None:
            store.close()
    return status
