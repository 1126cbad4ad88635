"""load_bundle: channels, mappings and agendas loaded once and checked against each other."""

import shutil
from pathlib import Path

import pytest

from engine.bundle import load_bundle
from engine.config import ConfigError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def dirs(tmp_path):
    shutil.copytree(REPO / "channels", tmp_path / "channels")
    shutil.copytree(REPO / "mappings", tmp_path / "mappings")
    return tmp_path / "channels", tmp_path / "mappings"


def problems(channels, mappings) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        load_bundle(channels, mappings)
    return [str(p) for p in caught.value.problems]


def test_the_bundled_configuration_loads_with_its_mappings_and_agendas():
    bundle = load_bundle(REPO / "channels", REPO / "mappings")
    assert {m.name for m in bundle.mappings.mappings} >= {"zorgdomein-srm", "zorgdomein-oru", "siu"}
    assert bundle.book.fallback.id == "unassigned"


def test_a_route_naming_an_unknown_mapping_is_reported_at_its_line_and_column(dirs):
    channels, mappings = dirs
    path = channels / "zorgdomein-in.yaml"
    text = path.read_text().replace("map: zorgdomein-oru", "map: zorgdomein-orux")
    path.write_text(text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "zorgdomein-orux" in row)
    (problem,) = problems(channels, mappings)
    assert problem.startswith(f"{channels}/zorgdomein-in.yaml:{line}:10: routes[1].map: unknown mapping 'zorgdomein-orux'")


def test_a_mapping_that_does_not_load_is_reported_once_not_again_for_every_route(dirs):
    channels, mappings = dirs
    srm = mappings / "zorgdomein-srm.yaml"
    srm.write_text(srm.read_text().replace("  action: {from: MSH-9.2", "  acton: {from: MSH-9.2"))
    found = problems(channels, mappings)
    assert len(found) == 1 and "event.action: missing" in found[0]


def test_an_outbound_destination_no_channel_defines_is_reported_in_the_mapping_file(dirs):
    channels, mappings = dirs
    srm = mappings / "zorgdomein-srm.yaml"
    srm.write_text(srm.read_text().replace("to: his-scheduling", "to: his-schedule", 1))
    (problem,) = problems(channels, mappings)
    assert "zorgdomein-srm.yaml" in problem and "unknown destination 'his-schedule'" in problem


def test_routes_that_map_need_an_agendas_file(dirs):
    channels, mappings = dirs
    (mappings / "agendas.yaml").unlink()
    (problem,) = problems(channels, mappings)
    assert "no agendas.yaml" in problem
