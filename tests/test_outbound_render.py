"""Outbound templates: pinned bytes for every kind of leaf, placeholder and segment shape
(mixed literal and placeholder text, trailing empties, literals ending in a delimiter, repetitions,
subcomponents, value types, dotted look-ups, entry/timestamp/index/item, for_each blocks,
outbound `when`), so a faster renderer must give exactly these bytes."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.core.agenda import AgendaEvent
from engine.core.convert import Code, DutchName
from engine.mapping import build, build_outbound, load_mappings

TEMPLATE = r'''
message: SIU^S12^SIU_S12
version: "2.5"
charset: 8859/1
segments:
  - MSH: {3: "{sender}", 4: "dept {sender}x", 8: [a, "", ""], 11: "{missing}", 17: NLD}
  - ZZ1: {2: "Dr. {name} en {name}!", 3: ["", "", ""], 4: ["lit^", "{empty}", ""], 5: [["{a}", "{b}"], [""], ["{flag}", "{no}"]], 9: ["", ["", "{a}", ""], ""]}
  - ZZ2:
  - ZZ3: {1: "", 2: ""}
  - ZZ4: {1: "{when}", 2: "{day}", 3: "{code}", 4: "{name_obj}", 5: "{name_obj.initials}", 6: "{number}", 7: "{items}", 8: "{rec}", 9: "{rec.x}"}
  - ZZ5: {1: "{items.2.code}", 2: "{items.9.code}", 3: "{items.x}", 4: "{code._private}", 5: "{entry.id}", 6: "{entry.nothing}", 7: "{timestamp}", 8: "{zd_number}", 9: "{kind}"}
  - ZZ6: {1: "{deep.a.b}", 2: "{deep.a}", 3: "{deep}", 4: "{deep.a.c}", 5: "{naive}"}
  - for_each: items
    segments:
      - OBR: {1: "{index}", 2: ["{item.code}", "{item.text}"], 3: "{item}", 4: "{sender}", 5: "{item.code.x}", 6: "{index.x}"}
      - ZOB:
  - for_each: nothing
    segments:
      - ZNO: {1: "{index}"}
  - for_each: sender
    segments:
      - ZNS: {1: "{index}"}
  - ZEN: {1: end}
'''

# Every name the templates here read is one the mapping sets (else a config error, see
# test_a_placeholder_no_mapping_sets_is_a_config_error); the tests build their events by hand.
_READ = ("sender name empty a b flag no when day code name_obj number items rec deep naive nothing missing "
         "bsn zd street city phone mobile status service booked also_nothing x y").split()
MAPPING = """\
name: m
types: [SRM^S01]
event:
  kind: {value: appointment-request}
  action: {value: create}
""" + "".join(f"  {name}: {{value: v}}\n" for name in _READ) + """\
outbound:
  - {to: a, template: t.yaml}
  - {to: b, template: t.yaml, when: {sender: '*', kind: [appointment-request]}}
  - {to: c, template: t.yaml, when: {missing: '*'}}
"""

TZ = dt.timezone(dt.timedelta(hours=1))
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=TZ)


class Entry:
    id = "E-1|x"


@pytest.fixture()
def mappings(tmp_path: Path):
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "t.yaml").write_text(TEMPLATE, encoding="utf-8")
    (tmp_path / "m.yaml").write_text(MAPPING, encoding="utf-8")
    return load_mappings(tmp_path)


def event() -> AgendaEvent:
    name = DutchName(surname="de Boer", own_prefix="de", own_surname="Boer", initials="W.", partner_prefix="", partner_surname="")
    return AgendaEvent(
        kind="appointment-request",
        action="create",
        zd_number="ZD1^2",
        fields={
            "sender": "S|nd^er", "name": "Jan~Piet\r\n", "empty": "", "a": "A&a", "b": "B\\b", "flag": True, "no": False,
            "when": dt.datetime(2026, 3, 4, 5, 6, 7, tzinfo=TZ), "day": dt.date(2026, 1, 2),
            "code": Code(code="C1", text="T", system="S"), "name_obj": name, "number": 42,
            "items": ({"code": "I1", "text": "één"}, {"code": "I^2", "text": None}, "plain", 7, ("t1",)),
            "rec": {"x": "y"}, "deep.a": {"b": "deep-ab"}, "deep": {"a": {"c": "never"}},
            "naive": dt.datetime(2026, 3, 4, 5, 6, 7), "nothing": None,
        },
    )


def test_build_renders_every_template_shape_byte_for_byte(mappings):
    data = build(mappings.templates["t.yaml"], event(), control_id="K\\1", timestamp=NOW, entry=Entry())
    assert data == b'MSH|^~\\&|S\\F\\nd\\S\\er|dept S\\F\\nd\\S\\erx|||20260102030405+0100|a|SIU^S12^SIU_S12|K\\E\\1|P|2.5|||||NLD|8859/1\rZZ1||Dr. Jan\\R\\Piet\\X0D\\\\X0A\\ en Jan\\R\\Piet\\X0D\\\\X0A\\!||lit|A\\T\\a^B\\E\\b~~Y^N||||^&A\\T\\a\rZZ2\rZZ3\rZZ4|20260304050607+0100|20260102|C1|de Boer|W.|42|||y\rZZ5|I\\S\\2||||E-1\\F\\x||20260102030405+0100|ZD1\\S\\2|appointment-request\rZZ6|deep-ab||||20260304050607\rOBR|1|I1^\xe9\xe9n||S\\F\\nd\\S\\er||1\rZOB\rOBR|2|I\\S\\2||S\\F\\nd\\S\\er||2\rZOB\rOBR|3||plain|S\\F\\nd\\S\\er||3\rZOB\rOBR|4||7|S\\F\\nd\\S\\er||4\rZOB\rOBR|5|||S\\F\\nd\\S\\er||5\rZOB\rZEN|end\r'


def test_build_outbound_numbers_control_ids_and_checks_when(mappings):
    got = build_outbound(mappings.mapping("m"), event(), Entry(), control_id="K7", timestamp=NOW)
    assert got == [('a', b'MSH|^~\\&|S\\F\\nd\\S\\er|dept S\\F\\nd\\S\\erx|||20260102030405+0100|a|SIU^S12^SIU_S12|K7-1|P|2.5|||||NLD|8859/1\rZZ1||Dr. Jan\\R\\Piet\\X0D\\\\X0A\\ en Jan\\R\\Piet\\X0D\\\\X0A\\!||lit|A\\T\\a^B\\E\\b~~Y^N||||^&A\\T\\a\rZZ2\rZZ3\rZZ4|20260304050607+0100|20260102|C1|de Boer|W.|42|||y\rZZ5|I\\S\\2||||E-1\\F\\x||20260102030405+0100|ZD1\\S\\2|appointment-request\rZZ6|deep-ab||||20260304050607\rOBR|1|I1^\xe9\xe9n||S\\F\\nd\\S\\er||1\rZOB\rOBR|2|I\\S\\2||S\\F\\nd\\S\\er||2\rZOB\rOBR|3||plain|S\\F\\nd\\S\\er||3\rZOB\rOBR|4||7|S\\F\\nd\\S\\er||4\rZOB\rOBR|5|||S\\F\\nd\\S\\er||5\rZOB\rZEN|end\r'), ('b', b'MSH|^~\\&|S\\F\\nd\\S\\er|dept S\\F\\nd\\S\\erx|||20260102030405+0100|a|SIU^S12^SIU_S12|K7-2|P|2.5|||||NLD|8859/1\rZZ1||Dr. Jan\\R\\Piet\\X0D\\\\X0A\\ en Jan\\R\\Piet\\X0D\\\\X0A\\!||lit|A\\T\\a^B\\E\\b~~Y^N||||^&A\\T\\a\rZZ2\rZZ3\rZZ4|20260304050607+0100|20260102|C1|de Boer|W.|42|||y\rZZ5|I\\S\\2||||E-1\\F\\x||20260102030405+0100|ZD1\\S\\2|appointment-request\rZZ6|deep-ab||||20260304050607\rOBR|1|I1^\xe9\xe9n||S\\F\\nd\\S\\er||1\rZOB\rOBR|2|I\\S\\2||S\\F\\nd\\S\\er||2\rZOB\rOBR|3||plain|S\\F\\nd\\S\\er||3\rZOB\rOBR|4||7|S\\F\\nd\\S\\er||4\rZOB\rOBR|5|||S\\F\\nd\\S\\er||5\rZOB\rZEN|end\r')]


def _strftime(value: dt.date) -> str:
    """The reference: strftime's fields, with the year zero-padded to 4 digits and the UTC
    offset rounded to whole minutes (HL7 has no seconds in an offset; strftime's %z would
    write Amsterdam's pre-1940 +001932)."""
    year = "%04d" % value.year
    if isinstance(value, dt.datetime):
        text = year + value.strftime("%m%d%H%M%S")
        offset = value.utcoffset()
        if offset is None:
            return text
        minutes = round(offset.total_seconds() / 60)
        return text + ("+" if offset >= dt.timedelta(0) else "-") + "%02d%02d" % divmod(abs(minutes), 60)
    return year + value.strftime("%m%d")


OFFSETS = st.one_of(
    st.none(),
    st.sampled_from([dt.timezone.utc, TZ, dt.timezone(dt.timedelta(hours=-3, minutes=-30))]),
    st.timedeltas(min_value=dt.timedelta(hours=-23, minutes=-59), max_value=dt.timedelta(hours=23, minutes=59)).map(dt.timezone),
    st.timezones(),
)


@given(st.datetimes(timezones=OFFSETS))
@settings(max_examples=500)
def test_datetimes_format_as_hl7_dtm_with_a_four_digit_year_and_a_whole_minute_offset(value):
    from engine.mapping import _format

    assert _format(value) == _strftime(value)
    assert _format(value.date()) == _strftime(value.date())


def one_template(tmp_path: Path, template: str):
    """The mapping `m` with one outbound to `a`, built with ``template`` (loaded: ConfigError if bad)."""
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "t.yaml").write_text(template, encoding="utf-8")
    (tmp_path / "m.yaml").write_text(MAPPING.split("outbound:")[0] + "outbound:\n  - {to: a, template: t.yaml}\n",
                                     encoding="utf-8")
    return load_mappings(tmp_path).mapping("m")


HEAD = '''version: "2.5"
charset: 8859/1
segments:
  - MSH: {3: KOPPEL}
'''
QUALIFIED = "message: SIU^S12^SIU_S12\n" + HEAD + r'''  - PID:
      3: [["{bsn}", "", "", NLMINBIZA, NNNLD], ["{zd}", "", "", ZorgDomein, VN]]
      11: [[["", "{street}", "{number}"], "", "{city}", "", "", NL, M]]
      13: [["{phone}", PRN, PH], ["{mobile}", ORN, CP]]
  - SCH: {1: ["{zd}", ZorgDomein], 25: [Pending, "{status}", HL70278], 26: ["lit^", "{status}"]}
'''


@pytest.mark.parametrize("fields, pid, sch", [
    ({"bsn": "123456782", "zd": "ZD1", "phone": "010-5550001", "mobile": "06-55500002", "city": "Koppelstad"},
     b"PID|||123456782^^^NLMINBIZA^NNNLD~ZD1^^^ZorgDomein^VN||||||||^^Koppelstad^^^NL^M||010-5550001^PRN^PH~06-55500002^ORN^CP",
     b"SCH|ZD1^ZorgDomein" + b"|" * 24 + b"Pending^^HL70278|lit"),
    # no mobile: no "~^ORN^CP"; no BSN: no "^^^NLMINBIZA^NNNLD~" before the ZD-number; no ZD: SCH-1
    # empty; a repetition left out leaves no empty one behind
    ({"phone": "010-5550001", "zd": "ZD1", "city": "Koppelstad"},
     b"PID|||ZD1^^^ZorgDomein^VN||||||||^^Koppelstad^^^NL^M||010-5550001^PRN^PH",
     b"SCH|ZD1^ZorgDomein" + b"|" * 24 + b"Pending^^HL70278|lit"),
    ({"mobile": "06-55500002", "status": "wacht"},
     b"PID|||||||||||||06-55500002^ORN^CP",
     b"SCH|" + b"|" * 24 + b"Pending^wacht^HL70278|lit^^wacht"),
])
def test_a_repetition_whose_placeholders_are_all_empty_is_left_out_with_its_qualifiers(tmp_path, fields, pid, sch):
    """Literals that only qualify a value (an identifier's namespace, a phone number's use and
    type) go with it; a literal first component (a status code) stays whatever else is empty."""
    mapping = one_template(tmp_path, QUALIFIED)
    event = AgendaEvent(kind="appointment-request", action="create", zd_number=None, fields=fields)
    [(_, data)] = build_outbound(mapping, event, Entry(), control_id="K1", timestamp=NOW)
    segments = data.split(b"\r")
    assert segments[1] == pid
    assert segments[2] == sch


ALTERNATIVES = "message: SIU^S15^SIU_S12\n" + HEAD + r'''  - AIS: {3: ["{service.code or booked.code}", "{service.text or booked.text}"], 4: "{nothing or also_nothing}", 5: "x{zd_number or placer_id}y"}
'''


@pytest.mark.parametrize("fields, ais", [
    ({"service": Code(code="C1", text="consult", system="L"), "booked": Code(code="B1", text="booked", system="L")},
     b"AIS|||C1^consult||xZD1y"),
    ({"booked": Code(code="B1", text="booked", system="L")}, b"AIS|||B1^booked||xZD1y"),
    # a code that is there keeps its own empty text: one code's parts are never mixed with another's
    ({"service": Code(code="C2", text="", system=""), "booked": Code(code="B2", text="b", system="L")},
     b"AIS|||C2||xZD1y"),
])
def test_a_placeholder_with_or_takes_the_first_alternative_that_is_there(tmp_path, fields, ais):
    """{entry.care_product.code or entry.booked_service.code}: a REF referral has no care product,
    the HIS's booked service fills the S15's required AIS-3."""
    mapping = one_template(tmp_path, ALTERNATIVES)
    event = AgendaEvent(kind="appointment-request", action="create", zd_number="ZD1", fields=fields)
    [(_, data)] = build_outbound(mapping, event, Entry(), control_id="K1", timestamp=NOW)
    assert data.split(b"\r")[1] == ais


@pytest.mark.parametrize("placeholder, problem", [
    ("{service.code or}", "is not a dotted event field name"),
    ("{service.code or Booked}", "is not a dotted event field name"),
    ("{zd_number or item.code}", "only known inside a for_each block"),
])
def test_a_bad_alternative_in_a_placeholder_is_a_config_error_with_its_line(tmp_path, placeholder, problem):
    from engine.config import ConfigError

    with pytest.raises(ConfigError) as raised:
        one_template(tmp_path, f'message: SIU^S15\nversion: "2.5"\ncharset: 8859/1\nsegments:\n'
                               f'  - AIS: {{3: "{placeholder}"}}\n')
    assert "t.yaml:5:" in str(raised.value) and problem in str(raised.value)


def test_control_id_is_the_built_messages_own_msh_10(tmp_path):
    """{control_id}: a number unique per built message (the archive's TXA-12 per document),
    escaped like any value."""
    mapping = one_template(tmp_path, "message: MDM^T02^MDM_T02\n" + HEAD + '  - TXA: {12: ["{control_id}", KOPPEL], 4: "{timestamp}"}\n')
    event = AgendaEvent(kind="referral", action="attach", zd_number="ZD1", fields={})
    [(_, first)] = build_outbound(mapping, event, Entry(), control_id="K9^1", timestamp=NOW)
    [(_, second)] = build_outbound(mapping, event, Entry(), control_id="K10", timestamp=NOW)
    txa = [m.split(b"\r")[1] for m in (first, second)]
    assert txa == [b"TXA||||20260102030405+0100||||||||K9\\S\\1^KOPPEL", b"TXA||||20260102030405+0100||||||||K10^KOPPEL"]
    assert first.split(b"\r")[0].split(b"|")[9] == b"K9\\S\\1"  # the same as its MSH-10


FLAT = "message: SIU^S12^SIU_S12\n" + HEAD + r'''  - ZZ1: {1: ["a&", "{x}", "b"], 2: ["{x}", "{y}", ""], 3: ["{x}", "lit^", "{y}"], 4: ["{x}", "{y}", "c&"]}
'''


@pytest.mark.parametrize("fields, zz1", [
    ({"x": "p&q^r", "y": "s"}, rb"ZZ1|a^p\T\q\S\r^b|p\T\q\S\r^s|p\T\q\S\r^lit^^s|p\T\q\S\r^s^c"),
    ({"x": "p&q^r"}, rb"ZZ1|a^p\T\q\S\r^b|p\T\q\S\r|p\T\q\S\r^lit|p\T\q\S\r^^c"),
    ({}, b"ZZ1|a^^b"),
])
def test_components_of_one_leaf_each_trim_as_component_by_component(tmp_path, fields, zz1):
    """A repetition of one-leaf components is joined in one step: escaped values keep their
    escapes, a literal's trailing subcomponent separator and trailing empty components are
    trimmed as before, and a repetition whose placeholders are all empty is left out."""
    mapping = one_template(tmp_path, FLAT)
    event = AgendaEvent(kind="appointment-request", action="create", zd_number=None, fields=fields)
    [(_, data)] = build_outbound(mapping, event, Entry(), control_id="K1", timestamp=NOW)
    assert data.split(b"\r")[1] == zz1
