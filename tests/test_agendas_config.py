"""engine.agendas_config: agendas.yaml into an AgendaBook, every problem located."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from engine.agendas_config import load_agendas
from engine.config import ConfigError
from engine.core.agenda import AgendaEvent

BUNDLED = Path(__file__).resolve().parent.parent / "mappings" / "agendas.yaml"

VALID = """\
agendas:
  - id: cardiology
    name: Cardiologie
    location_agb: "06990001"
    select:
      - specialism: [CAR]
  - id: rest
    name: Rest
    fallback: true
"""


def load(tmp_path: Path, text: str):
    path = tmp_path / "agendas.yaml"
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return load_agendas(path)


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load(tmp_path, text)
    return [str(p).replace(str(tmp_path) + "/", "") for p in caught.value.problems]


def event(kind: str = "appointment-request", **fields: object) -> AgendaEvent:
    return AgendaEvent(kind=kind, action="create", zd_number="ZD100000001", fields=fields)


@pytest.mark.parametrize(
    "made, agenda_id",
    [
        (event(specialism="CAR", care_product={"code": "CARREG001"}), "cardiology"),
        (event(care_product={"code": "CARHFP002"}), "cardiology"),
        (event(specialism="GYN"), "gynaecology"),
        (event("diagnostic-order", care_product={"code": "BEEEDG008"}, cluster="Radiologie"), "radiology-echo"),
        (event("diagnostic-order", care_product={"code": "LABEDG001"}, cluster="Laboratorium"), "laboratory"),
        (event("referral", prd_specialty="0320"), "cardiology"),
    ],
)
def test_the_bundled_agendas_select_each_department(made, agenda_id):
    book = load_agendas(BUNDLED)
    assert book.select(made) == (book.agenda(agenda_id), False)


def test_the_bundled_agendas_send_the_unknown_to_the_flagged_fallback():
    book = load_agendas(BUNDLED)
    agenda, is_fallback = book.select(event(specialism="DER", cluster="Dermatologie"))
    assert is_fallback and agenda.id == "unassigned" and agenda is book.fallback


def test_a_valid_file_keeps_leading_zeros_and_file_order(tmp_path):
    book = load(tmp_path, VALID)
    assert [a.id for a in book.agendas] == ["cardiology", "rest"]
    assert book.agenda("cardiology").location_agb == "06990001"


@pytest.mark.parametrize(
    "text, expected",
    [
        (VALID.replace("    name: Cardiologie\n", "    name: Cardiologie\n    colour: red\n"),
         "agendas.yaml:4:5: agendas[0].colour: unknown key; expected one of: id, name, department, location_agb, "
         "select, fallback"),
        (VALID.replace('"06990001"', '"1234"'),
         "agendas.yaml:4:19: agendas[0].location_agb: an AGB code is 8 digits, not 4"),
        (VALID.replace('"06990001"', '6990001'),  # (quoted, a leading zero would have stayed)
         "agendas.yaml:4:19: agendas[0].location_agb: an AGB code is 8 digits, not 7 (quote it to keep leading "
         "zeros)"),
        (VALID.replace("specialism: [CAR]", "specialsm: [CAR]"),
         "agendas.yaml:6:9: agendas[0].select[0].specialsm: unknown key; did you mean specialism?"),
        (VALID.replace("specialism: [CAR]", "specialism: []"),
         "agendas.yaml:6:21: agendas[0].select[0].specialism: an empty list would match nothing; leave the key out "
         "instead"),
        (VALID.replace("specialism: [CAR]", "kind: [letter]"),
         "agendas.yaml:6:16: agendas[0].select[0].kind[0]: 'letter' is not one of: appointment-request, referral, "
         "diagnostic-order, appointment"),
        (VALID.replace("specialism: [CAR]", "care_product: [C*R]"),
         "agendas.yaml:6:24: agendas[0].select[0].care_product[0]: expected a code or name; '*' is allowed only at "
         "the end, as a prefix match"),
        (VALID.replace("    fallback: true\n", "    fallback: true\n    select:\n      - kind: [referral]\n"),
         "agendas.yaml:10:5: agendas[1].select: the fallback agenda takes what no rule selects; remove select or "
         "fallback"),
        (VALID.replace("    fallback: true\n", "    fallback: yes please\n"),
         "agendas.yaml:9:15: agendas[1].fallback: expected true or false, got 'yes please'"),
        (VALID.replace("  - id: rest", "  - id: cardiology"),
         "agendas.yaml:7:5: agendas[1].id: agenda id 'cardiology' is used twice (first at line 2)"),
        (VALID.replace("    select:\n      - specialism: [CAR]\n", ""),
         "agendas.yaml:2:5: agendas[0].select: missing: an agenda without select rules is never chosen"),
        (VALID.replace("    fallback: true\n", "    select:\n      - kind: [referral]\n"),
         "agendas.yaml:2:3: agendas: no agenda has fallback: true; one must take what no rule selects"),
        (VALID + "  - id: rest2\n    name: Rest 2\n    fallback: true\n",
         "agendas.yaml:10:5: agendas[2].fallback: a second fallback agenda (first: 'rest')"),
        (VALID.replace("      - specialism: [CAR]\n", "      - {}\n"),
         "agendas.yaml:6:9: agendas[0].select[0]: a rule needs at least one of: specialism, care_product, cluster, "
         "prd_specialty, location_agb, kind"),
        ("agendas: [\n", "agendas.yaml:2:1: (yaml): YAML syntax: expected the node content, but found '<stream end>' "
                         "(while parsing a flow node)"),
        ("", "agendas.yaml:1:1: (top): file is empty; expected agendas: [...]"),
        ("agendas: []\n", "agendas.yaml:1:10: agendas: expected a non-empty list of agendas, each with id and name"),
    ],
    ids=["unknown-key", "agb", "agb-unquoted", "typo", "empty-list", "kind", "star", "fallback-select", "bool", "duplicate-id",
         "no-select", "no-fallback", "two-fallbacks", "empty-rule", "yaml-syntax", "empty-file", "no-agendas"],
)  # fmt: skip
def test_each_problem_is_reported_with_file_line_col_and_path(tmp_path, text, expected):
    assert problems(tmp_path, text) == [expected]


def test_all_problems_are_reported_at_once(tmp_path):
    text = VALID.replace('"06990001"', '"x"').replace("    name: Rest\n", "    name: Rest\n    extra: 1\n")
    found = problems(tmp_path, text)
    assert [p.split(": ")[0] for p in found] == ["agendas.yaml:4:19", "agendas.yaml:9:5"]


def test_a_missing_file_is_a_problem_without_a_line(tmp_path):
    with pytest.raises(ConfigError, match=r"missing\.yaml: \(file\): cannot read"):
        load_agendas(tmp_path / "missing.yaml")
