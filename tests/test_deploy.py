"""deploy/: alert rules, Grafana dashboard, systemd unit, container file, IPsec example, runbook.

The metric names in the rules and the dashboard are checked against a live scrape of
engine.metrics.Metrics (prometheus_client's own exposition), so a renamed or misspelled
metric fails here rather than as a silent, never-firing alert or an empty panel. Where
promtool is installed (Debian package `prometheus`) the rules, the scrape config, the
dashboard's queries and a few alert scenarios are also checked by Prometheus itself.
"""

from __future__ import annotations

import ipaddress
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
RULES = DEPLOY / "prometheus" / "koppel-rules.yml"
SCRAPE = DEPLOY / "prometheus" / "prometheus.yml"
DASHBOARD = DEPLOY / "grafana" / "koppel-dashboard.json"
UNIT = DEPLOY / "systemd" / "koppel.service"
ENV_FILE = DEPLOY / "systemd" / "koppel.env"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
SWANCTL = DEPLOY / "ipsec" / "swanctl.conf"
RUNBOOK = DEPLOY / "RUNBOOK.md"

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")

# Labels Prometheus adds to every scraped series, and the histogram bucket label.
TARGET_LABELS = {"job", "instance", "le"}


# -- the live scrape ---------------------------------------------------------------------------

def _scrape() -> tuple[str, object]:
    from prometheus_client import generate_latest
    from prometheus_client.metrics import MetricWrapperBase

    from engine.metrics import Metrics

    m = Metrics()
    # A short scripted flow with realistic labels ...
    m.received.labels("zorgdomein-in", "SRM^S01", "accepted").inc()
    m.received.labels("zorgdomein-in", "other", "rejected").inc()
    m.received_bytes.labels("zorgdomein-in").inc(2600)
    m.acks_sent.labels("zorgdomein-in", "AA").inc()
    m.acks_sent.labels("zorgdomein-in", "AR").inc()
    m.listener_up.labels("zorgdomein-in").set(1)
    m.ack_latency.labels("zorgdomein-in").observe(0.002)
    m.store_commit.observe(0.001)
    m.store_batch.observe(4)
    m.queue_depth.labels("127.0.0.1:6661").set(3)
    m.queue_oldest_age_seconds.labels("127.0.0.1:6661").set(12.5)
    m.destination_connected.labels("127.0.0.1:6661").set(1)
    m.delivery_sent_total.labels("his-scheduling").inc()
    m.delivery_acks_total.labels("his-scheduling", "AA").inc()
    m.delivery_latency_seconds.labels("his-scheduling").observe(0.05)
    m.mapping_outcomes_total.labels("zorgdomein-in", "zorgdomein-srm", "ok").inc()
    m.agenda_entries.labels("cardiologie", "requested").set(1)
    # ... and every other labelled family touched once, so that each one the engine defines
    # (today's and any added later) shows up in the exposition.
    for value in vars(m).values():
        if isinstance(value, MetricWrapperBase) and getattr(value, "_labelnames", ()):
            value.labels(*["x"] * len(value._labelnames))
    for family in m.registry.collect():
        assert family.samples, f"{family.name} exports no sample even after touching its labels"
    return generate_latest(m.registry).decode("utf-8"), m.registry


@pytest.fixture(scope="module")
def exported() -> dict[str, set[str]]:
    """Sample name -> label names, exactly as /metrics exports them."""
    from prometheus_client.parser import text_string_to_metric_families

    text, _ = _scrape()
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    # Cross-check the parser against the raw lines.
    raw = {re.match(r"[a-zA-Z_:][a-zA-Z0-9_:]*", line).group(0)
           for line in text.splitlines() if line and not line.startswith("#")}
    assert raw == set(names)
    return names


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"' + r"|'(?:[^'\\]|\\.)*'")
_METRIC = re.compile(r"\bkoppel_[a-z0-9_]+")
_SELECTOR = re.compile(r"\b(koppel_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def metric_names(expr: str) -> set[str]:
    """koppel_* identifiers in a PromQL expression (string literals are not names)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


def problems(expr: str, exported: dict[str, set[str]]) -> list[str]:
    """Names the scrape lacks, and label names no metric in the expression carries."""
    found = []
    names = metric_names(expr)
    for name in sorted(names - set(exported)):
        found.append(f"metric {name} is not exported")
    # Matchers inside {...} must name labels of that very metric (string bodies kept here).
    for name, body in _SELECTOR.findall(expr):
        if name in exported:
            for label in _MATCHER.findall(_STRING.sub('""', body)):
                if label not in exported[name] | TARGET_LABELS:
                    found.append(f"{name} has no label {label!r}")
    # by/on/... label lists must name labels of at least one metric in the expression.
    known = set(TARGET_LABELS)
    for name in names & set(exported):
        known |= exported[name]
    for group in _GROUPING.findall(_STRING.sub('""', expr)):
        for label in filter(None, (part.strip() for part in group.split(","))):
            if label not in known:
                found.append(f"grouping label {label!r} is on none of {sorted(names)}")
    return found


def test_the_name_check_can_fail(exported):
    # The family name of a histogram or counter is not a series: only the suffixed forms are.
    assert problems("rate(koppel_ack_latency_seconds_bucket[5m])", exported) == []
    assert problems("rate(koppel_ack_latency_seconds[5m])", exported) == [
        "metric koppel_ack_latency_seconds is not exported"]
    assert problems("koppel_received_messages", exported) == ["metric koppel_received_messages is not exported"]
    assert problems('koppel_queue_depth{destination="x"}', exported) == ["koppel_queue_depth has no label 'destination'"]
    assert problems("sum by (queue) (koppel_dead_letters_total)", exported) == [
        "grouping label 'queue' is on none of ['koppel_dead_letters_total']"]
    # Names inside string literals (label values) are not metric names.
    assert metric_names('up{job="koppel_x"}') == set()
    assert "koppel_build_info" in exported and "koppel_store_errors_total" in exported


# -- (1) alert rules ---------------------------------------------------------------------------

def _rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    assert isinstance(doc, dict) and set(doc) == {"groups"}
    rules = []
    for group in doc["groups"]:
        assert isinstance(group.get("name"), str) and group["name"]
        assert isinstance(group.get("rules"), list) and group["rules"]
        rules.extend(group["rules"])
    return rules


def test_rules_have_the_prometheus_rule_group_shape():
    rules = _rules()
    names = [rule.get("alert") for rule in rules]
    assert len(names) == len(set(names)), "alert names must be unique"
    for rule in rules:
        name = rule.get("alert")
        assert isinstance(name, str) and re.fullmatch(r"[A-Z][A-Za-z0-9]+", name), rule
        assert isinstance(rule.get("expr"), str) and rule["expr"].strip(), name
        assert re.fullmatch(r"(\d+(ms|s|m|h|d|w|y))+", str(rule.get("for", ""))), f"{name}: for"
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook_url"):
            assert isinstance(annotations.get(key), str) and annotations[key].strip(), f"{name}: {key}"
        assert set(rule) <= {"alert", "expr", "for", "labels", "annotations", "keep_firing_for"}, name


def test_rules_use_only_exported_metrics_and_labels(exported):
    for rule in _rules():
        assert problems(rule["expr"], exported) == [], rule["alert"]


def test_rules_cover_the_incidents_the_issue_names(exported):
    used = set()
    for rule in _rules():
        used |= metric_names(rule["expr"])
    for name in ("koppel_listener_up", "koppel_received_messages_total", "koppel_queue_depth",
                 "koppel_queue_oldest_age_seconds", "koppel_dead_letters_total", "koppel_store_errors_total",
                 "koppel_acks_sent_total", "koppel_delivery_acks_total", "koppel_destination_connected",
                 "koppel_mapping_outcomes_total", "koppel_agenda_fallback_total"):
        assert name in used, f"no alert on {name}"
    by_name = {rule["alert"]: rule for rule in _rules()}
    silent = by_name["KoppelFeedSilent"]
    assert "== 0" in silent["expr"] and silent["for"] != "0m"
    nak = by_name["KoppelInboundNakRate"]["expr"]
    assert 'code!="AA"' in nak and 'code!="CA"' in nak
    assert 'outcome="error"' in by_name["KoppelMappingErrors"]["expr"]


@needs_promtool
def test_promtool_check_rules_and_config():
    for args in (["check", "rules", str(RULES)], ["check", "config", str(SCRAPE)]):
        done = subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr


def _render(template: str, labels: dict[str, str], value: str | None = None) -> str:
    """Expand {{ $labels.x }} (and, given as text, {{ $value ... }}) as Prometheus does."""
    text = re.sub(r"\{\{\s*\$labels\.(\w+)\s*\}\}", lambda m: labels[m.group(1)], template)
    if value is not None:
        text = re.sub(r"\{\{\s*\$value[^}]*\}\}", value, text)
    assert "{{" not in text, text
    return text


def _expect(alert: str, **labels: str) -> dict:
    rule = {r["alert"]: r for r in _rules()}[alert]
    labels = {"job": "koppel", "instance": "k:9464", **labels}
    return {"exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": {k: _render(v, labels) for k, v in rule["annotations"].items()}}


def _expect_split(alert: str, **labels: str) -> dict:
    """An alert aggregated over a split engine's processes: job and its own labels, no instance."""
    rule = {r["alert"]: r for r in _rules()}[alert]
    labels = {"job": "koppel", **labels}
    return {"exp_labels": {**labels, **rule["labels"]},
            "exp_annotations": {k: _render(v, labels, value="25m 0s") for k, v in rule["annotations"].items()}}


def _promtool_scenarios() -> dict:
    k = 'job="koppel",instance="k:9464"'
    return {
        "rule_files": [str(RULES)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {"series": f'koppel_listener_up{{{k},channel="zorgdomein-in"}}', "values": "1x5 0x10"},
                    # The first dead letter after a restart: the series appears with value 1.
                    {"series": f'koppel_dead_letters_total{{{k},destination="his-scheduling"}}', "values": "_x10 1x10"},
                    {"series": f"koppel_store_errors_total{{{k}}}", "values": "0x20"},
                    {"series": f'koppel_queue_oldest_age_seconds{{{k},queue="127.0.0.1:6661"}}',
                     "values": "0+60x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "KoppelListenerDown", "exp_alerts": []},
                    {"eval_time": "10m", "alertname": "KoppelListenerDown",
                     "exp_alerts": [_expect("KoppelListenerDown", channel="zorgdomein-in")]},
                    {"eval_time": "12m", "alertname": "KoppelDeadLetters",
                     "exp_alerts": [_expect("KoppelDeadLetters", destination="his-scheduling")]},
                    {"eval_time": "9m", "alertname": "KoppelDeadLetters", "exp_alerts": []},
                    {"eval_time": "12m", "alertname": "KoppelStoreErrors", "exp_alerts": []},
                    {"eval_time": "12m", "alertname": "KoppelQueueOldestAgeHigh", "exp_alerts": []},
                ],
            },
            {
                # A split engine: receiver and deliverer both export the queue's age; one alert.
                "interval": "1m",
                "input_series": [
                    {"series": f'koppel_queue_oldest_age_seconds{{job="koppel",instance="k:{port}",env="production",'
                               'queue="127.0.0.1:6661"}',
                     "values": "0+60x30"} for port in (9464, 9465)
                ],
                "alert_rule_test": [
                    {"eval_time": "25m", "alertname": "KoppelQueueOldestAgeHigh",
                     "exp_alerts": [_expect_split("KoppelQueueOldestAgeHigh", queue="127.0.0.1:6661",
                                                  env="production")]},  # labels other than instance kept
                ],
            },
            {
                # A week of 2 frames a minute, then silence: quiet at once, alert after 30m + 15m.
                "interval": "10m",
                "input_series": [
                    {"series": f'koppel_listener_up{{{k},channel="zorgdomein-in"}}', "values": "1x1020"},
                    {"series": f'koppel_received_messages_total{{{k},channel="zorgdomein-in",type="SRM^S01",'
                               'outcome="accepted"}', "values": "0+20x1008 20160x12"},
                ],
                "alert_rule_test": [
                    {"eval_time": "7d", "alertname": "KoppelFeedSilent", "exp_alerts": []},
                    {"eval_time": "7d20m", "alertname": "KoppelFeedSilent", "exp_alerts": []},
                    {"eval_time": "7d2h", "alertname": "KoppelFeedSilent",
                     "exp_alerts": [_expect("KoppelFeedSilent", channel="zorgdomein-in")]},
                ],
            },
            {
                # Quiet last week too (night, weekend): no alert however long it stays quiet.
                "interval": "10m",
                "input_series": [
                    {"series": f'koppel_listener_up{{{k},channel="scheduler-in"}}', "values": "1x1020"},
                ],
                "alert_rule_test": [
                    {"eval_time": "7d2h", "alertname": "KoppelFeedSilent", "exp_alerts": []},
                ],
            },
        ],
    }


@needs_promtool
def test_promtool_alert_scenarios(tmp_path):
    tests = tmp_path / "koppel-rules.test.yml"
    tests.write_text(yaml.safe_dump(_promtool_scenarios(), sort_keys=False))
    done = subprocess.run([PROMTOOL, "test", "rules", str(tests)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_scrape_config_matches_the_rules():
    doc = yaml.safe_load(SCRAPE.read_text())
    assert "koppel-rules.yml" in doc["rule_files"] and (SCRAPE.parent / "koppel-rules.yml").exists()
    jobs = {job["job_name"]: job for job in doc["scrape_configs"]}
    assert jobs["koppel"].get("metrics_path", "/metrics") == "/metrics"
    assert 'job="koppel"' in RULES.read_text()  # KoppelDown's up{job="koppel"}


# -- (5) runbook anchors ---------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _runbook_anchors() -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*$", RUNBOOK.read_text(), re.M)}


def test_every_runbook_url_points_at_a_runbook_heading():
    anchors = _runbook_anchors()
    text = RUNBOOK.read_text()
    for rule in _rules():
        url = urlparse(rule["annotations"]["runbook_url"])
        assert url.scheme == "https" and url.path.endswith("/deploy/RUNBOOK.md"), rule["alert"]
        assert url.fragment in anchors, f"{rule['alert']}: no heading for #{url.fragment}"
        assert f"`{rule['alert']}`" in text, f"the runbook does not mention {rule['alert']}"
    # Links inside the runbook resolve too.
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, target


def test_runbook_has_six_incidents_with_symptoms_checks_fixes():
    sections = re.split(r"^## ", RUNBOOK.read_text(), flags=re.M)
    incidents = [s for s in sections if re.match(r"\d\. ", s)]
    assert len(incidents) == 6
    for section in incidents:
        for part in ("**Symptoms.**", "**Checks.**", "**Fixes.**"):
            assert part in section, (section.splitlines()[0], part)
        assert "koppel " in section


def test_runbook_commands_parse_with_the_real_cli():
    """Every `koppel ...` command shown in the runbook is accepted by the koppel parser."""
    from engine.cli import _parser

    parser = _parser()
    text = RUNBOOK.read_text()
    commands = set(re.findall(r"`(koppel (?!queue list`)[a-z-]+[^`]*)`", text))
    commands |= set(re.findall(r"`(koppel queue list[^`]*)`", text))
    assert len(commands) >= 15
    values = {"$S": "--store sqlite:///var/lib/koppel/koppel.db", "$C": "--channels /etc/koppel/channels"}
    for command in sorted(commands):
        line = command
        for key, value in values.items():
            line = line.replace(key, value)
        line = re.sub(r"<[^>]+>", "1", line)  # placeholders: ids, names
        argv = shlex.split(line)[1:]
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"runbook command does not parse: {command}")


# -- (2) Grafana dashboard ----------------------------------------------------------------------

def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _panels(dashboard: dict):
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def _queries(dashboard: dict) -> list[tuple[str, str]]:
    found = []
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            found.append((f"variable {var['name']}", query))
    return found


def test_dashboard_shape_and_datasource_variable():
    dashboard = _dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["DS_PROMETHEUS"]["query"] == "prometheus"
    ids = [panel["id"] for panel in _panels(dashboard)]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${DS_PROMETHEUS}"}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def test_dashboard_queries_use_only_exported_metrics(exported):
    queries = _queries(_dashboard())
    assert len(queries) > 30
    for title, expr in queries:
        assert metric_names(expr), f"{title}: no koppel metric in {expr}"
        assert problems(expr, exported) == [], f"{title}: {expr}"


def test_dashboard_shows_what_on_call_needs():
    used = set()
    for _, expr in _queries(_dashboard()):
        used |= metric_names(expr)
    for name in ("koppel_received_messages_total", "koppel_acks_sent_total", "koppel_connections_open",
                 "koppel_ack_latency_seconds_bucket", "koppel_store_commit_seconds_bucket",
                 "koppel_store_commit_batch_size_bucket", "koppel_queue_depth", "koppel_queue_oldest_age_seconds",
                 "koppel_delivery_sent_total", "koppel_delivery_acks_total", "koppel_delivery_retries_total",
                 "koppel_dead_letters_total", "koppel_delivery_latency_seconds_bucket",
                 "koppel_mapping_outcomes_total", "koppel_agenda_entries", "koppel_agenda_fallback_total"):
        assert name in used, f"no panel shows {name}"
    quantiles = [expr for _, expr in _queries(_dashboard()) if "histogram_quantile" in expr]
    assert any("0.99" in q and "koppel_ack_latency_seconds_bucket" in q for q in quantiles)
    assert any("0.5" in q and "koppel_ack_latency_seconds_bucket" in q for q in quantiles)


@needs_promtool
def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = []
    for i, (title, expr) in enumerate(_queries(_dashboard())):
        if expr.startswith("label_values("):
            expr = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr, re.S).group(1)
        expr = expr.replace("$__rate_interval", "5m")
        expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# -- (3) systemd unit -------------------------------------------------------------------------

def _unit() -> dict[str, dict[str, list[str]]]:
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            current = sections.setdefault(line.strip("[]"), {})
            continue
        key, _, value = line.partition("=")
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def _env(name: str | None = None) -> dict[str, str]:
    env = {}
    for line in (ENV_FILE if name is None else ENV_FILE.parent / name).read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def _expand(command: str, env: dict[str, str]) -> list[str]:
    argv = shlex.split(command)
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], arg) for arg in argv]


def test_systemd_unit_is_hardened():
    service = _unit()["Service"]

    def one(key):
        assert key in service, f"missing {key}"
        return service[key][-1]

    assert one("User") == "koppel" and one("Group") == "koppel"
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert "/var/lib/koppel" in one("ReadWritePaths").split()
    assert service["CapabilityBoundingSet"] == [""], "no capabilities (all ports are > 1024)"
    assert set(one("RestrictAddressFamilies").split()) == {"AF_INET", "AF_INET6", "AF_UNIX"}
    assert "@system-service" in service["SystemCallFilter"][0].split()
    assert one("Restart") == "on-failure"
    assert one("ExecReload") == "/bin/kill -HUP $MAINPID"
    assert service["EnvironmentFile"] == ["/etc/koppel/koppel.env", "-/etc/koppel/%N.env"]
    assert one("RuntimeDirectory") == "%N"  # holds the pid file koppel reload reads, per unit
    assert "--pid-file /run/%N/koppel.pid" in one("ExecStart")


def test_systemd_commands_use_real_options_and_stop_outlasts_the_drain():
    from engine.cli import _parser
    from engine.store.sqlite import parse_sqlite_url

    service = _unit()["Service"]
    env = _env()
    assert env["KOPPEL_LOG_LEVEL"] in {"debug", "info", "warning", "error"}
    run = _parser().parse_args(_expand(service["ExecStart"][-1], env)[1:])
    assert run.command == "run" and run.role == "all"
    for role in ("receive", "deliver"):  # the split units: koppel.env, then their own file
        split = _parser().parse_args(_expand(service["ExecStart"][-1], {**env, **_env(f"koppel-{role}.env")})[1:])
        assert split.role == role
    deliver = _env("koppel-deliver.env")
    assert {deliver["KOPPEL_METRICS"], deliver["KOPPEL_ADMIN"]}.isdisjoint({env["KOPPEL_METRICS"], env["KOPPEL_ADMIN"]})
    check = _parser().parse_args(_expand(service["ExecStartPre"][-1], env)[1:])
    assert check.command == "check" and check.channels == run.channels
    store = parse_sqlite_url(run.store).path
    assert str(store).startswith("/var/lib/koppel/"), "the store must be under ReadWritePaths"
    # Two stop phases (inbound ACKs, then outbound in-flight sends) of --drain-timeout each.
    assert float(service["TimeoutStopSec"][-1].rstrip("s")) > 3 * run.drain_timeout + 5  # three phases, then the commit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify():
    done = subprocess.run(["systemd-analyze", "verify", str(UNIT)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (done.stdout + done.stderr).splitlines()
                  if line.strip() and "is not executable" not in line]  # /opt/koppel is not installed here
    assert complaints == []


# -- (4) container file --------------------------------------------------------------------------

def _instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            found.append((word.upper(), rest.strip()))
    return found


def test_container_runs_as_non_root_with_a_readyz_healthcheck():
    instructions = _instructions()
    get = lambda word: [rest for w, rest in instructions if w == word]  # noqa: E731
    assert get("FROM") == ["python:3.11-slim"]
    users = get("USER")
    assert users and users[-1].split(":")[0] not in {"root", "0"}
    # USER comes before CMD, so the engine never runs as root.
    words = [w for w, _ in instructions]
    assert max(i for i, w in enumerate(words) if w == "USER") < words.index("CMD")
    [health] = get("HEALTHCHECK")
    assert "/readyz" in health and "urllib" in health and "curl" not in health
    assert get("VOLUME") == ["/var/lib/koppel"]
    for source in (s for rest in get("COPY") for s in rest.split()[:-1]):
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"


def test_container_cmd_parses_and_matches_ports_and_volume():
    from engine.cli import _parser
    from engine.store.sqlite import parse_sqlite_url

    instructions = dict(_instructions())
    argv = json.loads(instructions["CMD"])
    assert argv[:2] == ["koppel", "run"]
    run = _parser().parse_args(argv[1:])
    assert str(parse_sqlite_url(run.store).path).startswith("/var/lib/koppel/")
    metrics_port = re.match(r"tcp:(\d+)", run.metrics).group(1)
    assert f"127.0.0.1:{metrics_port}/readyz" in instructions["HEALTHCHECK"]
    exposed = set(instructions["EXPOSE"].split())
    assert metrics_port in exposed
    for channel in sorted((ROOT / "channels").glob("*.yaml")):
        listen = yaml.safe_load(channel.read_text())["source"]["listen"]
        assert re.match(r"tcp:(\d+)", listen).group(1) in exposed, f"{channel.name}: port not exposed"


# -- examples use documentation addresses only; the IPsec example binds the tunnel address ------

DOC_NETS = [ipaddress.ip_network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24",
                                             "127.0.0.0/8", "0.0.0.0/32")]


def test_deploy_files_use_only_documentation_or_loopback_addresses():
    files = [RULES, SCRAPE, DASHBOARD, UNIT, ENV_FILE, CONTAINERFILE, SWANCTL, RUNBOOK]
    seen = 0
    for path in files:
        for literal in re.findall(r"(?<![\d.])(\d{1,3}(?:\.\d{1,3}){3})(?:/(\d{1,2}))?(?![\d.])", path.read_text()):
            address, prefix = literal
            net = ipaddress.ip_network(f"{address}/{prefix or 32}", strict=False)
            assert any(net.subnet_of(doc) for doc in DOC_NETS), f"{path.name}: {address}"
            seen += 1
    assert seen > 10


def test_swanctl_example_is_ikev2_and_the_listener_binds_the_tunnel_address():
    text = SWANCTL.read_text()
    assert re.search(r"^\s*version\s*=\s*2\b", text, re.M)
    local_ts = ipaddress.ip_network(re.search(r"^\s*local_ts\s*=\s*(\S+)", text, re.M).group(1))
    remote_ts = ipaddress.ip_network(re.search(r"^\s*remote_ts\s*=\s*(\S+)", text, re.M).group(1))
    listen = re.search(r"listen:\s*tcp:2575:interface=(\S+)", text).group(1)
    assert ipaddress.ip_address(listen) in local_ts
    allow = re.search(r"allow:\s*\[([^\]]+)\]", text).group(1)
    assert [ipaddress.ip_network(a.strip()) for a in allow.split(",")] == [remote_ts]
    assert re.search(r"auth\s*=\s*psk", text) and re.search(r"#\s*auth\s*=\s*pubkey", text)
