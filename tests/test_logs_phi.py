"""No patient data in the logs, at DEBUG, for every sample message through the full path.

``koppel run`` runs as a subprocess on the BUNDLED channels and mappings (copied to a temporary
directory: listeners on 127.0.0.1 port 0, every destination pointed at a ``tests/sink.py`` sink),
with ``--log-level debug``. Every file in ``tests/samples/`` (ZorgDomein and public, the
malformed ones too) goes out byte for byte, as one MLLP frame, to both channels, and the
ZorgDomein ones a second time (the duplicate path). When every accepted message is processed
and every queue is empty the engine is stopped with SIGTERM, and its whole output (stdout and
stderr) is searched for the patient values of every sample: PID-3 ids, PID-5 names, PID-7 birth
date, PID-11 address, PID-13 phones, NK1-2/4/5, ARQ-15..21, OBX-5, and GT1, IN1 and PV1 names
when present. A control proves the checker finds an injected leak.
"""

from __future__ import annotations

import json
import re
import shutil
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


from conftest import load_sample, sample_names
from sink import ROOT, KoppelProcess, MLLPClient, NoAck, Sink

ACK_TIMEOUT = 3.0
MIN_LENGTH = 4

# --------------------------------------------------------------------------- reading sample values

SEGMENT_END = re.compile(rb"\r\n|\r|\n")


class Delimiters:
    def __init__(self, field="|", component="^", repetition="~", escape="\\", subcomponent="&"):
        self.field, self.component, self.repetition = field, component, repetition
        self.escape, self.subcomponent = escape, subcomponent


def _delimiters(msh: str) -> Delimiters:
    if len(msh) < 4:
        return Delimiters()
    field = msh[3]
    encoding = msh[4:].split(field, 1)[0]
    defaults = "^~\\&"
    chars = [encoding[i] if i < len(encoding) else defaults[i] for i in range(4)]
    return Delimiters(field, *chars)


def _unescape(value: str, d: Delimiters) -> str:
    e = re.escape(d.escape)
    table = {"F": d.field, "S": d.component, "R": d.repetition, "E": d.escape, "T": d.subcomponent}
    return re.sub(e + r"([FSRET])" + e, lambda m: table[m.group(1)], value)


def segments(raw: bytes) -> list[tuple[str, list[str], Delimiters]]:
    """Every segment of a file as (name, fields, delimiters), decoded both as UTF-8 and Latin-1.

    Field n of a non-MSH segment is ``fields[n]``. A file may hold several messages (and batch
    headers); each MSH sets the delimiters for what follows it.
    """
    texts = {raw.decode("latin-1")}
    try:
        texts.add(raw.decode("utf-8"))
    except UnicodeDecodeError:
        pass
    out = []
    for text in texts:
        d = Delimiters()
        for line in re.split(r"\r\n|\r|\n", text.lstrip("\ufeff\xef\xbb\xbf")):
            line = line.lstrip("\ufeff")
            if line.startswith("MSH") or line.startswith(("FHS", "BHS")):
                d = _delimiters(line)
            if len(line) < 3:
                continue
            out.append((line[:3], line.split(d.field), d))
    return out


def leaves(field: str, d: Delimiters, *, skip_components: tuple[int, ...] = ()) -> list[str]:
    """Component and subcomponent values of every repetition (1-based component numbers)."""
    values = []
    for repetition in field.split(d.repetition):
        for number, component in enumerate(repetition.split(d.component), start=1):
            if number in skip_components:
                continue
            for sub in component.split(d.subcomponent):
                values.append(sub)
                values.append(_unescape(sub, d))
    return values


# (segment, field, components to skip, why they are skipped). Skipped components are codes
# from HL7/Vektis tables (name type L, identifier type NNNLD, use code PRN, country NL), not
# patient data, and many would appear in any log for innocent reasons.
PATIENT_FIELDS = [
    ("PID", 3, (2, 3, 4, 5, 6, 7, 8, 9, 10), "patient ids: only the id number itself (component 1)"),
    ("PID", 5, (7,), "patient names (7 = name type code)"),
    ("PID", 6, (7,), "mother's maiden name"),
    ("PID", 7, (), "birth date"),
    ("PID", 9, (7,), "patient alias"),
    ("PID", 11, (6, 7), "address (6 = country code, 7 = address type)"),
    ("PID", 13, (2, 3), "home phones (2, 3 = use and equipment codes)"),
    ("PID", 14, (2, 3), "business phones"),
    ("PID", 19, (), "SSN"),
    ("NK1", 2, (7,), "next of kin name"),
    ("NK1", 4, (6, 7), "next of kin address"),
    ("NK1", 5, (2, 3), "next of kin phone"),
    *[("ARQ", n, (), "referrer/requester names, phones, addresses") for n in range(15, 22)],
    ("OBX", 5, (), "observation values (free text, documents)"),
    ("GT1", 3, (7,), "guarantor name"),
    ("GT1", 5, (6, 7), "guarantor address"),
    ("GT1", 6, (2, 3), "guarantor phone"),
    ("IN1", 16, (7,), "insured's name"),
    ("IN1", 19, (6, 7), "insured's address"),
    ("PV1", 7, (1,), "attending doctor name (1 = id)"),
    ("PV1", 8, (1,), "referring doctor name"),
    ("PV1", 9, (1,), "consulting doctor name"),
    ("PV1", 17, (1,), "admitting doctor name"),
]

PUNCTUATION_ONLY = re.compile(r"^[\W_]+$")


def header_tokens(raw: bytes) -> set[str]:
    """What the logs may carry from a message by design: MSH-9 parts, MSH-10, MSH-12."""
    tokens = set()
    for name, fields, d in segments(raw):
        if name == "MSH" and len(fields) > 9:
            tokens.update(fields[8].split(d.component))
            tokens.add(fields[9])
            if len(fields) > 11:
                tokens.add(fields[11])
    return {t.lower() for t in tokens if t}


def patient_values(raw: bytes) -> dict[str, str]:
    """value -> where it came from, after the filters below (each with its reason)."""
    found: dict[str, str] = {}
    for name, fields, d in segments(raw):
        for segment, number, skip, what in PATIENT_FIELDS:
            if name != segment or len(fields) <= number:
                continue
            for value in leaves(fields[number], d, skip_components=skip):
                value = value.strip()
                # Filter 1: shorter than 4 characters ('M', 'U', 'NL', '1', 'Jan' is the shortest
                # name we miss): too short to be distinctive; would match JSON keys, codes, ids.
                if len(value) < MIN_LENGTH:
                    continue
                # Filter 2: pure punctuation ('""', '---'): HL7 null and separators, not data.
                if PUNCTUATION_ONLY.match(value):
                    continue
                found.setdefault(value, f"{segment}-{number} ({what})")
    # Filter 3: MSH-9 parts, MSH-10 and MSH-12 of any sample. The logs carry control id,
    # type and version by design (bound context); ZorgDomein puts its ZD-number (the
    # referral id) in MSH-10 and again in PID-3 (authority ZorgDomein) and OBX: that is the
    # control id being logged, not a patient value leaking. Another sample's control id
    # ('1234567', also a phone number in an OLIS sample) cannot be told apart either.
    innocent = ALL_HEADER_TOKENS
    return {v: where for v, where in found.items() if v.lower() not in innocent and not _engine_words(v)}


SHORT_NUMBER = re.compile(r"^[0-9]{1,5}$")


def _engine_words(value: str) -> bool:
    """Filter 4: a number of at most 5 digits ('1111', '3456', a lab result '7200'): identifies
    no one on its own, and the log is full of such numbers (ports, sizes, message ids).
    Filter 5: a value made only of words the engine writes itself ('TEST', 'PATIENT', 'DATE:'):
    the labels and converter names of the bundled mappings appear in mapping errors
    ('patient.birth_date (PID-7): cannot convert with date'), so these words are in the log for
    a reason that has nothing to do with the message. Real names and places are not such words
    (the first test below checks that 'de Boer', 'Amsterdam', ... are still searched)."""
    if SHORT_NUMBER.match(value):
        return True
    words = re.findall(r"[^\W\d_]+", value.lower())
    return bool(words) and not re.search(r"\d", value) and all(w in ENGINE_VOCABULARY for w in words)


def _vocabulary() -> frozenset[str]:
    """Words of the bundled mapping and channel files (labels, converters, tables) and of the
    engine's mapping error texts (mapping.py, convert.py, paths.py)."""
    texts = [p.read_text(errors="replace") for p in (ROOT / "mappings").rglob("*.yaml")]
    texts += [p.read_text(errors="replace") for p in (ROOT / "channels").glob("*.yaml")]
    for source in ("engine/mapping.py", "engine/core/convert.py", "engine/core/paths.py"):
        texts.append((ROOT / source).read_text(errors="replace"))
    # comments hold prose (and Dutch place names: Zwolle, Groningen): keep only YAML keys,
    # quoted strings and identifiers of code, not comments
    words = set()
    for text in texts:
        for line in text.splitlines():
            line = line.split("#", 1)[0]
            words.update(re.findall(r"[^\W\d_]+", line.lower()))
    # convert.py names the time zone Europe/Amsterdam; a city in a patient's address must
    # still be searched
    return frozenset(words - {"europe", "amsterdam"})


ENGINE_VOCABULARY = _vocabulary()


LONG = 96
LOG_RUN = re.compile(r"[^\s\"'|^~\\&,:;{}\[\]]{32,}")


def probes(value: str) -> list[str]:
    """What to search for directly: the value, or for a long one (a base64 document, a letter)
    its start and end; pieces from its middle are found by ``long_value_leaks``."""
    value = value.lower()
    return [value] if len(value) <= LONG else [value[:48], value[-48:]]


def log_windows(text: str) -> set[str]:
    """Every 32-character window of every run of 32+ non-separator characters in the log."""
    return {run[i : i + 32] for run in LOG_RUN.findall(text) for i in range(len(run) - 31)}


def long_value_leaks(windows: set[str], value: str) -> bool:
    """Does the log hold a piece (40+ characters) of ``value`` from anywhere in it? Any such
    piece contains one of the value's 32-character windows that start at a multiple of 8."""
    value = value.lower()
    return any(value[i : i + 32] in windows for i in range(0, len(value) - 31, 8))


def haystack(log_text: str) -> str:
    """The log as searched: raw text plus every JSON line's strings decoded (JSONRenderer
    writes non-ASCII as \\u escapes, so 'Patiënt' is 'Pati\\u00ebnt' in the raw text)."""
    decoded = []
    for line in log_text.splitlines():
        try:
            decoded.append(json.dumps(json.loads(line), ensure_ascii=False))
        except ValueError:
            continue
    return (log_text + "\n" + "\n".join(decoded)).lower()


def _word(char: str) -> bool:
    return char.isalnum() or char == "_"


def bounded_in(text: str, probe: str) -> bool:
    """Is ``probe`` in ``text`` as a whole token, not inside a longer word or number? So '3175'
    does not match the microseconds of a timestamp, '123456789' not another message's control
    id '0123456789', 'REFER' not 'referrer'."""
    start = text.find(probe)
    while start >= 0:
        end = start + len(probe)
        before = text[start - 1] if start else " "
        after = text[end] if end < len(text) else " "
        if not (_word(probe[0]) and _word(before)) and not (_word(probe[-1]) and _word(after)):
            return True
        start = text.find(probe, start + 1)
    return False


def find_leaks(log_text: str, values_by_sample: dict[str, dict[str, str]]) -> list[str]:
    text = haystack(log_text)
    windows = log_windows(text)
    leaks = []
    for sample, values in values_by_sample.items():
        for value, where in values.items():
            hit = any(bounded_in(text, p) for p in probes(value))
            if hit or (len(value) > LONG and long_value_leaks(windows, value)):
                leaks.append(f"{sample}: {where}: {value[:40]!r}")
    return leaks


def find_bodies(log_text: str) -> list[str]:
    """Lines carrying an HL7 message body (an MSH segment) or a segment of one."""
    body = re.compile(r"MSH\||(?:^|[\r\n\"' ])(PID|NK1|OBX|ARQ)\|")
    return [line[:120] for line in haystack(log_text).splitlines() if body.search(line.upper())]


# --------------------------------------------------------------------------- the engine process


def bundled_config(tmp: Path, sinks: dict[str, Sink]) -> tuple[Path, Path]:
    """The bundled channels and mappings, listeners on 127.0.0.1:0, destinations at sinks."""
    channels, mappings = tmp / "channels", tmp / "mappings"
    shutil.copytree(ROOT / "mappings", mappings)
    channels.mkdir()
    by_port = {"6661": "his-scheduling", "6662": "ris-orders", "6663": "lis-orders", "6664": "document-archive"}
    for source in sorted((ROOT / "channels").glob("*.yaml")):
        text = source.read_text()
        text = re.sub(r"listen: tcp:\d+:interface=[0-9.]+", "listen: tcp:0:interface=127.0.0.1", text)
        text = re.sub(r"port=(666\d)", lambda m: f"port={sinks[by_port[m.group(1)]].port}", text)
        assert "6661" not in text and "2575" not in text and "2576" not in text, text
        (channels / source.name).write_text(text)
    return channels, mappings


def send_one(port: int, payload: bytes, timeout: float = ACK_TIMEOUT) -> bytes | None:
    """One connection, one frame with the bytes as they are; the answer, or None if none came."""
    with MLLPClient(port, timeout=timeout) as client:
        try:
            return client.request(payload)
        except (NoAck, socket.timeout):
            return None


def wait_processed(engine: KoppelProcess, timeout: float = 20.0) -> None:
    """Every accepted inbound message has a processing outcome and every queue is empty."""
    deadline = time.monotonic() + timeout
    stable = 0
    while time.monotonic() < deadline:
        pending = engine.query("SELECT COUNT(*) FROM messages WHERE status = 'accepted' AND peer != 'koppel' "
                               "AND processing IS NULL")[0][0]
        queued = engine.query("SELECT COALESCE(SUM(pending), 0) FROM queues")[0][0]
        stable = stable + 1 if (pending, queued) == (0, 0) else 0
        if stable >= 5:
            return
        time.sleep(0.05)
    raise AssertionError(f"not processed within {timeout}s: {pending} unprocessed, {queued} queued")


# --------------------------------------------------------------------------- tests


ALL_SAMPLES = sample_names()
ALL_HEADER_TOKENS = frozenset().union(*(header_tokens(load_sample(name)) for name in ALL_SAMPLES))
ZD_SAMPLES = [n for n in ALL_SAMPLES if n.startswith("zorgdomein/")]
VALUES = {name: patient_values(load_sample(name)) for name in ALL_SAMPLES}


def test_the_extraction_finds_the_patient_values_it_must_look_for():
    """Guard against a checker that checks nothing: known synthetic values are extracted."""
    srm = VALUES["zorgdomein/zd_srm_s01_appointment_request.hl7"]
    for value in ("de Boer", "Willem", "Hendrik", "20000101", "Amsterdam", "1016BS", "020-5557890",
                  "06-55554444", "van Houten", "015-2222222", "Groningen"):
        assert value in srm, value
    assert sum(len(v) for v in VALUES.values()) > 300
    assert len([n for n, v in VALUES.items() if v]) >= 50


def test_the_checker_catches_an_injected_leak():
    """The control: a copy of a clean log with one fake leak is caught, in each form a leak takes."""
    name = "zorgdomein/zd_srm_s01_appointment_request.hl7"
    clean = '{"event": "message.acked", "channel": "zorgdomein-in", "control_id": "g20ce6a9f8ca4f551275"}\n'
    assert find_leaks(clean, {name: VALUES[name]}) == []
    assert find_bodies(clean) == []
    leaky = clean + json.dumps({"event": "mapping.error", "reason": "bad name de Boer&de&Boer"}) + "\n"
    assert any("'de Boer'" in leak for leak in find_leaks(leaky, {name: VALUES[name]}))
    # a non-ASCII value, as JSONRenderer writes it (\u escape), is found too
    accented = next((v for vs in VALUES.values() for v in vs if any(ord(c) > 127 for c in v)), None)
    assert accented is not None
    owner = next(n for n, vs in VALUES.items() if accented in vs)
    escaped = clean + json.dumps({"event": "x", "detail": accented}) + "\n"
    assert "\\u" in escaped
    assert find_leaks(escaped, {owner: VALUES[owner]}) != []
    # a slice of a long OBX-5 (a base64 document cut to 120 characters) is found
    big = "trusted-intermediary_oru_r01_natus_big_base64.hl7"
    big = f"public/{big}"
    longest = max(VALUES[big], key=len)
    assert len(longest) > 1000
    middle = len(longest) // 2
    piece = clean + f"Traceback: ValueError: {longest[middle : middle + 120]}\n"
    assert find_leaks(piece, {big: VALUES[big]}) != []
    # a traceback printing a message body
    body = clean + "Traceback (most recent call last):\n  ValueError: b'MSH|^~\\\\&|ZorgDomein|...'\n"
    assert find_bodies(body) != []


def test_no_patient_data_in_the_logs_at_debug(tmp_path):
    sinks = {name: Sink(name=name).start() for name in
             ("his-scheduling", "ris-orders", "lis-orders", "document-archive")}
    engine = None
    try:
        channels, mappings = bundled_config(tmp_path, sinks)
        engine = KoppelProcess(channels, f"sqlite:///{tmp_path}/var/koppel.db", workdir=tmp_path, log_level="debug",
                               metrics="tcp:0:interface=127.0.0.1", history=None)  # all of it: searched below
        engine.start(until="engine.started")
        ports = engine.ports
        assert set(ports) == {"zorgdomein-in", "scheduler-in"}, ports

        sends = [(ports[channel], name) for channel in ports for name in ALL_SAMPLES]
        sends += [(ports["zorgdomein-in"], name) for name in ZD_SAMPLES]  # exact re-sends: duplicates
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda s: send_one(s[0], load_sample(s[1])), sends))
        # the run went through the full path: accepted, rejected, mapped, delivered, duplicates
        codes = [a.split(b"MSA|", 1)[1][:2] if a and b"MSA|" in a else None for a in answers]
        assert codes.count(b"AA") >= 20, codes
        assert codes.count(b"AR") >= 20, codes
        wait_processed(engine)
        delivered = {name: sink.delivered_count() for name, sink in sinks.items()}
        assert delivered["his-scheduling"] >= 1 and delivered["lis-orders"] >= 1, delivered
        outcomes = dict(engine.query("SELECT processing, COUNT(*) FROM messages WHERE processing IS NOT NULL "
                                     "GROUP BY processing"))
        # (none is filtered: every type a bundled channel accepts is routed, the rest refused)
        assert {"mapped", "held"} <= set(outcomes), outcomes
        assert engine.terminate() == 0
    finally:
        if engine is not None:
            engine.kill()
        for sink in sinks.values():
            sink.down()

    log = engine.output()
    events = [e.get("event") for e in engine.logged()]
    for expected in ("message.acked", "message.rejected", "message.duplicate", "delivery.acked",
                     "engine.stopped"):
        assert expected in events, expected
    assert len(log) > 10_000
    assert find_bodies(log) == [], "a message body is in the log"
    leaks = find_leaks(log, VALUES)
    assert leaks == [], "patient data in the log:\n" + "\n".join(leaks)
    # the same check on a copy of this very log with one fake leak added fails
    fake = json.dumps({"event": "message.rejected", "reason": "PID-5: Willem is not a surname"})
    assert any("'Willem'" in leak for leak in find_leaks(log + fake + "\n", VALUES)), "the checker is blind"
