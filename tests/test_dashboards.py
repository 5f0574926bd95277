"""The Grafana dashboard and the Prometheus alert rules in ``ops/dashboards`` use only metrics and
labels that a real worker exports, and have the shape Grafana and Prometheus load.

Every ``ndo_*`` metric is registered when ``WorkerMetrics`` is built (``service/_metrics.py``), in
every mode, so the registry knows every metric name and type from the start. A labelled metric
shows its label names only once it has recorded a sample, so the label check runs on the registry
of a real worker (replicated storage, leases, journal) after traffic that records a sample of
each labelled metric the files group or filter by. Prometheus adds ``instance`` and ``job`` to
every series it scrapes; those two are accepted on any metric.

PyYAML is not a dependency: the rules file is read by ``read_yaml`` below, a strict reader of the
small YAML subset the file is written in; anything outside it fails with its line number.
"""

from __future__ import annotations

import ast
import json
import re
import time
from collections.abc import Iterator
from difflib import get_close_matches
from functools import cache
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client as NatsClient
from prometheus_client import CollectorRegistry

from ndo.actors import ActorClient, ConflictError
from ndo.examples import Counter
from ndo.service import WorkerMetrics
from tests.helpers import eventually
from tests.objects import Faulty, Flusher, Relay, Reminder
from tests.worker_fixtures import WorkerFactory

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "ops" / "dashboards"
GRAFANA = DASHBOARDS / "ndo-grafana.json"
ALERTS = DASHBOARDS / "ndo-alerts.yml"

TARGET_LABELS = frozenset({"instance", "job"})
"""Labels Prometheus attaches to every scraped series (not exported by the worker)."""
PANEL_UNITS = frozenset({"reqps", "ops", "s", "short", "percentunit"})
SEVERITIES = frozenset({"critical", "warning", "info"})
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}

Exported = dict[str, frozenset[str] | None]
"""Sample name → the label names seen on its samples; None when the metric is registered but
has recorded no sample yet (its labels are unknown)."""

_SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum")}
_METRIC = re.compile(r"\bndo_[a-z0-9_]+\b")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_SELECTOR = re.compile(r"\b(ndo_[a-z0-9_]+)\s*\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([A-Za-z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*(?:,|$)')
_GROUPING = re.compile(r"\b(by|without|on|ignoring)\s*\(([^)]*)\)")
_LABEL_VALUES = re.compile(r"\blabel_values\(\s*(ndo_[a-z0-9_]+)\s*,\s*([A-Za-z_]\w*)\s*\)")
_SIMPLE_VALUE = re.compile(r"[a-z0-9_]+")


def exported_series(registry: CollectorRegistry) -> Exported:
    """The sample names ``registry`` exports, with their label names (see ``Exported``)."""
    names: dict[str, frozenset[str] | None] = {}
    for family in registry.collect():
        for suffix in _SUFFIXES[family.type]:
            names.setdefault(family.name + suffix, None)
        for sample in family.samples:
            names[sample.name] = (names.get(sample.name) or frozenset()) | set(sample.labels)
    return names


@cache
def code_strings() -> frozenset[str]:
    """Every string constant in ndo's runtime code: where label values (outcomes, reasons,
    changes) come from."""
    strings: set[str] = set()
    for package in ("service", "actors", "storage"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Constant) and isinstance(node.value, str):
                    strings.add(node.value)
    return frozenset(strings)


def _group_after(text: str, start: int) -> str | None:
    """The parenthesised group that starts at ``text[start:]`` (after blanks), or None."""
    i = start
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "(":
        return None
    depth = 0
    for j in range(i, len(text)):
        depth += {"(": 1, ")": -1}.get(text[j], 0)
        if depth == 0:
            return text[i : j + 1]
    return None


def _label_problems(label: str, metrics: list[str], exported: Exported) -> Iterator[str]:
    """Why ``label`` is not a label of each of ``metrics`` (known metrics only)."""
    if label in TARGET_LABELS:
        return
    for metric in dict.fromkeys(metrics):
        if metric not in exported:
            continue  # reported as an unknown metric
        labels = exported[metric]
        if labels is None:
            yield (
                f"{metric} recorded no sample in this test, so its labels are unknown: make the "
                "worker in test_every_metric_and_label_is_exported record one"
            )
        elif label not in labels:
            yield f"{label!r} is not a label of {metric} (its labels: {sorted(labels)})"


def check_expr(expr: str, exported: Exported) -> list[str]:
    """What is wrong in the PromQL ``expr``: unknown ``ndo_*`` metrics, labels the metric does
    not have, label values that appear nowhere in ndo's code, postfix ``sum(...) by (...)``."""
    problems: list[str] = []
    bare = _STRING.sub('""', expr)  # no metric names or keywords inside label values
    metrics = _METRIC.findall(bare)
    for metric in dict.fromkeys(metrics):
        if metric not in exported:
            names = [name for name in exported if not name.endswith("_created")]
            near = get_close_matches(metric, names, n=2)
            problems.append(f"{metric} is not exported by the worker (close: {near})")
    for match in _SELECTOR.finditer(expr):
        metric, body = match.groups()
        matchers = list(_MATCHER.finditer(body))
        if "".join(m.group(0) for m in matchers) != body:
            problems.append(f"cannot read the selector {match.group(0)!r}")
        for label, op, value in (m.groups() for m in matchers):
            problems.extend(_label_problems(label, [metric], exported))
            if label in TARGET_LABELS or "$" in value:
                continue  # a target label, or a Grafana variable
            alternatives = value.split("|") if op in ("=~", "!~") else [value]
            for alternative in alternatives:
                if _SIMPLE_VALUE.fullmatch(alternative) and alternative not in code_strings():
                    problems.append(
                        f"{metric}{{{label}{op}...}}: the value {alternative!r} appears nowhere "
                        "in ndo's code (service/, actors/, storage/); a typo?"
                    )
    for match in _GROUPING.finditer(bare):
        keyword, labels = match.groups()
        scope = bare
        if keyword in ("by", "without"):
            group = _group_after(bare, match.end())
            if group is None:
                problems.append(
                    f"write '{keyword} (...)' before the aggregated expression "
                    f"(sum {keyword} (labels) (expr)): {match.group(0)!r}"
                )
                continue
            scope = group
        for label in (part.strip() for part in labels.split(",") if part.strip()):
            problems.extend(_label_problems(label, _METRIC.findall(scope), exported))
    for match in _LABEL_VALUES.finditer(bare):
        problems.extend(_label_problems(match.group(2), [match.group(1)], exported))
    return problems


# The dashboard


def load_dashboard() -> dict[str, Any]:
    """The Grafana dashboard, parsed."""
    dashboard: dict[str, Any] = json.loads(GRAFANA.read_text(encoding="utf-8"))
    return dashboard


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def dashboard_queries(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and every query variable."""
    queries = [
        (f"panel {panel['id']} {panel['title']!r} {target['refId']}", target["expr"])
        for panel in all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            queries.append((f"variable {variable['name']}", query))
            queries.append((f"variable {variable['name']} definition", variable["definition"]))
    return queries


# The rules file: a strict reader of a small YAML subset


class YamlSubsetError(ValueError):
    """The text is outside the YAML subset ``read_yaml`` reads."""


_KEY = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):(?: (.*))?$")
_BLOCK_STYLES = ("|", "|-", ">", ">-")
_PLAIN_FIRST = frozenset("-?:,[]{}#&*!|>'\"%@`")
_TYPED = re.compile(r"(?i)(true|false|yes|no|on|off|null|~|[-+]?[0-9][0-9_.eE+-]*)")


def read_yaml(text: str) -> Any:
    """Read ``text``, written as block mappings (``key: value``) and block sequences (``- ``),
    indented by spaces, with plain one-line string scalars (no ``: `` or `` #`` inside, no
    leading indicator, nothing YAML would read as a number, boolean or null) and ``|``, ``|-``,
    ``>``, ``>-`` block scalars; full-line comments and blank lines are skipped. Every scalar is
    a string.

    Raises:
        YamlSubsetError: ``text`` uses anything else (with the line number).
    """
    return _YamlReader(text).document()


class _YamlReader:
    """``read_yaml``'s state: the lines and the position of the next one to read."""

    def __init__(self, text: str) -> None:
        self.lines = text.splitlines()
        self.pos = 0
        for number, line in enumerate(self.lines, 1):
            if line[: len(line) - len(line.lstrip(" \t"))].count("\t"):
                raise YamlSubsetError(f"line {number}: a tab in the indentation")

    def document(self) -> Any:
        if self._next() is None:
            raise YamlSubsetError("the file is empty")
        node = self._node(0)
        if self._next() is not None:
            raise YamlSubsetError(f"line {self.pos + 1}: unexpected indentation")
        return node

    def _next(self) -> tuple[int, str] | None:
        """(indent, text) of the next line that is not blank or a comment; skips to it."""
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            stripped = line.strip()
            if stripped and not stripped.startswith("#"):
                if stripped in ("---", "..."):
                    raise YamlSubsetError(f"line {self.pos + 1}: document markers")
                return len(line) - len(line.lstrip(" ")), stripped
            self.pos += 1
        return None

    def _node(self, indent: int) -> Any:
        following = self._next()
        assert following is not None
        if following[0] != indent:
            raise YamlSubsetError(f"line {self.pos + 1}: expected indentation {indent}")
        if following[1] == "-" or following[1].startswith("- "):
            return self._sequence(indent)
        return self._mapping(indent)

    def _sequence(self, indent: int) -> list[Any]:
        items: list[Any] = []
        while (following := self._next()) is not None and following[0] == indent:
            text = following[1]
            if not text.startswith("- "):
                raise YamlSubsetError(f"line {self.pos + 1}: expected '- ' (a sequence item)")
            # The item is a mapping whose first key sits on this line: read it as indented.
            self.lines[self.pos] = " " * (indent + 2) + text[2:].lstrip(" ")
            items.append(self._mapping(indent + 2))
        return items

    def _mapping(self, indent: int) -> dict[str, Any]:
        mapping: dict[str, Any] = {}
        while (following := self._next()) is not None and following[0] == indent:
            number = self.pos + 1
            match = _KEY.fullmatch(following[1])
            if match is None:
                raise YamlSubsetError(f"line {number}: expected 'key: value'")
            key, value = match.group(1), (match.group(2) or "").strip()
            if key in mapping:
                raise YamlSubsetError(f"line {number}: duplicate key {key!r}")
            self.pos += 1
            if not value:
                child = self._next()
                if child is None or child[0] <= indent:
                    raise YamlSubsetError(f"line {number}: {key!r} has no value")
                mapping[key] = self._node(child[0])
            elif value in _BLOCK_STYLES:
                mapping[key] = self._block(indent, value, number)
            else:
                mapping[key] = self._plain(value, number)
        return mapping

    def _block(self, indent: int, style: str, number: int) -> str:
        lines: list[str] = []
        while self.pos < len(self.lines):
            line = self.lines[self.pos]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            lines.append(line)
            self.pos += 1
        while lines and not lines[-1].strip():
            lines.pop()
        if not lines:
            raise YamlSubsetError(f"line {number}: an empty block scalar")
        margin = len(lines[0]) - len(lines[0].lstrip(" "))
        if any(line.strip() and len(line) - len(line.lstrip(" ")) < margin for line in lines):
            raise YamlSubsetError(f"line {number}: a block scalar less indented than its start")
        body = [line[margin:] for line in lines]
        if style.startswith("|"):
            text = "\n".join(body)
        else:
            if any(line.startswith(" ") for line in body) or "\n\n\n" in "\n".join(body):
                raise YamlSubsetError(f"line {number}: a folded scalar this reader cannot fold")
            text = "\n".join(" ".join(part.split("\n")) for part in "\n".join(body).split("\n\n"))
        return text if style.endswith("-") else text + "\n"

    @staticmethod
    def _plain(value: str, number: int) -> str:
        if (
            value[0] in _PLAIN_FIRST
            or ": " in value
            or " #" in value
            or value.endswith(":")
            or _TYPED.fullmatch(value)
        ):
            raise YamlSubsetError(
                f"line {number}: {value!r} is not a plain string scalar this reader takes; "
                "reword it or use a '>-' block"
            )
        return value


def load_rules() -> list[dict[str, Any]]:
    """Every rule of the alert rules file."""
    document = read_yaml(ALERTS.read_text(encoding="utf-8"))
    assert isinstance(document, dict) and set(document) == {"groups"}, "only 'groups:' at the top"
    rules: list[dict[str, Any]] = []
    for group in document["groups"]:
        assert set(group) == {"name", "rules"}, f"a group has name and rules: {sorted(group)}"
        rules.extend(group["rules"])
    return rules


# The real worker


@pytest.fixture(name="exported")
async def _exported(start_worker: WorkerFactory, client: ActorClient, nc: NatsClient) -> Exported:
    """The series of a running worker (replicated storage, leases, journal) after traffic that
    records a sample of each labelled metric the dashboard and the rules group or filter by."""
    worker = await start_worker(
        classes=[Counter, Faulty, Reminder, Relay, Flusher],
        storage="replicated",
        idle_timeout=0.5,
        scan_interval=0.05,
        alarm_initial_backoff=0.05,
    )

    def sample(name: str, **labels: str) -> float:
        return worker.metrics.registry.get_sample_value(name, labels) or 0.0

    await client.get(Relay, "relay").call(Relay.forward, to="counter")
    with pytest.raises(ConflictError):
        await client.get(Faulty, "faulty").call(Faulty.conflict)
    await client.get(Flusher, "flusher").call(Flusher.add, by=1)
    await client.get(Reminder, "reminder").call(Reminder.schedule, at=time.time(), fail_times=1)
    await eventually(lambda: sample("ndo_journal_records_total") > 0, timeout=10)
    await nc.jetstream().delete_stream("NDO_JOURNAL")
    await client.get(Counter, "counter").call(Counter.increment, by=1)
    await eventually(lambda: sample("ndo_journal_failures_total", reason="no_stream") > 0, 10)
    await eventually(lambda: sample("ndo_alarms_total", class_name="Reminder", outcome="ok") > 0)
    await eventually(lambda: sample("ndo_on_stop_total", class_name="Flusher", outcome="ok") > 0)
    assert sample("ndo_alarms_total", class_name="Reminder", outcome="retry") == 1
    assert sample("ndo_partition_moves_total", change="acquired") > 0
    assert sample("ndo_log_appends_total", outcome="ok") > 0
    return exported_series(worker.metrics.registry)


class TestMetricsAreExported:
    """Every ndo_* metric, label and label value the dashboard and the alert rules use is one a
    real worker exports."""

    async def test_every_metric_and_label_is_exported(self, exported: Exported) -> None:
        """The PromQL of every panel, variable and rule names exported metrics and their labels."""
        queries = dashboard_queries(load_dashboard())
        rules = load_rules()
        assert len(queries) >= 20 and len(rules) >= 10, "expressions went missing"
        queries += [(f"alert {rule['alert']}", rule["expr"]) for rule in rules]
        problems = [f"{where}: {p}" for where, expr in queries for p in check_expr(expr, exported)]
        assert not problems, "\n".join(problems)
        used = {name for _, expr in queries for name in _METRIC.findall(expr)}
        assert len(used) >= 20

    def test_the_dashboard_shows_every_metric(self) -> None:
        """Each metric the worker registers appears in at least one panel (a new metric gets a
        panel, or is named here as one on purpose left out)."""
        shown = set(_METRIC.findall("\n".join(e for _, e in dashboard_queries(load_dashboard()))))
        missing = sorted(
            family.name
            for family in WorkerMetrics(CollectorRegistry()).registry.collect()
            if not shown & {family.name + suffix for suffix in _SUFFIXES[family.type]}
        )
        assert missing == [], f"add a panel for these to {GRAFANA.relative_to(ROOT)}"


class TestDashboardShape:
    """The dashboard is one Grafana (schemaVersion 39) imports: a Prometheus datasource
    variable, a class_name variable, panels with unique ids, units and targets."""

    def test_dashboard(self) -> None:
        """Title, uid, variables, and every panel's id, type, place, datasource and targets."""
        dashboard = load_dashboard()
        assert dashboard["title"] and dashboard["uid"]
        assert dashboard["schemaVersion"] >= 36
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        class_name = variables["class_name"]
        assert class_name["type"] == "query" and class_name["datasource"] == DATASOURCE
        assert class_name["definition"] == "label_values(ndo_requests_total, class_name)"
        panels = list(all_panels(dashboard["panels"]))
        ids = [panel["id"] for panel in panels]
        assert len(ids) == len(set(ids)) and all(isinstance(i, int) for i in ids)
        cells: set[tuple[int, int]] = set()
        for panel in panels:
            where = f"panel {panel['id']} {panel.get('title')!r}"
            place = panel["gridPos"]
            assert place["x"] + place["w"] <= 24, where
            area = {
                (x, y)
                for x in range(place["x"], place["x"] + place["w"])
                for y in range(place["y"], place["y"] + place["h"])
            }
            assert not cells & area, f"{where} overlaps another panel"
            cells |= area
            if panel["type"] == "row":
                continue
            assert panel["type"] in ("timeseries", "stat"), where
            assert panel["title"] and panel["description"], where
            assert panel["datasource"] == DATASOURCE, where
            assert panel["fieldConfig"]["defaults"]["unit"] in PANEL_UNITS, where
            assert panel["targets"], where
            ref_ids = [target["refId"] for target in panel["targets"]]
            assert len(ref_ids) == len(set(ref_ids)), where
            for target in panel["targets"]:
                assert target["datasource"] == DATASOURCE, where
                assert isinstance(target["expr"], str) and target["expr"].strip(), where
        assert sum(panel["type"] != "row" for panel in panels) >= 20


class TestAlertRulesShape:
    """Every alert rule has what Prometheus needs and what the on-call person reads."""

    def test_rules(self) -> None:
        """alert, expr, for, labels.severity and annotations summary and description."""
        rules = load_rules()
        names = [rule.get("alert") for rule in rules]
        assert len(names) == len(set(names)), "alert names repeat"
        for rule in rules:
            where = f"alert {rule.get('alert')}"
            assert set(rule) == {"alert", "expr", "for", "labels", "annotations"}, where
            assert re.fullmatch(r"Ndo[A-Za-z]+", rule["alert"]), where
            assert rule["expr"].strip(), where
            assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), where
            assert set(rule["labels"]) == {"severity"}, where
            assert rule["labels"]["severity"] in SEVERITIES, where
            assert set(rule["annotations"]) == {"summary", "description"}, where
            assert rule["annotations"]["summary"].strip(), where
            assert rule["annotations"]["description"].strip(), where


class TestChecks:
    """The checks above catch the mistakes they exist for."""

    @pytest.fixture(name="recorded")
    def _recorded(self) -> Exported:
        metrics = WorkerMetrics(CollectorRegistry())
        metrics.requests.inc(("Counter", "increment", "ok"))
        metrics.request_seconds.observe(("Counter", "increment"), 0.001)
        return exported_series(metrics.registry)

    def test_a_correct_expression_passes(self, recorded: Exported) -> None:
        """Known metrics, labels (scrape labels too) and values: no problem."""
        expr = (
            "histogram_quantile(0.99, sum by (class_name, le, instance) (rate("
            'ndo_request_duration_seconds_bucket{class_name=~"$class_name"}[5m]))) > 1'
            ' and on() sum(rate(ndo_requests_total{outcome=~"overloaded|moving"}[5m])) > 0'
        )
        assert check_expr(expr, recorded) == []
        assert check_expr("label_values(ndo_requests_total, class_name)", recorded) == []

    @pytest.mark.parametrize(
        ("expr", "problem"),
        [
            ("sum(rate(ndo_request_total[5m]))", "ndo_request_total is not exported"),
            ("sum by (class) (rate(ndo_requests_total[5m]))", "'class' is not a label"),
            ('ndo_requests_total{outcom="ok"}', "'outcom' is not a label"),
            ('ndo_requests_total{outcome="overloded"}', "'overloded' appears nowhere"),
            ("sum(rate(ndo_requests_total[5m])) by (outcome)", "write 'by (...)' before"),
            ('ndo_alarms_total{outcome="ok"}', "recorded no sample"),
            ("label_values(ndo_requests_total, klass)", "'klass' is not a label"),
            ("sum by (le) (rate(ndo_requests_total[5m]))", "'le' is not a label"),
        ],
    )
    def test_a_mistake_is_reported(self, recorded: Exported, expr: str, problem: str) -> None:
        """A misspelled metric, label or value, or an unreadable form, is a problem."""
        problems = check_expr(expr, recorded)
        assert any(problem in p for p in problems), problems

    def test_the_yaml_reader_reads_the_subset(self) -> None:
        """Mappings, sequences, plain and block scalars, as YAML reads them."""
        text = (
            "# comment\ngroups:\n  - name: a\n    rules:\n      - alert: X\n"
            "        expr: |-\n          up == 0\n            or vector(1)\n"
            "        text: >-\n          one\n          two\n\n          three\n"
        )
        assert read_yaml(text) == {
            "groups": [
                {
                    "name": "a",
                    "rules": [
                        {"alert": "X", "expr": "up == 0\n  or vector(1)", "text": "one two\nthree"}
                    ],
                }
            ]
        }

    @pytest.mark.parametrize(
        "text",
        [
            "a: b: c\n",
            'a: "quoted"\n',
            "a: 5\n",
            "a: x # comment\n",
            "a:\n\tb: c\n",
            "a: x\na: y\n",
            "a: {b: c}\n",
            "a:\n  b: c\n c: d\n",
            "---\na: b\n",
        ],
    )
    def test_the_yaml_reader_refuses_the_rest(self, text: str) -> None:
        """Anything outside the subset is refused rather than read differently from YAML."""
        with pytest.raises(YamlSubsetError):
            read_yaml(text)
