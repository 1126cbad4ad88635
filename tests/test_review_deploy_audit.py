"""Review of what on-call deploys and watches (deploy/): defects tests/test_deploy.py does not catch.

tests/test_deploy.py checks that every metric and label name in the rules and the dashboard
exists. These tests go one step further, each one failing on the deploy files as they were
reviewed:

* an "any new event" alert (``increase(x[w]) > 0``, ``for: 0m``) on a counter series the
  engine does not export at 0 from its start never sees the first event: the series appears
  with value 1 and increase() has no earlier sample (KoppelDeadLetters has the extra branch for
  that, KoppelMappingErrors does not);
* the container's ``koppel run`` writes its default pid file under the WORKDIR, which its
  non-root USER cannot write: it exits 1 at once ("error: var: Permission denied");
* the stop-timeout guidance counts two --drain-timeout phases where the engine has three;
* a reload that fails (the running config kept, ``koppel_config_last_reload_successful`` 0)
  pages nobody: no rule looks at it.
"""

from __future__ import annotations

import inspect
import json
import re
import shutil
import socket
import subprocess
import urllib.request
from pathlib import PurePosixPath

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from sink import KoppelProcess, write_bundle, BUNDLE_DESTINATIONS
# (the deploy files, and the container file read, as tests/test_deploy.py has them)
from test_deploy import CONTAINERFILE, ENV_FILE, ROOT, RULES, UNIT, _instructions  # noqa: F401

PROMTOOL = shutil.which("promtool")


def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- (1) event alerts on counters whose series appear only with the first event ---------------

@pytest.fixture(scope="module")
def start_scrape(tmp_path_factory) -> list[tuple[str, dict[str, str]]]:
    """(sample name, labels) of a real `koppel run` on the bundled config, before any traffic:
    the series an alert can compare a first event with."""
    workdir = tmp_path_factory.mktemp("audit-engine")
    channels = write_bundle(workdir, {name: _free_port() for name in BUNDLE_DESTINATIONS})
    port = _free_port()
    engine = KoppelProcess(channels, f"sqlite:///{workdir}/var/koppel.db",
                           metrics=f"tcp:{port}:interface=127.0.0.1", args=("--pid-file", ""))
    try:
        engine.start(until="engine.started")
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        engine.terminate()
    return [(sample.name, dict(sample.labels))
            for family in text_string_to_metric_families(text) for sample in family.samples]


_INCREASE = re.compile(r"increase\(\s*(koppel_[a-z0-9_]+)\s*(\{[^}]*\})?\s*\[")
_EQUALS = re.compile(r'([a-zA-Z_]\w*)\s*=\s*"([^"]*)"')


def test_event_alerts_fire_on_the_first_event_after_a_start(start_scrape):
    """An alert meant to fire on any one event (`increase(x[w]) > 0`, for: 0m) must either
    watch a series the engine exports at 0 from its start, or also catch the series that
    appears (`x unless x offset w`), as KoppelDeadLetters does. KoppelMappingErrors does
    neither: koppel_mapping_outcomes_total{outcome="error"} appears with value 1 at the first
    mapping error, so a single failed referral after a (re)start never pages."""
    checked = []
    for rule in _rules():
        if str(rule.get("for", "0m")) not in {"0m", "0s"}:
            continue
        expr = rule["expr"]
        for name, selector in _INCREASE.findall(expr):
            wanted = dict(_EQUALS.findall(selector or ""))
            exported_at_start = any(
                sample == name and all(labels.get(k) == v for k, v in wanted.items())
                for sample, labels in start_scrape)
            # `... x ... unless ... x{...} offset w`, over as many lines as it takes
            unless = expr.find("unless", expr.find(name))
            appears_branch = unless > 0 and re.search(rf"\b{name}\s*(\{{[^}}]*\}})?\s*offset\b", expr[unless:])
            checked.append(rule["alert"])
            assert exported_at_start or appears_branch, (
                f"{rule['alert']}: {name}{selector or ''} is not exported at start, and the expression "
                "has no `unless ... offset` branch: the first event after a restart never fires it")
    assert {"KoppelDeadLetters", "KoppelStoreErrors", "KoppelFallbackAgendaUsed"} <= set(checked)


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_first_mapping_error_after_a_restart_fires(tmp_path):
    """The same, by Prometheus itself: the engine (re)started 10 minutes ago, mapping fine;
    then one message fails to map. KoppelMappingErrors must fire (today: no alert at all)."""
    k = 'job="koppel",instance="k:9464",channel="zorgdomein-in",mapping="zorgdomein-srm"'
    labels = {"job": "koppel", "instance": "k:9464", "channel": "zorgdomein-in", "mapping": "zorgdomein-srm"}
    rule = {r["alert"]: r for r in _rules()}["KoppelMappingErrors"]

    def render(template: str) -> str:  # {{ $labels.x }} and {{ $value | humanize }} (1 error)
        text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
        return re.sub(r"\{\{\s*\$value[^}]*\}\}", "1", text)
    scenario = {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [{
            "interval": "1m",
            "input_series": [
                {"series": f'koppel_mapping_outcomes_total{{{k},outcome="ok"}}', "values": "0+5x30"},
                {"series": f'koppel_mapping_outcomes_total{{{k},outcome="error"}}', "values": "_x10 1x20"},
            ],
            "alert_rule_test": [
                {"eval_time": "9m", "alertname": "KoppelMappingErrors", "exp_alerts": []},
                {"eval_time": "12m", "alertname": "KoppelMappingErrors", "exp_alerts": [{
                    "exp_labels": {**labels, **rule["labels"]},
                    "exp_annotations": {key: render(v) for key, v in rule["annotations"].items()}}]},
            ],
        }],
    }
    path = tmp_path / "first-mapping-error.test.yml"
    path.write_text(yaml.safe_dump(scenario, sort_keys=False))
    done = subprocess.run([PROMTOOL, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- (2) the container's pid file ---------------------------------------------------------------

def test_container_koppel_run_writes_only_where_its_user_may():
    """`koppel run` without --pid-file writes var/koppel.pid under its working directory. In the
    image that is WORKDIR /etc/koppel (root's), and USER koppel cannot create /etc/koppel/var:
    the engine exits 1 with "error: var: Permission denied" before it listens, so the container
    never becomes healthy. The pid file must be under a directory the user owns (the store
    volume) or switched off (--pid-file '')."""
    from engine.cli import _ROLE_DEFAULTS, _parser

    instructions = _instructions()
    cmd_at = max(i for i, (word, _) in enumerate(instructions) if word == "CMD")
    workdir = [rest for word, rest in instructions[:cmd_at] if word == "WORKDIR"][-1]
    user = [rest for word, rest in instructions[:cmd_at] if word == "USER"][-1].split(":")[0]
    # Directories that user owns: made with `install -d -o USER` (and so each VOLUME on them).
    owned = {PurePosixPath(p) for word, rest in instructions if word == "RUN"
             for p in re.findall(rf"install\s+-d\s+-o\s+{re.escape(user)}\b[^&]*?\s(/\S+)", rest)}
    assert owned, "no directory of the engine's user found in the Containerfile"
    run = _parser().parse_args(json.loads(instructions[cmd_at][1])[1:])
    pid_file = _ROLE_DEFAULTS[run.role][2] if run.pid_file is None else run.pid_file
    if not pid_file:
        return  # --pid-file '': nothing written
    path = PurePosixPath(workdir) / pid_file
    assert any(path.is_relative_to(d) for d in owned), (
        f"pid file {path} (WORKDIR {workdir}, --pid-file default {pid_file!r}) is not under a directory "
        f"{user} owns ({', '.join(map(str, sorted(owned)))}): koppel run exits 1, Permission denied")


# -- (3) how long a stop may take ---------------------------------------------------------------

def _stop_phases() -> int:
    """Phases of Engine.stopService each bounded by --drain-timeout."""
    from engine.shell.engine import Engine

    return inspect.getsource(Engine.stopService).count("_at_most_drain_timeout(")


def test_stop_timeout_guidance_counts_every_drain_phase():
    """The engine's stop has three phases of up to --drain-timeout each (listeners and their
    ACKs, the mapping of what was received, the senders' in-flight messages), then the commit.
    koppel.env, koppel.service and the Containerfile tell the operator to keep the stop timeout
    above *twice* the drain timeout (and speak of "two phases"): following that with e.g.
    KOPPEL_DRAIN_TIMEOUT=20 and TimeoutStopSec=45 gets the engine SIGKILLed mid-stop."""
    phases = _stop_phases()
    assert phases == 3, "stopService changed: revisit this test"
    wrong = []
    for path in (ENV_FILE, UNIT, CONTAINERFILE):
        comments = [line for line in path.read_text().splitlines() if line.lstrip().startswith("#")]
        for i, line in enumerate(comments):
            window = " ".join(comments[max(0, i - 1):i + 2]).lower()
            if ("drain" in window or "stopsec" in window or "stop-timeout" in window) and \
                    re.search(r"\b(twice|two phases|two stop phases)\b", line.lower()):
                wrong.append(f"{path.relative_to(ROOT)}: {line.strip()}")
    assert wrong == [], f"the stop has {phases} drain phases, not two:\n" + "\n".join(wrong)
    # and the shipped numbers hold for the default: phases x drain + the store's busy wait (5 s)
    env = dict(line.split("=", 1) for line in ENV_FILE.read_text().splitlines()
               if line.strip() and not line.lstrip().startswith("#"))
    stop = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines() if line.startswith("TimeoutStopSec=")]
    assert float(stop[-1].rstrip("s")) > phases * float(env["KOPPEL_DRAIN_TIMEOUT"]) + 5


# -- (4) a failed reload ------------------------------------------------------------------------

def test_a_failed_config_reload_is_alerted():
    """SIGHUP with a config that does not load keeps the old config and sets
    koppel_config_last_reload_successful 0 (and counts koppel_config_reloads_total{result="failed"});
    `systemctl reload` still exits 0. The runbook names the gauge, but no rule watches it, so a
    change the operator believes live (a new destination, an allow-list entry) silently is not."""
    from engine.metrics import Metrics

    assert Metrics().config_last_reload_successful._name == "koppel_config_last_reload_successful"
    watching = [rule["alert"] for rule in _rules()
                if "koppel_config_last_reload_successful" in rule["expr"]
                or re.search(r'koppel_config_reloads_total\{[^}]*result\s*=\s*"failed"', rule["expr"])]
    assert watching, "no alert rule on koppel_config_last_reload_successful / reloads_total{result=\"failed\"}"
