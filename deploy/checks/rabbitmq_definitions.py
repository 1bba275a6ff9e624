"""deploy/rabbitmq/definitions.json declares exactly what the workers declare.

The workers (and `halosync topology`) declare their topology at start
(shared/src/amqp/topology.rs, `Topology::declare`). A queue that already
exists with other arguments makes that declaration fail with
PRECONDITION_FAILED, so the definitions file must hold the very same
exchanges, queues, arguments and bindings, for the default configuration:
prefix "", vhost "/", retry tiers `retry.delays` = 1s 5s 30s 2m 10m.

EXPECTED below mirrors topology.rs by hand. So that a change there cannot go
unnoticed, the check also reads the literals of topology.rs, contract.rs
(families) and config.rs (default retry tiers) and fails when they are not
the ones this file assumes: update definitions.json and this file together.
"""

from __future__ import annotations

import json
import re
import sys

from lib import DEPLOY, ROOT, Report, delay_label

# ---- what topology.rs declares (keep in step with it) ----------------------
FAMILIES = ["account", "subscription", "usage", "overage"]  # contract.rs Family::ALL
DELAYS_MS = [1000, 5000, 30000, 120000, 600000]  # config.rs RetrySettings::default
DELIVERY_LIMIT = 10  # topology.rs DELIVERY_LIMIT (work queues)
PARKED_DELIVERY_LIMIT = 1_000_000_000  # topology.rs parked() (dead letters, unrouted)
ACTIVITY_MAX_AGE = "30D"  # activity.rs MAX_AGE (the activity stream)
PREFIX = ""
VHOST = "/"


def quorum() -> dict:
    return {"x-queue-type": "quorum"}


def parked() -> dict:
    return {**quorum(), "x-delivery-limit": PARKED_DELIVERY_LIMIT}


def dead_lettering(exchange: str, routing_key: str) -> dict:
    return {
        **quorum(),
        "x-dead-letter-exchange": exchange,
        "x-dead-letter-routing-key": routing_key,
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }


def expected() -> tuple[dict, dict, set]:
    p = PREFIX
    exchanges = {
        f"{p}halosync.unrouted": ("fanout", {}),
        f"{p}halosync.events": ("topic", {"alternate-exchange": f"{p}halosync.unrouted"}),
    }
    queues = {f"{p}halosync.unrouted": parked()}
    bindings = {(f"{p}halosync.unrouted", f"{p}halosync.unrouted", "")}
    for fam in FAMILIES:
        work, dead = f"{p}halosync.{fam}", f"{p}halosync.{fam}.dead"
        queues[dead] = parked()
        queues[work] = {**dead_lettering("", dead), "x-delivery-limit": DELIVERY_LIMIT}
        for d in DELAYS_MS:
            queues[f"{p}halosync.{fam}.retry.{delay_label(d)}"] = {
                **dead_lettering("", work),
                "x-message-ttl": d,
            }
        bindings.add((f"{p}halosync.events", work, f"{fam}.*"))
    # The activity log (shared/src/activity.rs): a stream, kept 30 days.
    queues[f"{p}halosync.activity"] = {"x-queue-type": "stream", "x-max-age": ACTIVITY_MAX_AGE}
    return exchanges, queues, bindings


# ---- drift detection: the Rust sources still say what EXPECTED assumes ----
def check_sources(report: Report) -> None:
    topo = (ROOT / "shared/src/amqp/topology.rs").read_text(encoding="utf-8")
    contract = (ROOT / "shared/src/contract.rs").read_text(encoding="utf-8")
    config = (ROOT / "shared/src/config.rs").read_text(encoding="utf-8")
    hint = "update deploy/rabbitmq/definitions.json and deploy/checks/rabbitmq_definitions.py"

    def num(s: str) -> int:
        return int(s.replace("_", ""))

    m = re.search(r"pub const DELIVERY_LIMIT: i64 = ([\d_]+);", topo)
    report.check(m and num(m.group(1)) == DELIVERY_LIMIT,
                 f"topology.rs DELIVERY_LIMIT is no longer {DELIVERY_LIMIT}: {hint}")
    literals = {num(x) for x in re.findall(r"LongLongInt\(([\d_]+)\)", topo)}
    report.check(literals == {PARKED_DELIVERY_LIMIT},
                 f"topology.rs integer arguments are {sorted(literals)}, expected only the parked "
                 f"delivery limit {PARKED_DELIVERY_LIMIT}: {hint}")
    keys = set(re.findall(r'insert\(\s*"([a-z-]+)"', topo))
    want_keys = {"x-queue-type", "x-delivery-limit", "x-message-ttl", "x-dead-letter-exchange",
                 "x-dead-letter-routing-key", "x-dead-letter-strategy", "x-overflow",
                 "alternate-exchange"}
    report.check(keys == want_keys,
                 f"topology.rs sets arguments {sorted(keys)}, this check knows {sorted(want_keys)}: {hint}")
    values = set(re.findall(r'long_str\("([^"]*)"\)', topo))
    report.check(values == {"quorum", "at-least-once", "reject-publish"},
                 f"topology.rs string arguments are {sorted(values)}: {hint}")
    for needle in ('"{}halosync.events"', '"{}halosync.unrouted"', '"{}halosync.{}"',
                   '"{}halosync.{}.dead"', '"{}halosync.{}.retry.{}"', '"{family}.*"',
                   "ExchangeKind::Fanout", "ExchangeKind::Topic", 'dead_lettering("", &work)',
                   'dead_lettering("", &self.dead_queue(family))'):
        report.check(needle in topo, f"topology.rs no longer contains {needle}: {hint}")
    activity = (ROOT / "shared/src/activity.rs").read_text(encoding="utf-8")
    report.check('"{}halosync.activity"' in topo and "activity::declare_stream" in topo,
                 f"topology.rs no longer declares the activity stream {{}}halosync.activity: {hint}")
    m = re.search(r'pub const MAX_AGE: &str = "([^"]+)";', activity)
    report.check(m and m.group(1) == ACTIVITY_MAX_AGE,
                 f"activity.rs MAX_AGE is no longer {ACTIVITY_MAX_AGE!r}: {hint}")
    m = re.search(r"pub fn stream_arguments\(\).*?\n}\n", activity, re.S)
    body = m.group(0) if m else ""
    akeys = set(re.findall(r'insert\(\s*"([a-z-]+)"', body))
    report.check(akeys == {"x-queue-type", "x-max-age"} and '"stream"' in body,
                 f"activity.rs stream_arguments sets {sorted(akeys)}, this check knows x-queue-type=stream, x-max-age: {hint}")
    fams = re.findall(r'Family::\w+ => "(\w+)",', contract)
    fam_order = list(dict.fromkeys(fams))
    report.check(fam_order == FAMILIES, f"contract.rs families are {fam_order}, expected {FAMILIES}: {hint}")
    m = re.search(r"DEFAULT_RETRY_DELAYS_MS: \[u64; \d+\] = \[([\d_, ]+)\]", config)
    got = [num(x) for x in m.group(1).split(",")] if m else None
    report.check(got == DELAYS_MS, f"config.rs default retry.delays_ms is {got}, expected {DELAYS_MS}: {hint}")
    report.ok("topology.rs / contract.rs / config.rs still declare what this check expects "
              f"(families {', '.join(FAMILIES)}; delivery limits {DELIVERY_LIMIT} and {PARKED_DELIVERY_LIMIT:_}; "
              f"tiers {', '.join(delay_label(d) for d in DELAYS_MS)})")


def typed(v):
    """JSON values with their type, so that 10 and "10" differ (the broker
    compares argument types as well as values)."""
    return (type(v).__name__, v)


def check_definitions(report: Report) -> None:
    path = DEPLOY / "rabbitmq" / "definitions.json"
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        report.error(f"{path}: {e}")
        return
    allowed = {"vhosts", "exchanges", "queues", "bindings"}
    extra = set(doc) - allowed
    report.check(not extra, f"definitions.json has {sorted(extra)}: only {sorted(allowed)} belong in it "
                 "(users, permissions and policies are the operator's, not the topology's)")
    vhosts = [v.get("name") for v in doc.get("vhosts", [])]
    report.check(vhosts == [VHOST], f"definitions.json vhosts are {vhosts}, expected [{VHOST!r}]")

    want_ex, want_q, want_b = expected()

    got_ex = {}
    for e in doc.get("exchanges", []):
        name = e.get("name")
        report.check(name not in got_ex, f"exchange {name} is defined twice")
        report.check(e.get("vhost") == VHOST, f"exchange {name}: vhost {e.get('vhost')!r}, expected {VHOST!r}")
        report.check(e.get("durable") is True and e.get("auto_delete") is False and e.get("internal") is False,
                     f"exchange {name}: must be durable, not auto_delete, not internal")
        got_ex[name] = (e.get("type"), e.get("arguments", {}))
    for name in sorted(set(want_ex) | set(got_ex)):
        if name not in got_ex:
            report.error(f"exchange {name} is missing (topology.rs declares it)")
        elif name not in want_ex:
            report.error(f"exchange {name} is not one topology.rs declares")
        else:
            (wt, wa), (gt, ga) = want_ex[name], got_ex[name]
            report.check(wt == gt, f"exchange {name}: type {gt!r}, the workers declare {wt!r}")
            report.check({k: typed(v) for k, v in ga.items()} == {k: typed(v) for k, v in wa.items()},
                         f"exchange {name}: arguments {ga}, the workers declare {wa}")

    got_q = {}
    for q in doc.get("queues", []):
        name = q.get("name")
        report.check(name not in got_q, f"queue {name} is defined twice")
        report.check(q.get("vhost") == VHOST, f"queue {name}: vhost {q.get('vhost')!r}, expected {VHOST!r}")
        report.check(q.get("durable") is True and q.get("auto_delete") is False,
                     f"queue {name}: must be durable and not auto_delete (quorum queues are)")
        got_q[name] = q.get("arguments", {})
    for name in sorted(set(want_q) | set(got_q)):
        if name not in got_q:
            report.error(f"queue {name} is missing (topology.rs declares it)")
        elif name not in want_q:
            report.error(f"queue {name} is not one topology.rs declares")
        else:
            w, g = want_q[name], got_q[name]
            for k in sorted(set(w) | set(g)):
                if k not in g:
                    report.error(f"queue {name}: argument {k} missing (the workers declare {k} = {w[k]!r}; "
                                 "they would fail with PRECONDITION_FAILED)")
                elif k not in w:
                    report.error(f"queue {name}: argument {k} = {g[k]!r} is not one the workers declare "
                                 "(they would fail with PRECONDITION_FAILED)")
                elif typed(g[k]) != typed(w[k]):
                    report.error(f"queue {name}: argument {k} = {g[k]!r}, the workers declare {w[k]!r} "
                                 "(they would fail with PRECONDITION_FAILED)")

    got_b = set()
    for b in doc.get("bindings", []):
        report.check(b.get("vhost") == VHOST and b.get("destination_type") == "queue" and not b.get("arguments"),
                     f"binding {b}: expected vhost {VHOST!r}, destination_type queue, no arguments")
        got_b.add((b.get("source"), b.get("destination"), b.get("routing_key")))
    for s, d, k in sorted(want_b - got_b):
        report.error(f"binding {s} -> {d} ({k!r}) is missing")
    for s, d, k in sorted(got_b - want_b):
        report.error(f"binding {s} -> {d} ({k!r}) is not one topology.rs declares")

    report.ok(f"deploy/rabbitmq/definitions.json = the workers' topology: {len(want_ex)} exchanges, "
              f"{len(want_q)} quorum queues with their exact arguments, {len(want_b)} bindings "
              f"(prefix {PREFIX!r}, vhost {VHOST!r})")


def main() -> None:
    report = Report("RabbitMQ definitions match topology.rs")
    check_sources(report)
    check_definitions(report)
    report.finish()


if __name__ == "__main__":
    main()
