"""deploy/monitoring/: what `promtool check rules` and `promtool test rules`
(run by check-deploy.sh) cannot see.

* dashboard.json is a Grafana dashboard that can be imported: unique uid,
  panel ids and refIds, every panel on the ${datasource} variable, panels
  inside the 24-column grid and not overlapping, every $variable defined;
* every dashboard query is valid PromQL: they are written, with the Grafana
  variables replaced, as recording rules into a temporary file that
  `promtool check rules` parses;
* every metric name of the alerts and the dashboard is one that exists:
  halosync_* names are recorded somewhere in the Rust sources (the live
  check against a worker's /metrics is tests/monitoring.rs), rabbitmq_*
  names are in rabbitmq-metrics.txt (the plugin's documented names), and
  `up` is Prometheus' own;
* prometheus.yaml loads alerts.yaml and scrapes the job the alerts name.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from lib import DEPLOY, ROOT, Report, rel

MON = DEPLOY / "monitoring"
ALERTS = MON / "alerts.yaml"
DASHBOARD = MON / "dashboard.json"
PROMETHEUS = MON / "prometheus.yaml"
RABBITMQ_NAMES = MON / "rabbitmq-metrics.txt"

# Grafana's own variables (https://grafana.com/docs/grafana/latest/dashboards/variables/add-template-variables/#global-variables).
GRAFANA_BUILTINS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s"}
# What a Grafana variable becomes for the PromQL parse.
SUBSTITUTE = {"__rate_interval": "5m", "__interval": "1m", "__range": "1h", "__range_s": "3600",
              "__interval_ms": "60000"}

STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
NAME = re.compile(r"(?<![A-Za-z0-9_:])(halosync_[a-z0-9_]+|rabbitmq_[a-z0-9_]+|up)(?![A-Za-z0-9_:])")
VAR = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")
SOURCE_NAME = re.compile(r'"(halosync_[a-z0-9_]+)"')
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (string literals removed first,
    so label values such as queue=~"halosync\\..*" are not taken for names)."""
    return set(NAME.findall(STRING.sub('""', expr)))


def recorded_names() -> set[str]:
    """Every halosync_* metric name the Rust sources record."""
    names: set[str] = set()
    for top in ("shared", "workers"):
        for path in (ROOT / top).rglob("*.rs"):
            text = path.read_text(encoding="utf-8")
            for m in re.finditer(r"metrics::(counter|gauge|histogram)!\(\s*" + SOURCE_NAME.pattern, text):
                names.add(m.group(2))
    return names


def known(name: str, recorded: set[str], rabbit: set[str]) -> bool:
    if name == "up":
        return True
    if name.startswith("rabbitmq_"):
        return name in rabbit
    if name in recorded:
        return True
    return any(name.endswith(s) and name[: -len(s)] in recorded for s in HISTOGRAM_SUFFIXES)


def check_dashboard(r: Report, dash: dict) -> list[tuple[str, str]]:
    """Structure; returns (where, expr) of every query."""
    r.check(dash.get("uid"), "dashboard.json: no uid (Grafana would make a new dashboard on each import)")
    r.check(isinstance(dash.get("schemaVersion"), int), "dashboard.json: schemaVersion missing")
    variables = {v["name"] for v in dash.get("templating", {}).get("list", [])}
    r.check("datasource" in variables, "dashboard.json: no `datasource` variable (panels would be bound to one Prometheus uid)")
    ids: set[int] = set()
    cells: dict[tuple[int, int], str] = {}
    queries: list[tuple[str, str]] = []
    for p in dash.get("panels", []):
        title = p.get("title", "?")
        r.check(p.get("id") not in ids, f"dashboard.json: panel id {p.get('id')} twice")
        ids.add(p.get("id"))
        g = p.get("gridPos", {})
        x, y, w, h = (g.get(k) for k in ("x", "y", "w", "h"))
        if not r.check(all(isinstance(v, int) for v in (x, y, w, h)), f"panel {title!r}: gridPos needs x, y, w, h"):
            continue
        r.check(0 <= x and x + w <= 24, f"panel {title!r}: outside the 24-column grid")
        for cx in range(x, x + w):
            for cy in range(y, y + h):
                other = cells.get((cx, cy))
                if other:
                    r.error(f"panel {title!r} overlaps {other!r}")
                    break
                cells[(cx, cy)] = title
        if p.get("type") == "row":
            continue
        r.check(p.get("datasource", {}).get("uid") == "${datasource}",
                f"panel {title!r}: datasource must be the ${{datasource}} variable")
        targets = p.get("targets") or []
        r.check(targets, f"panel {title!r}: no query")
        refs = [t.get("refId") for t in targets]
        r.check(len(refs) == len(set(refs)), f"panel {title!r}: refIds not unique")
        for t in targets:
            expr = t.get("expr", "")
            if r.check(expr.strip(), f"panel {title!r}: empty query"):
                queries.append((f"panel {title!r}", expr))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict) and q.get("query"):
            queries.append((f"variable {v['name']!r}", q["query"]))
    for where, expr in queries:
        for var in VAR.findall(expr):
            r.check(var in variables or var in GRAFANA_BUILTINS,
                    f"{where}: ${var} is neither a dashboard variable nor a Grafana built-in")
    return queries


def promql_parses(r: Report, queries: list[tuple[str, str]]) -> None:
    """Every query through promtool's parser, as recording rules."""
    rules = []
    for n, (where, expr) in enumerate(queries):
        if expr.startswith("label_values("):
            # A Grafana function, not PromQL: its argument is a selector.
            m = re.fullmatch(r"label_values\((.+),\s*[A-Za-z_]+\)", expr)
            if not r.check(m, f"{where}: cannot read {expr!r}"):
                continue
            expr = m.group(1)
        text = VAR.sub(lambda m: SUBSTITUTE.get(m.group(1), ".*"), expr)
        rules.append({"record": f"dashboard:query_{n}", "expr": text})
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
        tmp = Path(f.name)
    try:
        out = subprocess.run(["promtool", "check", "rules", str(tmp)], capture_output=True, text=True)
    finally:
        tmp.unlink()
    if out.returncode != 0:
        r.error(f"dashboard queries do not parse (promtool check rules):\n{out.stdout}{out.stderr}")
    else:
        r.ok(f"{len(rules)} dashboard queries parse as PromQL (promtool)")


def main() -> None:
    r = Report("deploy/monitoring")
    alerts = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    rules = [rule for g in alerts["groups"] for rule in g["rules"]]
    alert_exprs = [(f"alert {rule.get('alert', rule.get('record'))}", rule["expr"]) for rule in rules]
    for rule in rules:
        name = rule.get("alert", "?")
        r.check(rule.get("labels", {}).get("severity") in {"warning", "critical"},
                f"alert {name}: severity must be warning or critical")
        r.check(rule.get("annotations", {}).get("summary") and rule["annotations"].get("description"),
                f"alert {name}: needs a summary and a description")

    tests = yaml.safe_load((MON / "alerts.test.yaml").read_text(encoding="utf-8"))
    tested: dict[str, set[str]] = {}
    for t in tests["tests"]:
        for a in t.get("alert_rule_test", []):
            tested.setdefault(a["alertname"], set()).add("fires" if a.get("exp_alerts") else "silent")
    for rule in rules:
        name = rule.get("alert")
        r.check(tested.get(name) == {"fires", "silent"},
                f"alert {name}: alerts.test.yaml needs a case where it fires and one where it stays silent")

    dash = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = check_dashboard(r, dash)
    promql_parses(r, queries)

    recorded = recorded_names()
    rabbit = {line.strip() for line in RABBITMQ_NAMES.read_text(encoding="utf-8").splitlines()
              if line.strip() and not line.startswith("#")}
    used: set[str] = set()
    for where, expr in alert_exprs + queries:
        for name in metric_names(expr):
            used.add(name)
            r.check(known(name, recorded, rabbit),
                    f"{where}: metric {name} is neither recorded by the workers (shared/, workers/) "
                    f"nor a documented rabbitmq_prometheus name ({rel(RABBITMQ_NAMES)})")
    r.ok(f"{len(used)} metric names in {len(alert_exprs)} alerts and {len(queries)} dashboard queries: "
         f"{len([u for u in used if u.startswith('halosync_')])} recorded by the workers, "
         f"{len([u for u in used if u.startswith('rabbitmq_')])} documented rabbitmq_prometheus names")

    prom = yaml.safe_load(PROMETHEUS.read_text(encoding="utf-8"))
    r.check("alerts.yaml" in prom.get("rule_files", []), "prometheus.yaml: rule_files must load alerts.yaml")
    jobs = {j["job_name"]: j for j in prom.get("scrape_configs", [])}
    for job in set(re.findall(r'job="([^"]+)"', ALERTS.read_text(encoding="utf-8"))):
        r.check(job in jobs, f"alerts.yaml names job {job!r}, which prometheus.yaml does not scrape")
    rabbit_job = [j for j in jobs.values() if any(":15692" in t for s in j.get("static_configs", []) for t in s.get("targets", []))]
    r.check(rabbit_job and rabbit_job[0].get("metrics_path") == "/metrics/per-object",
            "prometheus.yaml: RabbitMQ must be scraped on /metrics/per-object (the alerts need the `queue` label)")
    r.ok("prometheus.yaml: loads alerts.yaml, scrapes the jobs the alerts name, RabbitMQ per object")
    r.finish()


if __name__ == "__main__":
    sys.exit(main())
