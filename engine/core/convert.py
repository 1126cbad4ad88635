"""Typed conversions for mapped values: HL7 dates, Dutch identifiers, names and codes.

Every converter takes text already selected and unescaped by a field path, returns None
for "" (nothing sent), and raises ``ConversionError(reason)`` for text it cannot read.
The reason never contains the value (it may be a BSN or a name): it says what was
expected, and the mapping layer adds the path and file:line.
"""

from __future__ import annotations

import binascii
import datetime as _dt
import functools
import operator
from base64 import b64decode as _b64decode
import re
from dataclasses import dataclass
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from engine.core import slots

__all__ = [
    "Code",
    "ConversionError",
    "DayTime",
    "with_fixed_offset",
    "DutchName",
    "agb",
    "base64_data",
    "bsn",
    "code",
    "STORED_DAY_TIMES",
    "date",
    "day_time_from_stored",
    "dtm",
    "dutch_name",
    "phone",
    "revive_day_times",
    "zd_number",
]


class ConversionError(ValueError):
    """A value that does not read as the type asked for; ``reason`` names no value."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


# Dates and times ---------------------------------------------------------------------------

# YYYY[MM[DD[HH[MM[SS[.S[S[S[S]]]]]]]]][+/-ZZZZ]
_DTM = re.compile(
    r"(\d{4})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:(\d{2})(?:\.(\d{1,4}))?)?)?)?)?)?"
    r"(?:([+-])(\d{2})(\d{2}))?",
    re.ASCII,
)
# An HL7 2.3/2.4 TS may carry its degree of precision (table 0529: Y L D H M S) as a second
# component, which a path selecting the whole TS reads with the time: "20160428&D" (a DR's
# start, ARQ-11.1), "19800101^D". The time is what counts; the precision is what it shows.
_WITH_PRECISION = re.compile(r"([0-9][0-9.+-]*)[^0-9A-Za-z.+\s-][YLDHMS]?", re.ASCII)


def _without_precision(text: str) -> tuple[str, re.Match | None]:
    """For a text _DTM does not match: (the time with a TS's degree of precision left off, its
    _DTM match), or (text, None)."""
    p = _WITH_PRECISION.fullmatch(text)
    return (text, None) if p is None else (p.group(1), _DTM.fullmatch(p.group(1)))


HOSPITAL_ZONE = "Europe/Amsterdam"


def hospital_zone() -> ZoneInfo:
    """The zone every time Koppel writes is in (ACKs, outbound messages), whatever the host's."""
    return _zone(HOSPITAL_ZONE)


@functools.lru_cache(maxsize=16)
def _zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as error:
        raise ConversionError(f"unknown time zone {name!r}") from error


def dtm(text: str, *, tz: str = "Europe/Amsterdam") -> _dt.datetime | None:
    """HL7 DTM/TS to an aware datetime; "" -> None.

    Missing precision reads as the start of the period (``2016`` is 1 January 00:00).
    With an offset the instant is exact; without one the wall time is taken in ``tz``
    (in the autumn hour that occurs twice, the first; a spring time that does not exist
    reads with the winter offset, so 02:30 becomes 03:30 summer time).

    The result is the local time in ``tz`` with a *fixed* offset tzinfo
    (``datetime.timezone``), not a ZoneInfo: Python compares and subtracts datetimes that
    share one ZoneInfo by wall time, which would make the two 02:30s of the autumn
    change equal. With fixed offsets comparison and arithmetic are exact.

    Sent without a time of day (``20160428``, ``201604``), it is a ``DayTime``: that first
    instant for comparing, stored at the precision sent (``DayTime.stored``), and the text as
    sent for writing it back, so a window end ``20160428`` never goes out as
    ``20160428000000+0200``, midnight *before* that day.
    """
    text = text.strip()
    if not text:
        return None
    m = _DTM.fullmatch(text)
    if m is None:  # a TS with its degree of precision: the time alone
        text, m = _without_precision(text)
    if m is None:
        raise ConversionError("not an HL7 date/time (YYYY[MM[DD[HH[MM[SS[.S]]]]]][+/-ZZZZ])")
    year, month, day, hour, minute, second, frac, sign, oh, om = m.groups()
    zone = _zone(tz)
    try:
        micro = int((frac or "0").ljust(6, "0")) if frac else 0
        tzinfo: _dt.tzinfo = _offset(sign + oh + om) if sign else zone
        value = _dt.datetime(
            int(year),
            int(month or 1),
            int(day or 1),
            int(hour or 0),
            int(minute or 0),
            int(second or 0),
            micro,
            tzinfo=tzinfo,
        )
        # (via UTC when the wall time is the zone's: a spring time that does not exist moves on)
        local = value.astimezone(zone) if sign else value.astimezone(_dt.timezone.utc).astimezone(zone)
    except ConversionError:
        raise
    except (ValueError, OverflowError) as error:  # OverflowError: year 1 or 9999 across UTC
        raise ConversionError("date/time out of range") from error
    fixed = _fixed(local.utcoffset())  # type: ignore[arg-type]
    if hour is None:
        return _day_time(local, text, fixed)
    if tzinfo is fixed and not local.fold:  # sent with the zone's own offset: already the answer
        return value
    return local.replace(tzinfo=fixed)


@functools.lru_cache(maxsize=64)
def _offset(text: str) -> _dt.timezone:
    """The fixed zone of a sent offset (``+0100``), the same object as ``_fixed`` gives."""
    hours, minutes = int(text[1:3]), int(text[3:5])
    if hours > 14 or minutes > 59:
        raise ConversionError("time zone offset out of range")
    delta = _dt.timedelta(hours=hours, minutes=minutes)
    return _fixed(-delta if text[0] == "-" else delta)


def with_fixed_offset(value: _dt.datetime) -> _dt.datetime:
    """The same instant with its current UTC offset as a fixed tzinfo (cheap to format)."""
    return value.replace(tzinfo=_fixed(value.utcoffset()))  # type: ignore[arg-type]


class DayTime(_dt.datetime):
    """A DTM sent without a time of day: the instant its period starts (it compares and sorts
    as that), and ``hl7``, the text as sent, which is what goes out again; the agenda stores
    and shows it at the precision sent (``stored``).
    A value computed from one (``+ timedelta``, ``replace``) has ``hl7`` None: a full time."""

    hl7: str | None = None

    def __reduce_ex__(self, protocol):  # type: ignore[override]  # copies keep the text sent
        return _day_time, (_dt.datetime(*self.timetuple()[:6], self.microsecond, self.tzinfo), self.hl7)

    def stored(self) -> str | None:
        """How the agenda stores and shows it: the date at the precision sent (``2016``,
        ``2016-04``, ``2016-04-28``), with the offset if one was sent (``2016-04-28+00:00``);
        None for a full time (``hl7`` None). ``day_time_from_stored`` reads it back."""
        m = _DTM.fullmatch(self.hl7) if self.hl7 else None
        if m is None:
            return None
        year, month, day, sign, oh, om = m.group(1, 2, 3, 8, 9, 10)
        text = year + (f"-{month}" if month else "") + (f"-{day}" if day else "")
        return text + (f"{sign}{oh}:{om}" if sign else "")


# The key under which stored agenda data (and a held event) names its fields that hold a
# DayTime in its stored form, so they load back as DayTimes (engine.shell.processor).
STORED_DAY_TIMES = "_day_times"

_STORED_DAY = re.compile(r"(\d{4})(?:-(\d{2})(?:-(\d{2}))?)?(?:([+-])(\d{2}):(\d{2}))?", re.ASCII)


def day_time_from_stored(text: str, *, tz: str = "Europe/Amsterdam") -> DayTime:
    """``DayTime.stored()`` read back: the same instant, and the same text to send."""
    m = _STORED_DAY.fullmatch(text) if isinstance(text, str) else None
    if m is None:
        raise ConversionError("not a stored date without a time of day (YYYY[-MM[-DD]][+HH:MM])")
    year, month, day, sign, oh, om = m.groups()
    value = dtm(year + (month or "") + (day or "") + (f"{sign}{oh}{om}" if sign else ""), tz=tz)
    if not isinstance(value, DayTime):  # cannot happen: a DTM without an hour is a DayTime
        raise ConversionError("not a stored date without a time of day")
    return value


def _day_time(moment: _dt.datetime, hl7: str | None, tzinfo: _dt.tzinfo | None = None) -> DayTime:
    """``moment`` as a DayTime (in ``tzinfo`` if given) that writes back as ``hl7``."""
    day = DayTime(moment.year, moment.month, moment.day, moment.hour, moment.minute, moment.second,
                  moment.microsecond, moment.tzinfo if tzinfo is None else tzinfo)
    day.hl7 = hl7
    return day


def revive_day_times(data: dict, names) -> dict:
    """``data`` (stored JSON) with the fields ``names`` lists read back as DayTimes; a field
    whose text is not a stored DayTime is left as it is."""
    if not names or not isinstance(names, list):
        return data
    for name in names:
        text = data.get(name) if isinstance(name, str) else None
        if isinstance(text, str):
            try:
                data[name] = day_time_from_stored(text)
            except ConversionError:
                pass
    return data


@functools.lru_cache(maxsize=64)
def _fixed(offset: _dt.timedelta) -> _dt.timezone:
    return _dt.timezone(offset)


@dataclass(frozen=True, slots=True)
class PartialDate:
    """An HL7 DT sent with less than a day's precision (``1980`` or ``198006``), kept so: a
    birth month must not reach the HIS as the first of that month, a date nobody gave."""

    year: int
    month: int | None = None

    def isoformat(self) -> str:
        return f"{self.year:04d}" + (f"-{self.month:02d}" if self.month else "")

    def hl7(self) -> str:
        return f"{self.year:04d}" + (f"{self.month:02d}" if self.month else "")


def date(text: str) -> _dt.date | PartialDate | None:
    """HL7 DT (``YYYY[MM[DD]]``, or a DTM whose date part is taken as written); "" -> None.
    Without a day (or month) it is a PartialDate, at the precision sent."""
    text = text.strip()
    if not text:
        return None
    m = _DTM.fullmatch(text)
    if m is None:  # a TS with its degree of precision: the time alone
        text, m = _without_precision(text)
    if m is None:
        raise ConversionError("not an HL7 date (YYYYMMDD)")
    year, month, day = m.group(1, 2, 3)
    try:
        if day is None:
            if month is not None and not 1 <= int(month) <= 12:
                raise ValueError(month)
            return PartialDate(int(year), int(month) if month else None)
        return _dt.date(int(year), int(month or 1), int(day or 1))
    except ValueError as error:
        raise ConversionError("date out of range") from error


# Dutch identifiers -------------------------------------------------------------------------

_BSN_WEIGHTS = (9, 8, 7, 6, 5, 4, 3, 2, -1)


def bsn(text: str) -> str | None:
    """BSN: 9 digits (8 are padded with a leading 0) passing the 11-proof; "" -> None."""
    text = text.strip()
    if not text:
        return None
    if not (text.isascii() and text.isdigit() and len(text) in (8, 9)):
        raise ConversionError("BSN must be 8 or 9 digits")
    value = text.zfill(9)
    total = sum(map(operator.mul, map(int, value), _BSN_WEIGHTS))  # (in C: once per message)
    if total % 11 or value == "000000000":
        raise ConversionError("BSN fails the 11-proof")
    return value


def agb(text: str) -> str | None:
    """AGB code (Vektis): 8 digits; "" -> None."""
    text = text.strip()
    if not text:
        return None
    if not (len(text) == 8 and text.isascii() and text.isdigit()):
        raise ConversionError("AGB code must be 8 digits")
    return text


def base64_data(text: str) -> str | None:
    """An ED's base64 data (RFC 4648) as one line: line breaks and spaces dropped, missing
    ``=`` padding restored; "" -> None. Text that does not decode is an error: a letter cut
    over two OBX, or not base64 at all, is refused rather than stored as its own text."""
    compact = "".join(text.split())
    if not compact:
        return None
    compact += "=" * (-len(compact) % 4)
    try:
        _b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        raise ConversionError("not valid base64") from None
    return compact


_PHONE_NOISE = str.maketrans("", "", " -()./\t")


def phone(text: str) -> str | None:
    """Telephone number with the punctuation taken out: ``020-555 7890`` -> ``0205557890``.

    A leading ``+`` stays (``+31 20 ...`` -> ``+3120...``); a trunk ``(0)`` after a country
    code (``+31 (0)20``, ``0031 (0)20``) is dropped. Words about the number, apart from it
    (``06-12345678 (moeder)``, ``tel. 020 ...``), are left out: GP systems put them in the
    field, and a referral is not refused for them (``06-12345678, moeder`` too). Anything else
    other than digits, spaces and ``-().`/`` is an error (``020-555789O``; two numbers,
    ``06-12345678 / 020-5557890``). "" -> None.
    """
    text = text.strip()
    if not text:
        return None
    if "/" in text and _TWO_NUMBERS.search(text):
        raise ConversionError("telephone field holds two numbers")
    value = text.translate(_PHONE_NOISE)
    digits = value[1:] if value.startswith("+") else value
    if not (digits.isascii() and digits.isdigit()):  # words in it, or not a number (most are plain)
        text = _number_in(text)
        value = text.translate(_PHONE_NOISE)
        digits = value[1:] if value.startswith("+") else value
        if not (digits.isascii() and digits.isdigit()):
            raise ConversionError("telephone number may hold only digits, spaces, '-', '(', ')', '.', '/' and a leading '+'")
    if value.startswith(("+", "00")) and "(0)" in text:  # "+31 (0)20", "(+31) (0)20": no trunk 0 after a country code
        value = text.replace("(0)", "", 1).translate(_PHONE_NOISE)
        digits = value[1:] if value.startswith("+") else value
    if not 3 <= len(digits) <= 20:
        raise ConversionError("telephone number must have 3 to 20 digits")
    return value


# "06-12345678 / 020-5557890": a slash between spaces separates two numbers (one written
# 020/5557890 has none); the digits of both run together would make one that does not exist.
_TWO_NUMBERS = re.compile(r"[0-9)]\s+/|/\s+[0-9(+]")
_PHONE_RUN = re.compile(r"\+?[0-9(][0-9 \t()\-./]*[0-9]\)?")


def _number_in(text: str) -> str:
    """The one number in ``text`` when the rest is words apart from it (no digits, a space or
    bracket between); else ``text`` as it is, for phone() to judge."""
    runs = _PHONE_RUN.findall(text)
    if len(runs) != 1 or runs[0] == text:
        return text
    start = text.index(runs[0])
    before, after = text[:start], text[start + len(runs[0]):]
    if any(c.isdigit() for c in before) or any(c.isdigit() for c in after):
        return text
    if (before and before[-1] not in " \t(:") or (after and after[0] not in " \t(),;:"):
        return text  # glued to the number: a typo (``555789O``), not a word about it
    return runs[0].strip()


_ZD = re.compile(r"Z[DP][0-9]{6,12}")


def zd_number(text: str) -> str | None:
    """ZorgDomein number: ``ZD`` (production) or ``ZP`` (test) + 6..12 digits; "" -> None."""
    text = text.strip()
    if not text:
        return None
    if _ZD.fullmatch(text) is None:
        raise ConversionError("ZorgDomein number must be ZD or ZP followed by 6 to 12 digits")
    return text


# Names -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class DutchName:
    """A person name read by the Dutch FN convention (see DOMAIN.md).

    ``surname`` is the name as used (FN.1, or built from the parts when FN.1 is empty);
    ``initials`` like ``P.D.``; ``given`` the given names written out (empty when only
    initials were sent); ``use`` the XPN-7 name type (``L`` legal).
    """

    surname: str
    own_prefix: str = ""
    own_surname: str = ""
    partner_prefix: str = ""
    partner_surname: str = ""
    initials: str = ""
    given: str = ""
    use: str = ""

    def __init__(self, *, surname: str, own_prefix: str = "", own_surname: str = "", partner_prefix: str = "",
                 partner_surname: str = "", initials: str = "", given: str = "", use: str = "") -> None:
        a, b, c, d, e, f, g, h = _DUTCH_NAME  # (see engine.core.slots)
        a(self, surname)
        b(self, own_prefix)
        c(self, own_surname)
        d(self, partner_prefix)
        e(self, partner_surname)
        f(self, initials)
        g(self, given)
        h(self, use)


_DUTCH_NAME = slots.setters(DutchName)


def _initials(part: str) -> tuple[str, str]:
    """(initials, written-out names) of one XPN-2/XPN-3 component."""
    if not part:  # (XPN-3 is empty in nearly every name)
        return "", ""
    letters: list[str] = []
    names: list[str] = []
    for word in part.replace(".", ". ").split():
        bare = word.rstrip(".")
        if not bare:
            continue
        # the Dutch IJ is one letter (IJsbrand, IJ.): its initial is IJ., not I.; a hyphenated
        # given name has an initial per part (Jan-Willem: J.W.)
        for piece in bare.split("-"):
            if piece:
                letters.append("IJ." if piece[:2] == "IJ" else piece[0].upper() + ".")
        if len(bare) > 1 and not word.endswith("."):
            names.append(bare)
    return "".join(letters), " ".join(names)


def _join(*parts: str) -> str:
    return " ".join(p for p in parts if p)


def dutch_name(xpn_components: list[str], subcomponents_of_first: list[str]) -> DutchName:
    """Read an XPN (components already split and unescaped) by the FN convention.

    ``subcomponents_of_first`` are FN.1..FN.5 (surname as used, own prefix, own surname,
    partner prefix, partner surname); when empty, component 1 is taken as the surname.
    Example: ``van 't Hek - de Vries&de&Vries&van 't&Hek^P^D^^^^L``.
    """
    comps = [c.strip() for c in xpn_components]
    subs = [s.strip() for s in subcomponents_of_first] or comps[:1]
    subs = subs + [""] * (5 - len(subs))
    used, own_prefix, own_surname, partner_prefix, partner_surname = subs[:5]

    def comp(n: int) -> str:
        return comps[n - 1] if n <= len(comps) else ""

    if not (used or own_surname or partner_surname or comp(2) or comp(3)):
        raise ConversionError("name has no surname and no given name or initials")
    surname = used or _join(own_prefix, own_surname) or _join(partner_prefix, partner_surname)
    first_initials, first_names = _initials(comp(2))
    more_initials, more_names = _initials(comp(3))
    return DutchName(
        surname=surname,
        own_prefix=own_prefix,
        own_surname=own_surname,
        partner_prefix=partner_prefix,
        partner_surname=partner_surname,
        initials=first_initials + more_initials,
        given=_join(first_names, more_names),
        use=comp(7),
    )


# Codes -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True, init=False)
class Code:
    """A coded element (CE/CWE/CNE): ``CARREG001^consult cardioloog^99zda``."""

    code: str
    text: str = ""
    system: str = ""

    def __init__(self, *, code: str, text: str = "", system: str = "") -> None:
        set_code, set_text, set_system = _CODE  # (see engine.core.slots)
        set_code(self, code)
        set_text(self, text)
        set_system(self, system)


_CODE = slots.setters(Code)


def code(components: list[str]) -> Code | None:
    """CE/CWE components to a Code: the primary triplet, or the alternate (4-6) when the
    primary has neither code nor text; None when both are empty."""
    comps = [c.strip() for c in components] + [""] * 6
    for start in (0, 3):
        value, text, system = comps[start : start + 3]
        if value or text:
            return Code(code=value, text=text, system=system)
    return None
