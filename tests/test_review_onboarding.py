"""Onboarding review: an integration engineer adds an agenda, a destination and a route using
only the README and the bundled config, then breaks the config the way a human would.
Each test here fails because of a bug found in that drill: a mistake that `koppel check`
passes although the engine then silently sends less than the config author meant, or an
error that does not have the documented `file:line:col: dotted.path: what is wrong` form."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from engine.bundle import load_bundle
from engine.cli import main
from engine.config import ConfigError
from engine.store import open_store

ROOT = Path(__file__).resolve().parent.parent


def _bundled(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the bundled channels and mappings (the engineer's scratch copy)."""
    channels, mappings = tmp_path / "channels", tmp_path / "mappings"
    shutil.copytree(ROOT / "channels", channels)
    shutil.copytree(ROOT / "mappings", mappings)
    return channels, mappings


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) >= 1, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def _problems(channels: Path, mappings: Path) -> list[str]:
    with pytest.raises(ConfigError) as error:
        load_bundle(channels, mappings)
    return [str(p) for p in error.value.problems]


def test_bundled_copy_loads(tmp_path):
    """The baseline every other test changes one thing in."""
    load_bundle(*_bundled(tmp_path))


def test_template_placeholder_that_no_mapping_sets_is_a_config_error(tmp_path):
    """A typo in a placeholder (`{zd_numbr}` for `{zd_number}`) passed `koppel check`, and the
    HIS then got every SIU^S12 with an empty SCH-1 (no placer appointment id) without a word."""
    channels, mappings = _bundled(tmp_path)
    template = mappings / "templates" / "his_siu_s12.yaml"
    _edit(template, '1: ["{zd_number}", ZorgDomein]', '1: ["{zd_numbr}", ZorgDomein]')
    problems = _problems(channels, mappings)
    assert any(re.match(rf"{re.escape(str(template))}:8:\d+: segments\[1\]\.SCH\.1.*zd_numbr", p)
               for p in problems), problems


@pytest.mark.parametrize("old, new, bad", [
    ("when: {action: create, entry.state: requested}", "when: {acton: create, entry.state: requested}", "acton"),
    ("when: {action: create, entry.state: requested}", "when: {action: create, entry.state: requestd}", "requestd"),
    ("when: {action: create, entry.state: requested}", "when: {action: creat, entry.state: requested}", "creat"),
])
def test_outbound_when_that_can_never_hold_is_a_config_error(tmp_path, old, new, bad):
    """A typo in an outbound's `when` (an unknown event field name, a state or action that does
    not exist) passed `koppel check`; the SIU^S12 was then never built for any request, and
    `koppel map` shows `"outbound": []` with outcome `mapped`: nothing says why."""
    channels, mappings = _bundled(tmp_path)
    srm = mappings / "zorgdomein-srm.yaml"
    _edit(srm, old, new)
    problems = _problems(channels, mappings)
    assert any(re.match(rf"{re.escape(str(srm))}:47:\d+: outbound\[0\]\.when\b.*", p) and bad in p
               for p in problems), problems


def test_empty_repetition_selector_value_in_a_mapping_path_is_a_config_error(tmp_path):
    """`PID-3[4=].1` (the assigning authority forgotten) passed `koppel check`; the BSN was then
    never mapped (patient.bsn is optional), so the HIS got requests without a BSN."""
    channels, mappings = _bundled(tmp_path)
    srm = mappings / "zorgdomein-srm.yaml"
    _edit(srm, '"PID-3[4=NLMINBIZA].1"', '"PID-3[4=].1"')
    problems = _problems(channels, mappings)
    assert any(p.startswith(f"{srm}:10:") and "event.patient.bsn" in p for p in problems), problems


def test_empty_repetition_selector_value_in_a_route_condition_is_a_config_error(tmp_path):
    channels, mappings = _bundled(tmp_path)
    zd = channels / "zorgdomein-in.yaml"
    _edit(zd, "  - when: {types: [ORU^R01]}\n",
          '  - when: {types: [ORU^R01], fields: {"PID-3[4=].1": "*"}}\n')
    problems = _problems(channels, mappings)
    assert any(re.match(rf"{re.escape(str(zd))}:\d+:\d+: routes\[1\]\.when\.fields\.PID-3\[4=\]\.1: ", p)
               for p in problems), problems


def test_unknown_outbound_destination_is_reported_as_file_line_col_and_indexed_path(tmp_path):
    """README: every config error is `file:line:col: dotted.path: what is wrong`. A typo in a
    mapping's `outbound.to` came out as `zorgdomein-srm.yaml:46: outbound.to: ...`: no
    column, and no index to tell which of the file's outbound entries is meant."""
    channels, mappings = _bundled(tmp_path)
    srm = mappings / "zorgdomein-srm.yaml"
    _edit(srm, "  - to: his-scheduling\n    when: {action: create", "  - to: his-schedulng\n    when: {action: create")
    problems = [p for p in _problems(channels, mappings) if "his-schedulng" in p]
    assert problems, "the unknown destination is not reported"
    assert all(re.match(rf"{re.escape(str(srm))}:46:\d+: outbound\[0\]\.to: ", p) for p in problems), problems


def test_agenda_list_with_a_state_that_does_not_exist_is_refused(tmp_path, capsys):
    """`koppel agenda list --state requestd` printed "no agenda entries" and exited 0, the empty
    answer the README promises a mistyped `--store` never gives; the states are a fixed set."""
    url = f"sqlite:///{tmp_path}/k.db"
    open_store(url).close()
    code = main(["agenda", "list", "--store", url, "--state", "requestd"])
    out, err = capsys.readouterr()
    assert code != 0 and "requestd" in out + err, (code, out, err)


def test_a_route_that_maps_a_type_its_mapping_does_not_declare_is_a_config_error(tmp_path):
    """A new channel's route `{when: {types: [ORU^R01]}, map: zorgdomein-srm}` (the wrong mapping
    picked from the list) passed `koppel check`, although the mapping says `types: [SRM^S01,
    SRM^S04]`; every letter on that channel then became a mapping error at run time
    (`action (MSH-9.2): value not in table`), AE on an `ack: on-map` channel."""
    channels, mappings = _bundled(tmp_path)
    (channels / "derm-in.yaml").write_text(
        "name: derm-in\nsource:\n  listen: tcp:0:interface=127.0.0.1\n"
        "accept:\n  types: [SRM^S01, ORU^R01]\n"
        "routes:\n"
        "  - when: {types: [SRM^S01]}\n    map: zorgdomein-srm\n"
        "  - when: {types: [ORU^R01]}\n    map: zorgdomein-srm\n")
    problems = _problems(channels, mappings)
    assert any(re.match(rf"{re.escape(str(channels / 'derm-in.yaml'))}:(9|10):\d+: routes\[1\]\.", p)
               and "ORU^R01" in p for p in problems), problems
