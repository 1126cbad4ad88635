"""Review of session 17's changes (config name checks, {agenda.*}, mapping-path speed-ups):
the behaviour changes found to be bugs, each as a failing test."""

from __future__ import annotations

import datetime as dt
import shutil
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest

from engine.agendas_config import load_agendas
from engine.bundle import load_bundle
from engine.config import ConfigError
from engine.core.agenda import AgendaEvent
from engine.mapping import build_outbound, load_mappings

REPO = Path(__file__).resolve().parent.parent
NOW = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
TEMPLATE_HEAD = 'message: SIU^S12^SIU_S12\nversion: "2.5"\ncharset: 8859/1\nsegments:\n  - MSH: {3: KOPPEL}\n'


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def one_mapping(tmp_path: Path, event_lines: str, segments: str) -> Path:
    """A mappings dir: one SRM^S01 mapping (kind/action constants plus ``event_lines``) whose
    one outbound builds templates/t.yaml (its segments after MSH: ``segments``)."""
    write(tmp_path, "templates/t.yaml", TEMPLATE_HEAD + segments)
    (tmp_path / "m.yaml").write_text(
        "name: m\ntypes: [SRM^S01]\nevent:\n  kind: {value: appointment-request}\n  action: {value: create}\n"
        + textwrap.indent(textwrap.dedent(event_lines).lstrip("\n"), "  ")
        + "outbound:\n  - {to: his, template: t.yaml}\n", encoding="utf-8")
    return tmp_path


# --------------------------------------------------------------------------------------
# bundle.py: a route's map must map every type the route takes


def test_a_route_type_accept_types_refuses_does_not_fail_the_config_as_a_mapping_error(tmp_path):
    """A type a route names that accept.types refuses can never reach the route (AR before
    routing): `koppel check` only warns of it (unreachable_route_types). The new map check
    counts it among the types the route "takes" and refuses the whole config ("every one
    would be a mapping error", though none can arrive): a config that ran yesterday no
    longer starts or reloads."""
    channels, mappings = tmp_path / "channels", tmp_path / "mappings"
    shutil.copytree(REPO / "channels", channels)
    shutil.copytree(REPO / "mappings", mappings)
    path = channels / "scheduler-in.yaml"
    text = path.read_text()
    old = "  - when: {types: [SIU^S12, SIU^S13, SIU^S14, SIU^S15]}\n    map: siu"
    assert old in text
    path.write_text(text.replace(old, old.replace("SIU^S15]", "SIU^S15, SIU^S17]")))
    load_bundle(channels, mappings)  # raises ConfigError: "... not SIU^S17, which this route takes ..."


# --------------------------------------------------------------------------------------
# mapping.py: names every placeholder reads must be set by a mapping


def test_a_code_set_through_a_first_of_a_first_is_not_refused_as_never_set(tmp_path):
    """A `first:` option may itself be a `first:` (the reader allows it, and it maps to a
    Code); {care_product.code} then has a value, but _deeper only looks one level into the
    options' converts and refuses the config."""
    directory = one_mapping(tmp_path, """
        care_product:
          first:
            - first:
                - {from: ARQ-7, convert: code}
        """, '  - AIS: {3: ["{care_product.code}", "{care_product.text}"]}\n')
    mappings = load_mappings(directory)  # raises ConfigError: "no mapping ... sets 'care_product.code'"
    event = AgendaEvent(kind="appointment-request", action="create", zd_number=None, fields={})
    assert build_outbound(mappings.mapping("m"), event, SimpleNamespace(id=1, state="requested"),
                          control_id="K1", timestamp=NOW)


def test_an_event_field_named_agenda_is_not_silently_read_as_the_agendas_instead(tmp_path):
    """Before, {agenda.name} read the event field a mapping set under that name. Now the head
    `agenda` is the agenda from agendas.yaml: the mapping still loads without a word and the
    field goes out empty (or as the agenda's name). Either the load should refuse the event
    field name (as it refuses {agenda.code}) or the template should read what the mapping set."""
    directory = one_mapping(tmp_path, "agenda.name: {from: AIL-3.9}\n", '  - AIL: {3: "{agenda.name}"}\n')
    try:
        mappings = load_mappings(directory)
    except ConfigError:
        return  # refused at load: the collision is said, not silent
    event = AgendaEvent(kind="appointment-request", action="create", zd_number=None,
                        fields={"agenda.name": "Poli Synthetisch"})
    [(_, data)] = build_outbound(mappings.mapping("m"), event, SimpleNamespace(id=1, state="requested"),
                                 control_id="K1", timestamp=NOW)
    ail = next(line for line in data.split(b"\r") if line.startswith(b"AIL"))
    assert ail == b"AIL|||Poli Synthetisch"


# --------------------------------------------------------------------------------------
# agendas_config.py: the AGB message


def test_an_agb_code_with_a_letter_is_not_said_to_have_the_wrong_length(tmp_path):
    """`an AGB code is 8 digits, not 8 characters` for "0699000X": the new message blames
    the length, which is right (8); a character that is not a digit is what is wrong. (Before:
    "an AGB code is 8 digits (quote it to keep leading zeros)", which did not contradict itself.)"""
    path = tmp_path / "agendas.yaml"
    path.write_text(
        'agendas:\n  - id: cardiology\n    name: Cardiologie\n    location_agb: "0699000X"\n'
        "    select:\n      - specialism: [CAR]\n  - id: rest\n    name: Rest\n    fallback: true\n",
        encoding="utf-8")
    with pytest.raises(ConfigError) as caught:
        load_agendas(path)
    (problem,) = caught.value.problems
    assert "agendas[0].location_agb" in str(problem)
    assert "not 8 characters" not in problem.message, problem.message
