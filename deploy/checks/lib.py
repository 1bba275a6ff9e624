"""Shared helpers of `make check-deploy` (deploy/checks/check-deploy.sh).

Every check collects its problems in a `Report`, prints what it checked,
and exits non-zero if anything is wrong. Nothing here starts a container or
needs the network: the workspace's binaries come from
`cargo metadata --no-deps --offline`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Binaries that are not shipped in the image.
NOT_SHIPPED = {"halosync-bench"}

# Worker binaries being written (DESIGN §7) but not in the workspace yet:
# the deployment files already run them. Each is reported as a note, not an
# error, until its crate exists; then it is checked like every other binary.
# Remove a name from here once its crate has landed.
PENDING: set[str] = set()

# The health endpoint port the deployments use (worker.health_port).
HEALTH_PORT = 9090


class Report:
    """Problems and notes of one check, printed at the end."""

    def __init__(self, title: str):
        self.title = title
        self.errors: list[str] = []
        self.notes: list[str] = []
        self.checked: list[str] = []

    def error(self, msg: str) -> None:
        self.errors.append(msg)

    def check(self, cond: object, msg: str) -> bool:
        if not cond:
            self.errors.append(msg)
        return bool(cond)

    def note(self, msg: str) -> None:
        self.notes.append(msg)

    def ok(self, what: str) -> None:
        self.checked.append(what)

    def finish(self) -> None:
        for c in self.checked:
            print(f"  checked: {c}")
        for n in self.notes:
            print(f"  note: {n}")
        if self.errors:
            print(f"  FAILED ({self.title}): {len(self.errors)} problem(s)")
            for e in self.errors:
                print(f"  ERROR: {e}")
            sys.exit(1)
        print(f"  ok: {self.title}")


def rel(path: Path) -> str:
    try:
        return str(path.relative_to(ROOT))
    except ValueError:
        return str(path)


def load_yaml_docs(path: Path) -> list:
    with open(path, encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def load_toml(text: str, origin: str, report: Report) -> dict | None:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        report.error(f"{origin}: not valid TOML: {e}")
        return None


def cargo_metadata() -> dict:
    cargo = os.environ.get("CARGO", "cargo")
    out = subprocess.run(
        [cargo, "metadata", "--no-deps", "--format-version", "1", "--offline"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def workspace_binaries() -> set[str]:
    """Every bin target of the workspace's packages."""
    meta = cargo_metadata()
    members = set(meta.get("workspace_members", []))
    bins = set()
    for pkg in meta["packages"]:
        if members and pkg["id"] not in members:
            continue
        for t in pkg["targets"]:
            if "bin" in t["kind"]:
                bins.add(t["name"])
    return bins


def shipped_binaries(report: Report, notes: bool = True) -> set[str]:
    """The binaries the image must hold: the workspace's bins (less the
    benchmark) plus the pending workers, with a note for each pending one."""
    ws = workspace_binaries() - NOT_SHIPPED
    for p in sorted(PENDING if notes else ()):
        if p in ws:
            report.note(f"{p} is in the workspace now: remove it from PENDING in deploy/checks/lib.py")
        else:
            report.note(f"{p} is not in the workspace yet (pending): the image build fails until its crate exists")
    return ws | PENDING


def workers(binaries: set[str]) -> list[str]:
    """Worker binaries: halosync-<family> (the operator tool is `halosync`)."""
    return sorted(b for b in binaries if b.startswith("halosync-"))


def family(worker: str) -> str:
    return worker.removeprefix("halosync-")


def delay_label(ms: int) -> str:
    """shared/src/amqp/topology.rs `delay_label`: 5000 -> 5s, 120000 -> 2m."""
    if ms % 3_600_000 == 0:
        return f"{ms // 3_600_000}h"
    if ms % 60_000 == 0:
        return f"{ms // 60_000}m"
    if ms % 1000 == 0:
        return f"{ms // 1000}s"
    return f"{ms}ms"


def definitions_retry_tiers() -> dict[str, list[int]]:
    """Per work queue of deploy/rabbitmq/definitions.json, the TTLs of the
    retry queues that dead-letter into it (sorted)."""
    with open(DEPLOY / "rabbitmq" / "definitions.json", encoding="utf-8") as f:
        doc = json.load(f)
    tiers: dict[str, list[int]] = {}
    for q in doc.get("queues", []):
        args = q.get("arguments", {})
        if "x-message-ttl" in args:
            tiers.setdefault(args.get("x-dead-letter-routing-key", "?"), []).append(args["x-message-ttl"])
    return {k: sorted(v) for k, v in tiers.items()}


_UNITS = {"ms": 0.001, "s": 1, "sec": 1, "secs": 1, "m": 60, "min": 60, "mins": 60,
          "h": 3600, "hr": 3600, "hrs": 3600, "d": 86400, "day": 86400, "days": 86400}


def duration_seconds(section: dict, key: str, old_key: str, old_unit: float, default: float) -> float:
    """A config duration as the workers read it: `key = "30s"` (humantime),
    else the deprecated integer `old_key` (in `old_unit` seconds), else the
    default."""
    if key in section:
        total = 0.0
        for num_, unit in re.findall(r"(\d+)\s*([a-z]+)", str(section[key])):
            total += int(num_) * _UNITS.get(unit, float("nan"))
        return total
    if old_key in section:
        return section[old_key] * old_unit
    return default


def retry_delays_ms(cfg: dict) -> list:
    retry = cfg.get("retry", {})
    if "delays" in retry:
        return [round(duration_seconds({"d": d}, "d", "", 0, 0) * 1000) for d in retry["delays"]]
    return retry.get("delays_ms", [1000, 5000, 30000, 120000, 600000])


def check_config_against_definitions(cfg: dict, origin: str, report: Report) -> None:
    """A halosync.toml that runs against a broker set up from
    deploy/rabbitmq/definitions.json must use its prefix and retry tiers."""
    prefix = cfg.get("prefix", "")
    report.check(
        prefix == "",
        f"{origin}: prefix is {prefix!r}, but deploy/rabbitmq/definitions.json declares the unprefixed topology; "
        "use prefix = \"\" or regenerate the definitions for that prefix",
    )
    delays = retry_delays_ms(cfg)
    for queue, ttls in sorted(definitions_retry_tiers().items()):
        report.check(
            sorted(set(delays)) == ttls,
            f"{origin}: retry.delays {delays} (ms) but deploy/rabbitmq/definitions.json has retry tiers {ttls} for {queue}; "
            "the workers would declare other delay queues than the definitions",
        )
    health = cfg.get("worker", {}).get("health_port", 0)
    report.check(
        health == HEALTH_PORT,
        f"{origin}: worker.health_port is {health}; the deployments probe and scrape port {HEALTH_PORT}",
    )
    for name, conn in cfg.get("connections", {}).items():
        report.check(
            "client_secret" not in conn,
            f"{origin}: connections.{name}.client_secret: secrets never go in the file; "
            "use client_secret_env or client_secret_file",
        )
        report.check(
            ("client_secret_env" in conn) != ("client_secret_file" in conn),
            f"{origin}: connections.{name} needs exactly one of client_secret_env and client_secret_file",
        )
