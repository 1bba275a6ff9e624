"""deploy/otel/collector.yaml: valid YAML, a well-formed collector config.

The collector cannot run here, so this checks what would stop it at start:
only known top-level sections; every component a pipeline names is defined;
every defined component is used; every component type is part of the core
distribution the compose file runs (otel/opentelemetry-collector, not
-contrib); pipelines are traces, metrics or logs; the OTLP receiver listens
on 0.0.0.0:4318 for HTTP (what the workers' OTEL_EXPORTER_OTLP_ENDPOINT
names), not on localhost only.
"""

from __future__ import annotations

import yaml

from lib import DEPLOY, Report

PATH = DEPLOY / "otel" / "collector.yaml"
# Component types of the core distribution (otelcol) that a config here may use.
CORE = {
    "receivers": {"otlp", "prometheus", "hostmetrics", "jaeger", "kafka", "zipkin", "nop"},
    "processors": {"batch", "memory_limiter", "attributes", "resource", "span",
                   "probabilistic_sampler", "filter"},
    "exporters": {"debug", "otlp", "otlphttp", "file", "prometheus", "prometheusremotewrite",
                  "zipkin", "kafka", "nop"},
    "extensions": {"health_check", "pprof", "zpages"},
    "connectors": {"forward"},
}


def main() -> None:
    report = Report("OpenTelemetry collector config")
    try:
        cfg = yaml.safe_load(PATH.read_text())
    except yaml.YAMLError as e:
        report.error(f"{PATH}: not valid YAML: {e}")
        report.finish()
    report.check(isinstance(cfg, dict), f"{PATH}: not a mapping")
    extra = set(cfg) - set(CORE) - {"service"}
    report.check(not extra, f"unknown top-level sections {sorted(extra)}")
    for section, kinds in CORE.items():
        for name in cfg.get(section) or {}:
            t = name.split("/")[0]
            report.check(t in kinds, f"{section}.{name}: {t!r} is not in the core collector distribution")
    used = {s: set() for s in CORE}
    pipelines = (cfg.get("service") or {}).get("pipelines") or {}
    report.check(pipelines, "service.pipelines is empty")
    for pname, p in pipelines.items():
        report.check(pname.split("/")[0] in {"traces", "metrics", "logs"},
                     f"pipeline {pname}: not traces, metrics or logs")
        report.check(p.get("receivers") and p.get("exporters"), f"pipeline {pname}: needs receivers and exporters")
        for section in ("receivers", "processors", "exporters"):
            for comp in p.get(section) or []:
                used[section].add(comp)
                report.check(comp in (cfg.get(section) or {}),
                             f"pipeline {pname}: {section[:-1]} {comp} is not defined under {section}")
    for ext in (cfg.get("service") or {}).get("extensions") or []:
        used["extensions"].add(ext)
        report.check(ext in (cfg.get("extensions") or {}), f"service.extensions: {ext} is not defined")
    for section in CORE:
        unused = set(cfg.get(section) or {}) - used[section]
        report.check(not unused, f"{section} {sorted(unused)} are defined but used by no pipeline")
    http = (((cfg.get("receivers") or {}).get("otlp") or {}).get("protocols") or {}).get("http") or {}
    report.check(http.get("endpoint") == "0.0.0.0:4318",
                 "receivers.otlp.protocols.http.endpoint must be 0.0.0.0:4318 (the workers send OTLP/HTTP there; "
                 "the default listens on localhost only)")
    report.ok(f"deploy/otel/collector.yaml: pipelines {', '.join(pipelines)}; every component defined, used, "
              "and in the core distribution; OTLP/HTTP on 0.0.0.0:4318")
    report.finish()


if __name__ == "__main__":
    main()
