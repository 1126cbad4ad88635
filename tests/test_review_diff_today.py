"""Review of d4522da..HEAD (environment substitution, {a or b} and {control_id}, prefer, the
agenda move on update, per-test order values, the template fast paths, trace). Each test here
fails for one defect found. Synthetic data only."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.config import ConfigError, load_config
from engine.core.hl7message import Message
from engine.mapping import load_mappings
from tests.test_agenda_orderings import Harness, world  # noqa: F401 - the fixture
from tests.conftest import load_sample
from tests.test_review_orders_letters import BSN, ZD, built, fld, orm, segment


def _channel_dirs(tmp_path: Path, text: str) -> tuple[Path, Path]:
    (tmp_path / "channels").mkdir()
    (tmp_path / "mappings").mkdir()
    (tmp_path / "channels" / "a.yaml").write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return tmp_path / "channels", tmp_path / "mappings"


def _order_update_mapping(tmp_path: Path, fields: str):
    """Mapping `m`: an ORM^O01 read as an update of a diagnostic order, with ``fields`` too."""
    return _mapping(tmp_path, """
        name: m
        types: [ORM^O01]
        event:
          kind: {value: diagnostic-order}
          action: {value: update}""" + fields + """
    """)


def _mapping(tmp_path: Path, text: str):
    (tmp_path / "m.yaml").write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return load_mappings(tmp_path).mapping("m")


def _orm(*controls: str) -> Message:
    raw = "MSH|^~\\&|ZD||K||20260101||ORM^O01|1|P|2.4\r" + "".join(
        f"ORC|{c}|P{i}||ZD300000001\r" for i, c in enumerate(controls))
    return Message.parse(raw.encode(), codec="latin-1")


# --------------------------------------------------------------------------- 1. ${NAME} in channel files


def _his_channel(tmp_path, his: str):
    """Channel `a` (file lines 1-5 fixed) with destination `his` given by ``his`` (from line 6)."""
    return _channel_dirs(tmp_path, """
        name: a
        source:
          listen: tcp:2575
        destinations:
          his:""" + his + """
        routes:
          - to: [his]
    """)


def test_a_nested_default_is_substituted_or_refused_never_sent_as_literal_text(tmp_path):
    """`${RECEIVER:-${DEFAULT_RECEIVER}}` (the shell's and docker-compose's nested default) is
    neither substituted nor a config error: the default stops at the first `}`, so the HIS gets
    MSH-5 `${DEFAULT_RECEIVER}` as literal text, and `koppel check` says the file is fine.
    Fix: engine/config.py substitute_environment (report a `${` inside a default, or expand it)."""
    channels, mappings = _his_channel(tmp_path, """
            endpoint: tcp:host=his.local:port=6661
            rewrite: {MSH-5: "${RECEIVER:-${DEFAULT_RECEIVER}}"}""")
    try:
        config = load_config(channels, mappings, environ={"DEFAULT_RECEIVER": "HIX"})
    except ConfigError as error:  # refused, naming where: also a fix
        assert "DEFAULT_RECEIVER" in str(error) or "${" in str(error)
        return
    (his,) = config.destinations
    assert dict(his.rewrite)["MSH-5"] == "HIX"


def test_an_unset_variable_in_a_folded_value_is_reported_at_its_own_line_and_column(tmp_path):
    """README: an unset variable is a config error "at its file:line:col". In a folded (`>-`)
    or literal block value the problem names the line of `>-` and its column, not where
    `${HIS_HOST}` is (line 7, column 16), so `koppel check` points at the wrong line of a long
    endpoint or `allow` value. Fix: engine/config.py substitute_environment (count the lines
    and the indentation of a multi-line scalar, as the value's text is a folded copy)."""
    channels, mappings = _his_channel(tmp_path, """
            endpoint: >-
              tcp:host=${HIS_HOST}:port=6661""")
    with pytest.raises(ConfigError) as caught:
        load_config(channels, mappings, environ={})
    (problem,) = caught.value.problems
    assert (problem.line, problem.col) == (7, 16), str(problem)


# --------------------------------------------------------------------------- 3. prefer


def test_prefer_does_not_mark_a_sent_value_as_the_default_because_another_value_took_it(tmp_path):
    """With `default`, each selected value that is not in the table becomes the default and
    appends to `defaulted`, even when another, sent value wins: ORC-1 NW and ZZ give `N` from
    the message, yet the event says the field took the mapping's default, so the agenda only
    fills it where the entry lacks it (ag._merge `defaulted`): the sent value never replaces an
    older one. Fix: engine/mapping.py _Value._preferred (record `defaulted` only when the
    default is the value returned)."""
    mapping = _order_update_mapping(tmp_path, """
          zd_number: {from: ORC-4.1}
          control: {from: "ORC[*]-1", table: {NW: N, CA: C}, default: U, prefer: [N, C]}""")
    event = mapping.apply(_orm("NW", "ZZ")).event
    assert event.fields["control"] == "N"
    assert "control" not in event.defaulted


# --------------------------------------------------------------------------- 5. the RIS order: {x or entry.x}


def test_a_new_address_reaches_the_ris_without_the_old_addresss_house_number_addition(world):
    """The RIS template reads each address part as `{patient.X or entry.patient.X}`: a change
    (XO) with the patient's new address `Kerkweg 3` (no addition) goes to the RIS as
    `Kerkweg 3&Kerkweg&3^b^...`, the `b` of the old address `Dorpsstraat 12 b` (the entry keeps
    it: an empty value never erases). Before this change the RIS got this message's address.
    A fallback to the entry belongs to the address as a whole (the message's, else the
    entry's), not to each part. Fix: mappings/templates/ris_orm_o01.yaml (and whatever the
    template language needs for a record-level fallback in engine/mapping.py)."""
    h = world("move")
    h.receive(orm([{"code": "ECHOABD", "placer": "PL-1"}]))
    h.receive(orm([{"code": "ECHOABD", "placer": "PL-1", "control": "XO"}], control_id="ORM2",
                  address="Kerkweg 3&Kerkweg&3^^Koppelstad^^1234 AB^NL^M"))
    last = built(h, "ORM^O01")[-1]
    pid11 = fld(segment(last, "PID"), 11)
    assert pid11.split("^")[0] == "Kerkweg 3&Kerkweg&3"
    assert pid11.split("^")[1] == "", pid11


def _srm(*, care_product: bytes = b"CARREG001", specialism: bytes = b"CAR") -> bytes:
    """ZorgDomein's SRM^S01 sample for this review's patient and ZD-number (PID-8 U, PID-5 de Boer)."""
    raw = load_sample("zorgdomein/zd_srm_s01_appointment_request.hl7")
    raw = raw.replace(b"PID|1||^^^NLMINBIZA", f"PID|1||{BSN}^^^NLMINBIZA".encode()).replace(b"ZD200046139", ZD.encode())
    return raw.replace(b"CARREG001^consult", care_product + b"^consult").replace(b"AIG|1|U|CAR^", b"AIG|1|U|" + specialism + b"^")


def test_the_ris_gets_the_sex_the_order_sends_not_an_unknown_from_the_request(world):
    """`PID-8: {entry.patient.sex or patient.sex}` reads the entry first (meant for a cancel
    without PID-8). For an order whose referral came as an SRM^S01 with PID-8 `U` (as
    ZorgDomein's sample sends it), the entry keeps the request's U (the order, a lesser kind,
    does not replace it), so the RIS gets sex U for an ORM^O01 that says F; before this change
    it got F. Only a defaulted sex should give way to the entry's. Fix:
    mappings/templates/ris_orm_o01.yaml (this message's sex unless the mapping defaulted it)."""
    h = world("sex")
    h.receive(_srm())
    h.receive(orm([{"code": "ECHOABD", "placer": "PL-1"}]))  # PID-8 F
    (ris,) = built(h, "ORM^O01")
    assert fld(segment(ris, "PID"), 8) == "F"


def test_the_ris_gets_one_persons_name_not_parts_of_two(world):
    """Each name part is `{patient.name.X or entry.patient.name.X}`: an order for a referral
    whose SRM named the patient `de Boer` (own prefix `de`) and whose ORM^O01 names her
    `Testpatiënt` (no prefix) goes to the RIS as `Testpatiënt&de&Testpatiënt`, a name neither
    message sent. The name is one value (the message's, else the entry's), not five. Fix:
    mappings/templates/ris_orm_o01.yaml (a record-level fallback, with what engine/mapping.py
    needs for it)."""
    h = world("name")
    h.receive(_srm())
    h.receive(orm([{"code": "ECHOABD", "placer": "PL-1"}]))
    (ris,) = built(h, "ORM^O01")
    fn = fld(segment(ris, "PID"), 5).split("^")[0].split("&")
    assert fn[:3] in (["Testpatiënt", "", "Testpatiënt"], ["de Boer", "de", "Boer"]), fn


# --------------------------------------------------------------------------- 4. the agenda move on update


def test_the_agenda_move_ends_in_the_same_agenda_whatever_the_arrival_order(world):
    """README: an update from the entry's own sender moves it "so either arrival order ends in
    the same agenda". An order (echo: radiology) changed by XO to a gynaecology care product,
    and the referral's SRM^S01 that selects no agenda (it takes the entry over): NW, XO, SRM
    ends in gynaecology (the SRM keeps the agenda it finds); NW, SRM, XO ends in radiology (the
    XO is no longer of the entry's kind, so it moves nothing). Same messages, same entry data,
    two agendas. Fix: engine/core/agenda.py _apply (the move, and the take-over's keeping of
    the agenda, must not depend on which came first)."""
    xo = orm([{"code": "ECHOABD", "placer": "PL-1", "control": "XO"}], control_id="ORM2").replace(
        b"PV2|||BEEEDG008^Echo buik", b"PV2|||GYNEDG001^Echo gynaecologisch")
    messages = {"nw": orm([{"code": "ECHOABD", "placer": "PL-1"}]), "xo": xo,
                "srm": _srm(care_product=b"XYZ001", specialism=b"XYZ")}
    ends = []
    for name, order in (("first", ("nw", "xo", "srm")), ("second", ("nw", "srm", "xo"))):
        h = world(name)
        for step in order:
            h.receive(messages[step])
        entry = h.entry()
        ends.append((entry.agenda_id, entry.kind, entry.state))
    assert ends[0] == ends[1], ends


# --------------------------------------------------------------------------- 6. the code/name convert fast path


def test_the_name_fast_path_skips_a_repetition_that_unescapes_to_nothing_as_the_full_split_did(tmp_path):
    """paths.first_subcomponents decides whether a value has content on the escaped text, the
    full split (components, before this change) on the unescaped one: a PID-5 whose first
    repetition is only a formatting escape (`\\H\\`, which unescapes to nothing) was passed
    over for the next repetition's name; now it is taken, and the message fails to map
    ("name has no surname"), an AE where it used to map. Fix: engine/core/paths.py
    first_subcomponents (test content after unescaping, as components did)."""
    mapping = _order_update_mapping(tmp_path, """
          zd_number: {value: ZD300000001}
          patient.name: {from: PID-5, convert: dutch_name}""")
    raw = "MSH|^~\\&|ZD||K||20260101||ORM^O01|1|P|2.4\rPID|1||||\\H\\~Jansen^J\r"
    result = mapping.apply(Message.parse(raw.encode(), codec="latin-1"))
    assert result.errors == ()  # as the full split did: PID-5 (its first repetition) holds nothing
    assert "patient.name" not in result.event.fields
