"""deploy/compose.yaml: what the Compose specification cannot see.

check-deploy.sh validates the file against the Compose specification
(`check-jsonschema --builtin-schema vendor.compose-spec`). This script checks
that it reproduces `make run` with the files of this repository:

* one service per binary the image ships: halo-sim, every worker, and a
  one-shot `setup` running `halosync topology` and `halosync publish
  /app/schemas/examples/valid`; halosync services are built from the
  repository's Dockerfile and run binaries the image holds;
* RabbitMQ (management) and Redis have healthchecks and the halosync
  services wait for them (`condition: service_healthy`);
* workers: graceful stop longer than worker.shutdown_grace, healthcheck
  on /readyz at worker.health_port, traces to the collector's OTLP/HTTP port;
* deploy/compose/halosync.toml: valid TOML; hosts are compose services;
  the broker user and password are the ones rabbitmq-users.json creates;
  halo-sim's client id and secret are the connection's; prefix and retry
  tiers match deploy/rabbitmq/definitions.json, which RabbitMQ loads at boot
  from the directory rabbitmq.conf names;
* the collector scrapes every worker's /metrics;
* every bind-mounted file exists.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import PurePosixPath
from urllib.parse import unquote, urlparse

import yaml

from lib import (DEPLOY, HEALTH_PORT, ROOT, Report, check_config_against_definitions, duration_seconds, load_toml,
                 shipped_binaries, workers)

COMPOSE = DEPLOY / "compose.yaml"


def as_list(cmd) -> list[str]:
    if cmd is None:
        return []
    return cmd if isinstance(cmd, list) else cmd.split()


def seconds(d: str) -> float:
    total = 0.0
    for n, u in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", str(d)):
        total += float(n) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[u]
    return total


def env_of(svc: dict) -> dict:
    e = svc.get("environment", {})
    if isinstance(e, list):
        return dict(x.split("=", 1) if "=" in x else (x, None) for x in e)
    return {k: (str(v) if v is not None else None) for k, v in e.items()}


def binds(svc: dict) -> dict[str, str]:
    """container path -> host path (relative to deploy/)."""
    out = {}
    for v in svc.get("volumes", []):
        if isinstance(v, str):
            parts = v.split(":")
            if len(parts) >= 2 and parts[0].startswith((".", "/")):
                out[parts[1]] = parts[0]
        elif v.get("type") == "bind":
            out[v["target"]] = v["source"]
    return out


def depends(svc: dict) -> dict:
    d = svc.get("depends_on", {})
    return {k: {"condition": "service_started"} for k in d} if isinstance(d, list) else d


def check_password(users_json: dict, user: str, password: str) -> bool:
    """RabbitMQ's rabbit_password_hashing_sha256: base64(salt(4) ++ sha256(salt ++ password))."""
    for u in users_json.get("users", []):
        if u.get("name") == user:
            raw = base64.b64decode(u["password_hash"])
            salt = raw[:4]
            return raw == salt + hashlib.sha256(salt + password.encode()).digest()
    return False


def main() -> None:
    report = Report("Compose file reproduces `make run`")
    binaries = shipped_binaries(report, notes=False)
    want_workers = workers(binaries)
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc.get("services", {})

    # bind mounts exist
    for name, svc in services.items():
        for target, source in binds(svc).items():
            report.check((DEPLOY / source).exists(), f"service {name}: mounts {source} (from deploy/), which does not exist")

    # infrastructure
    users_json: dict = {}
    users: list[str] = []
    rmq, redis = services.get("rabbitmq"), services.get("redis")
    if report.check(rmq, "no rabbitmq service"):
        report.check("management" in rmq.get("image", ""), "rabbitmq must use a -management image")
        report.check(rmq.get("healthcheck"), "rabbitmq needs a healthcheck (the others wait for service_healthy)")
        b = binds(rmq)
        conf = [h for t, h in b.items() if t.startswith("/etc/rabbitmq/conf.d/")]
        if report.check(conf, "rabbitmq: no rabbitmq.conf mounted in /etc/rabbitmq/conf.d/"):
            text = (DEPLOY / conf[0]).read_text()
            m = re.search(r"^load_definitions\s*=\s*(\S+)", text, re.M)
            if report.check(m, f"{conf[0]}: no load_definitions"):
                d = m.group(1).rstrip("/")
                loaded = {PurePosixPath(h).name: h for t, h in b.items() if str(PurePosixPath(t).parent) == d}
                report.check(any(h.endswith("rabbitmq/definitions.json") for h in loaded.values()),
                             f"rabbitmq: deploy/rabbitmq/definitions.json is not mounted in {d}")
                users = [h for h in loaded.values() if "users" in h]
                users_json = json.loads((DEPLOY / users[0]).read_text()) if users else {}
                report.check(users_json.get("users"),
                             f"rabbitmq: no users file in {d}; with load_definitions RabbitMQ creates no default user")
    if report.check(redis, "no redis service"):
        report.check(str(redis.get("image", "")).startswith("redis:7"), "redis must be redis:7")
        report.check(redis.get("healthcheck"), "redis needs a healthcheck")

    # the halosync image: built from the repository's Dockerfile
    halosync_services = {n: s for n, s in services.items() if str(s.get("image", "")).startswith("halosync:")}
    for n, s in halosync_services.items():
        b = s.get("build", {})
        ctx = (DEPLOY / b.get("context", ".")).resolve()
        report.check(ctx == ROOT and b.get("dockerfile", "Dockerfile") == "Dockerfile",
                     f"service {n}: must build the repository's Dockerfile (context .., dockerfile Dockerfile)")
        cmd = as_list(s.get("command"))
        if cmd[:2] == ["bash", "-c"]:
            progs = {line.split()[0] for line in cmd[2].splitlines() if line.strip() and line.split()[0] in binaries}
        else:
            progs = {cmd[0]} if cmd else set()
            report.check(cmd and cmd[0] in binaries, f"service {n}: runs {cmd[:1]}, which the image does not hold")
        s["_progs"] = progs

    # the config file
    cfg_host = "compose/halosync.toml"
    cfg = load_toml((DEPLOY / cfg_host).read_text(), f"deploy/{cfg_host}", report) or {}
    check_config_against_definitions(cfg, f"deploy/{cfg_host}", report)
    grace = duration_seconds(cfg.get("worker", {}), "shutdown_grace", "shutdown_grace", 1, 30)
    port = cfg.get("worker", {}).get("health_port", 0)
    amqp = urlparse(cfg.get("amqp_url", ""))
    report.check(amqp.hostname in services, f"amqp_url host {amqp.hostname} is not a compose service")
    if rmq and amqp.username:
        report.check(check_password(users_json, amqp.username, unquote(amqp.password or "")),
                     f"amqp_url's user {amqp.username} and password are not the ones {users[0] if users else '?'} creates")
    redis_url = urlparse(cfg.get("redis_url", ""))
    report.check(redis_url.hostname in services, f"redis_url host {redis_url.hostname} is not a compose service")

    # halo-sim serves every connection with the right credentials
    sim = services.get("halo-sim")
    if report.check(sim and "halo-sim" in sim.get("_progs", ()), "no halo-sim service running halo-sim"):
        scmd = as_list(sim["command"])
        listen = scmd[scmd.index("--listen") + 1] if "--listen" in scmd else ""
        report.check(listen.startswith("0.0.0.0:"), f"halo-sim must --listen on 0.0.0.0 (got {listen!r})")
        client_id = scmd[scmd.index("--client-id") + 1] if "--client-id" in scmd else "halosync-sim"
        sim_secret = env_of(sim).get("HALO_SIM_CLIENT_SECRET")
        for cname, conn in cfg.get("connections", {}).items():
            for key in ("resource_server", "auth_server"):
                u = urlparse(conn.get(key, ""))
                report.check(u.hostname == "halo-sim" and str(u.port) == listen.rsplit(":", 1)[-1],
                             f"connections.{cname}.{key} {conn.get(key)} must point at halo-sim:{listen.rsplit(':', 1)[-1]}")
            report.check(conn.get("client_id") == client_id,
                         f"connections.{cname}.client_id {conn.get('client_id')} != halo-sim's --client-id {client_id}")
            sec_env = conn.get("client_secret_env")
            for w in want_workers:
                if w in services:
                    report.check(env_of(services[w]).get(sec_env) == sim_secret,
                                 f"service {w}: {sec_env} must equal halo-sim's HALO_SIM_CLIENT_SECRET")

    # workers
    otel = services.get("otel-collector")
    report.check(otel, "no otel-collector service")
    for w in want_workers:
        s = services.get(w)
        if not report.check(s, f"no service {w}"):
            continue
        report.check(s.get("_progs") == {w}, f"service {w}: command must run {w}")
        dep = depends(s)
        for need in ("rabbitmq", "redis"):
            report.check(dep.get(need, {}).get("condition") == "service_healthy",
                         f"service {w}: depends_on {need} must wait for service_healthy")
        e = env_of(s)
        report.check(binds(s).get(e.get("HALOSYNC_CONFIG", "")) == f"./{cfg_host}",
                     f"service {w}: HALOSYNC_CONFIG must be the mounted ./{cfg_host}")
        ep = urlparse(e.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""))
        report.check(ep.hostname == "otel-collector" and ep.port == 4318,
                     f"service {w}: OTEL_EXPORTER_OTLP_ENDPOINT must be http://otel-collector:4318 (OTLP/HTTP)")
        sg = seconds(s.get("stop_grace_period", "10s"))
        report.check(sg > grace, f"service {w}: stop_grace_period {s.get('stop_grace_period', '10s (default)')} "
                                 f"must exceed worker.shutdown_grace {grace}")
        hc = " ".join(as_list(s.get("healthcheck", {}).get("test")))
        report.check(f"/{port}" in hc and "/readyz" in hc, f"service {w}: healthcheck must GET /readyz on port {port}")
    extra = sorted(n for n, s in halosync_services.items()
                   if n.startswith("halosync-") and n not in want_workers)
    report.check(not extra, f"services {extra} run no worker of the workspace")

    # setup: make run's steps
    setup = services.get("setup")
    if report.check(setup, "no one-shot setup service (topology + publish, as make run)"):
        script = " ".join(as_list(setup.get("command")))
        report.check("halosync topology" in script, "setup must run `halosync topology`")
        report.check("halosync publish /app/schemas/examples/valid" in script,
                     "setup must run `halosync publish /app/schemas/examples/valid`")
        report.check(any((ROOT / "schemas/examples/valid").glob("*.json")), "schemas/examples/valid/ has no events")
        for need in ("rabbitmq", "redis"):
            report.check(depends(setup).get(need, {}).get("condition") == "service_healthy",
                         f"setup: depends_on {need} must wait for service_healthy")
        report.check(str(setup.get("restart", "no")) == "no", "setup is one-shot: restart must be \"no\"")

    # the nightly reconcile (profile `reconcile`): halosync reconcile on a
    # mounted snapshot, for a configured connection
    rec = services.get("reconcile")
    if report.check(rec, "no reconcile service (profile reconcile: the nightly halosync reconcile)"):
        report.check("reconcile" in rec.get("profiles", []), "reconcile: must be in the profile `reconcile` (not started by default)")
        script = " ".join(as_list(rec.get("command")))
        report.check("halosync reconcile" in script and "--snapshot" in script,
                     "reconcile: must run `halosync reconcile --snapshot ...`")
        e = env_of(rec)
        report.check(e.get("RECONCILE_CONNECTION") in cfg.get("connections", {}),
                     f"reconcile: RECONCILE_CONNECTION {e.get('RECONCILE_CONNECTION')} is not a connection of deploy/{cfg_host}")
        snap = PurePosixPath(e.get("RECONCILE_SNAPSHOT", ""))
        mounted = binds(rec).get(str(snap.parent))
        if report.check(mounted, f"reconcile: RECONCILE_SNAPSHOT {snap} is not in a mounted directory"):
            report.check((DEPLOY / mounted / snap.name).exists(), f"reconcile: {mounted}/{snap.name} does not exist")
        report.check(binds(rec).get(e.get("HALOSYNC_CONFIG", "")) == f"./{cfg_host}",
                     f"reconcile: HALOSYNC_CONFIG must be the mounted ./{cfg_host}")
        for need in ("rabbitmq", "redis"):
            report.check(depends(rec).get(need, {}).get("condition") == "service_healthy",
                         f"reconcile: depends_on {need} must wait for service_healthy")

    # the collector scrapes every worker
    col = DEPLOY / "otel" / "collector.yaml"
    if otel:
        report.check(binds(otel).get("/etc/otelcol/config.yaml") == "./otel/collector.yaml",
                     "otel-collector must mount ./otel/collector.yaml at /etc/otelcol/config.yaml")
    targets = set()
    for sc in (yaml.safe_load(col.read_text()).get("receivers", {}).get("prometheus", {})
               .get("config", {}).get("scrape_configs", [])):
        for stc in sc.get("static_configs", []):
            targets |= set(stc.get("targets", []))
    want_targets = {f"{w}:{port}" for w in want_workers}
    report.check(targets == want_targets, f"otel/collector.yaml scrapes {sorted(targets)}, the workers are {sorted(want_targets)}")

    report.ok(f"services: rabbitmq + redis (healthchecks), halo-sim, otel-collector, setup, "
              f"{', '.join(want_workers)}; halosync services build ../Dockerfile and run binaries it ships")
    report.ok(f"deploy/{cfg_host}: TOML, hosts are services, broker login = rabbitmq-users.json, halo-sim "
              f"credentials, health_port {HEALTH_PORT}, prefix/retry tiers = definitions.json")
    report.ok(f"workers: stop_grace_period > shutdown_grace ({grace}s), /readyz healthcheck, "
              "OTLP to otel-collector:4318, scraped by the collector; setup = topology + publish")
    report.finish()


if __name__ == "__main__":
    main()
