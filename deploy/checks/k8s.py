"""Kubernetes manifests: what kubernetes-validate cannot see.

check-deploy.sh runs `kubernetes-validate --strict` on every manifest
(built-in kinds against the Kubernetes schemas). This script adds:

* the KEDA resources (ScaledObject, TriggerAuthentication) and
  kustomization.yaml, which are not Kubernetes built-ins, against the JSON
  Schemas in deploy/checks/schemas/ (written for the fields halosync uses;
  strict: an unknown or misspelt field is an error);
* that every document is of a kind one of the two validators covers;
* the cross-references no schema can check: one Deployment, PDB and
  ScaledObject per worker binary of the workspace; probes on /healthz and
  /readyz at worker.health_port; terminationGracePeriodSeconds above
  worker.shutdown_grace; non-root, read-only root filesystem; requests
  and limits; KEDA on the worker's own queue; every ConfigMap, Secret and
  key referenced exists; halosync.toml's client_secret_file names a key of
  the mounted Secret; prefix and retry tiers match definitions.json;
  kustomization.yaml lists every manifest;
* the console (console.yaml): one replica, Recreate, `halosync console
  --listen 0.0.0.0:PORT`, probes on /healthz at that port, a Service whose
  selector and targetPort reach it, console.audit_file on a mounted
  PersistentVolumeClaim that exists, each user's password_hash_file a key
  of a mounted Secret, non-root and read-only like the workers.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath

import jsonschema
import yaml

from lib import (DEPLOY, HEALTH_PORT, Report, check_config_against_definitions, duration_seconds, family,
                 load_toml, load_yaml_docs, rel, shipped_binaries, workers)

K8S = DEPLOY / "k8s"
SCHEMAS = DEPLOY / "checks" / "schemas"
CRD_SCHEMAS = {
    ("keda.sh/v1alpha1", "ScaledObject"): "keda-scaledobject.schema.json",
    ("keda.sh/v1alpha1", "TriggerAuthentication"): "keda-triggerauthentication.schema.json",
}
# Built-in kinds used here, validated by kubernetes-validate.
BUILTIN = {("v1", "Namespace"), ("v1", "ConfigMap"), ("v1", "Secret"),
           ("apps/v1", "Deployment"), ("policy/v1", "PodDisruptionBudget"),
           ("v1", "Service"), ("v1", "PersistentVolumeClaim"), ("batch/v1", "CronJob")}
CONSOLE = "halosync-console"
RECONCILE = "halosync-reconcile"
NAMESPACE = "halosync"


def schema(name: str) -> dict:
    return json.loads((SCHEMAS / name).read_text())


def validate(doc: dict, sch: dict, where: str, report: Report) -> None:
    v = jsonschema.Draft202012Validator(sch)
    for e in sorted(v.iter_errors(doc), key=lambda e: list(e.absolute_path)):
        path = "/".join(str(p) for p in e.absolute_path) or "(top)"
        report.error(f"{where}: {path}: {e.message}")


def quantity(q: str) -> float:
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for u in sorted(units, key=len, reverse=True):
        if str(q).endswith(u):
            return float(str(q)[: -len(u)]) * units[u]
    return float(q)


def main() -> None:
    report = Report("Kubernetes manifests: KEDA schemas and cross-references")
    binaries = shipped_binaries(report, notes=False)
    want_workers = workers(binaries)

    # --- kustomization.yaml lists every manifest
    kz_path = K8S / "kustomization.yaml"
    kz = yaml.safe_load(kz_path.read_text())
    validate(kz, schema("kustomization.schema.json"), rel(kz_path), report)
    files = sorted(str(p.relative_to(K8S)) for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")
    listed = sorted(kz.get("resources", []))
    report.check(files == listed,
                 f"kustomization.yaml resources {listed} != the manifests in deploy/k8s {files}")
    report.check(kz.get("namespace") == NAMESPACE, f"kustomization.yaml namespace must be {NAMESPACE}")
    report.ok(f"kustomization.yaml against schemas/kustomization.schema.json; it lists all {len(files)} manifests")

    # --- every document: a kind some validator covers; CRDs against their schema
    docs: dict[tuple[str, str], dict] = {}
    where: dict[tuple[str, str], str] = {}
    crd_count = 0
    for f in files:
        for doc in load_yaml_docs(K8S / f):
            kind, api = doc.get("kind"), doc.get("apiVersion")
            name = doc.get("metadata", {}).get("name")
            w = f"{f} {kind}/{name}"
            if (api, kind) in CRD_SCHEMAS:
                validate(doc, schema(CRD_SCHEMAS[(api, kind)]), w, report)
                crd_count += 1
            elif (api, kind) not in BUILTIN:
                report.error(f"{w}: {api} {kind} is validated by nothing here; add it to BUILTIN "
                             "(if Kubernetes knows it) or write a schema in deploy/checks/schemas/")
            if kind != "Namespace":
                report.check(doc.get("metadata", {}).get("namespace") == NAMESPACE,
                             f"{w}: metadata.namespace must be {NAMESPACE}")
            report.check((kind, name) not in docs, f"{w}: defined twice")
            docs[(kind, name)] = doc
            where[(kind, name)] = w
    report.check(("Namespace", NAMESPACE) in docs, f"no Namespace {NAMESPACE}")
    report.ok(f"{crd_count} KEDA resources against schemas/keda-*.schema.json; "
              f"every other document is a built-in kind (validated by kubernetes-validate)")

    def get(kind: str, name: str, ctx: str) -> dict | None:
        d = docs.get((kind, name))
        report.check(d is not None, f"{ctx}: refers to {kind} {name}, which no manifest defines")
        return d

    def secret_keys(name: str, ctx: str) -> set[str]:
        s = get("Secret", name, ctx) or {}
        return set(s.get("stringData", {})) | set(s.get("data", {}))

    def cm_data(name: str, ctx: str) -> dict:
        return (get("ConfigMap", name, ctx) or {}).get("data", {})

    # --- every Deployment is a worker of the workspace, and vice versa
    deployments = sorted(n for k, n in docs if k == "Deployment" and n != CONSOLE)
    report.check(deployments == want_workers,
                 f"Deployments {deployments} != the workspace's workers {want_workers}")

    configs_seen = {}
    for w in want_workers:
        ctx = f"Deployment {w}"
        dep = docs.get(("Deployment", w))
        if not report.check(dep, f"{w}: no Deployment (workers/{family(w)}.yaml)"):
            continue
        spec = dep["spec"]
        report.check("replicas" not in spec, f"{ctx}: spec.replicas is set; KEDA owns it (leave it out)")
        tpl = spec["template"]
        labels = tpl["metadata"].get("labels", {})
        sel = spec["selector"].get("matchLabels", {})
        report.check(sel and all(labels.get(k) == v for k, v in sel.items()),
                     f"{ctx}: selector {sel} does not match the pod labels {labels}")
        pod = tpl["spec"]
        cs = pod["containers"]
        if not report.check(len(cs) == 1, f"{ctx}: expected one container, found {len(cs)}"):
            continue
        c = cs[0]
        report.check(c.get("command") == [w], f"{ctx}: command {c.get('command')} must be [{w!r}]")
        report.check(str(c.get("image", "")).split(":")[0].split("/")[-1] == "halosync",
                     f"{ctx}: image {c.get('image')} is not the halosync image")

        # environment: ConfigMaps and Secrets it names exist with those keys
        env = {}
        for ef in c.get("envFrom", []):
            if "configMapRef" in ef:
                env.update(cm_data(ef["configMapRef"]["name"], ctx))
            if "secretRef" in ef:
                env.update({k: "(secret)" for k in secret_keys(ef["secretRef"]["name"], ctx)})
        for e in c.get("env", []):
            vf = e.get("valueFrom", {})
            if "secretKeyRef" in vf:
                r = vf["secretKeyRef"]
                report.check(r["key"] in secret_keys(r["name"], ctx),
                             f"{ctx}: env {e['name']} refers to key {r['key']} of Secret {r['name']}, which it lacks")
                env[e["name"]] = "(secret)"
            elif "configMapKeyRef" in vf:
                r = vf["configMapKeyRef"]
                report.check(r["key"] in cm_data(r["name"], ctx),
                             f"{ctx}: env {e['name']} refers to key {r['key']} of ConfigMap {r['name']}, which it lacks")
                env[e["name"]] = cm_data(r["name"], ctx).get(r["key"])
            else:
                env[e["name"]] = e.get("value")
        for var in ("AMQP_URL", "REDIS_URL"):
            report.check(env.get(var) == "(secret)", f"{ctx}: {var} must come from a Secret (it holds credentials)")

        # volumes: the config file the worker reads, the secret files
        vols = {v["name"]: v for v in pod.get("volumes", [])}
        mounts = {}
        for m in c.get("volumeMounts", []):
            v = vols.get(m["name"])
            if report.check(v, f"{ctx}: volumeMount {m['name']} has no volume"):
                mounts[m["mountPath"].rstrip("/")] = v
        cfg_path = env.get("HALOSYNC_CONFIG") or "halosync.toml"
        p = PurePosixPath(cfg_path)
        v = mounts.get(str(p.parent))
        cfg = None
        if report.check(v and "configMap" in v, f"{ctx}: HALOSYNC_CONFIG={cfg_path} is not in a mounted ConfigMap"):
            cm = v["configMap"]["name"]
            text = cm_data(cm, ctx).get(p.name)
            if report.check(text, f"{ctx}: ConfigMap {cm} has no key {p.name} (HALOSYNC_CONFIG={cfg_path})"):
                if cm not in configs_seen:
                    configs_seen[cm] = load_toml(text, f"ConfigMap {cm} {p.name}", report)
                cfg = configs_seen[cm]
        secret_files = {}
        for mp, vol in mounts.items():
            if "secret" in vol:
                sname = vol["secret"]["secretName"]
                for k in secret_keys(sname, ctx):
                    secret_files[f"{mp}/{k}"] = sname
        if cfg is not None:
            for name, conn in cfg.get("connections", {}).items():
                if "client_secret_file" in conn:
                    report.check(conn["client_secret_file"] in secret_files,
                                 f"{ctx}: connections.{name}.client_secret_file = {conn['client_secret_file']} "
                                 f"is not a key of a mounted Secret (mounted: {sorted(secret_files)})")
                if "client_secret_env" in conn:
                    report.check(env.get(conn["client_secret_env"]) == "(secret)",
                                 f"{ctx}: connections.{name}.client_secret_env = {conn['client_secret_env']} "
                                 "is not set from a Secret")
        worker_cfg = (cfg or {}).get("worker", {})
        port = worker_cfg.get("health_port", 0)
        grace = duration_seconds(worker_cfg, "shutdown_grace", "shutdown_grace", 1, 30)

        # probes on the health port
        ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
        report.check(HEALTH_PORT in ports.values(), f"{ctx}: no containerPort {HEALTH_PORT}")

        def probe(kind: str, path: str) -> None:
            pr = c.get(kind)
            if not report.check(pr and "httpGet" in pr, f"{ctx}: {kind} must be an httpGet on {path}"):
                return
            hg = pr["httpGet"]
            pp = ports.get(hg["port"], hg["port"])
            report.check(hg.get("path") == path, f"{ctx}: {kind} path {hg.get('path')} must be {path}")
            report.check(pp == port, f"{ctx}: {kind} port {hg['port']} ({pp}) != worker.health_port {port}")

        probe("livenessProbe", "/healthz")
        probe("readinessProbe", "/readyz")
        if c.get("startupProbe"):
            probe("startupProbe", "/healthz")
        ann = tpl["metadata"].get("annotations", {})
        report.check(ann.get("prometheus.io/scrape") == "true" and ann.get("prometheus.io/port") == str(port)
                     and ann.get("prometheus.io/path", "/metrics") == "/metrics",
                     f"{ctx}: prometheus.io annotations must scrape /metrics on {port}")

        # graceful termination
        tg = pod.get("terminationGracePeriodSeconds", 30)
        report.check(tg > grace, f"{ctx}: terminationGracePeriodSeconds {tg} must exceed "
                                 f"worker.shutdown_grace {grace} (else SIGKILL cuts in-flight messages)")

        # security
        psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
        report.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0,
                     f"{ctx}: pod must run as non-root (runAsNonRoot: true, runAsUser != 0)")
        report.check(csc.get("readOnlyRootFilesystem") is True, f"{ctx}: readOnlyRootFilesystem must be true")
        report.check(csc.get("allowPrivilegeEscalation") is False, f"{ctx}: allowPrivilegeEscalation must be false")
        report.check("ALL" in csc.get("capabilities", {}).get("drop", []), f"{ctx}: capabilities must drop ALL")

        # resources
        res = c.get("resources", {})
        for r in ("cpu", "memory"):
            rq, lm = res.get("requests", {}).get(r), res.get("limits", {}).get(r)
            if report.check(rq and lm, f"{ctx}: resources.requests and limits must both set {r}"):
                report.check(quantity(rq) <= quantity(lm), f"{ctx}: {r} request {rq} above limit {lm}")

        # PodDisruptionBudget
        pdb = docs.get(("PodDisruptionBudget", w))
        if report.check(pdb, f"{w}: no PodDisruptionBudget"):
            psel = pdb["spec"].get("selector", {}).get("matchLabels", {})
            report.check(psel and all(labels.get(k) == v for k, v in psel.items()),
                         f"PodDisruptionBudget {w}: selector {psel} does not select the worker's pods")
            report.check("maxUnavailable" in pdb["spec"] or "minAvailable" in pdb["spec"],
                         f"PodDisruptionBudget {w}: needs maxUnavailable or minAvailable")

        # KEDA ScaledObject on the worker's queue
        so = docs.get(("ScaledObject", w))
        if report.check(so, f"{w}: no ScaledObject"):
            s = so["spec"]
            ref = s.get("scaleTargetRef", {})
            report.check(ref.get("name") == w and ref.get("kind", "Deployment") == "Deployment",
                         f"ScaledObject {w}: scaleTargetRef {ref} must be Deployment {w}")
            lo, hi = s.get("minReplicaCount", 0), s.get("maxReplicaCount", 100)
            report.check(1 <= lo <= hi, f"ScaledObject {w}: need 1 <= minReplicaCount ({lo}) <= maxReplicaCount ({hi})")
            queue = f"{(cfg or {}).get('prefix', '')}halosync.{family(w)}"
            rabbit = [t for t in s.get("triggers", []) if t.get("type") == "rabbitmq"]
            if report.check(len(rabbit) == 1, f"ScaledObject {w}: expected one rabbitmq trigger"):
                t = rabbit[0]
                report.check(t["metadata"].get("queueName") == queue,
                             f"ScaledObject {w}: queueName {t['metadata'].get('queueName')} must be {queue}")
                report.check(t["metadata"].get("mode") == "QueueLength",
                             f"ScaledObject {w}: mode must be QueueLength (queue depth)")
                an = t.get("authenticationRef", {}).get("name")
                ta = get("TriggerAuthentication", an, f"ScaledObject {w}") if an else None
                for r in (ta or {}).get("spec", {}).get("secretTargetRef", []):
                    report.check(r["key"] in secret_keys(r["name"], f"TriggerAuthentication {an}"),
                                 f"TriggerAuthentication {an}: Secret {r['name']} has no key {r['key']}")
                if ta:
                    params = {r["parameter"] for r in ta["spec"].get("secretTargetRef", [])}
                    report.check("host" in params, f"TriggerAuthentication {an}: must provide `host`")

    check_console(docs, get, secret_keys, cm_data, report)
    check_reconcile(docs, get, secret_keys, cm_data, report)

    for cm, cfg in configs_seen.items():
        if cfg is not None:
            check_config_against_definitions(cfg, f"ConfigMap {cm} halosync.toml", report)
            report.ok(f"ConfigMap {cm} halosync.toml: valid TOML, health_port {HEALTH_PORT}, prefix and retry tiers "
                      "= deploy/rabbitmq/definitions.json, secrets by file from the mounted Secret")
    for kind in ("PodDisruptionBudget", "ScaledObject"):
        extra = sorted(n for k, n in docs if k == kind and n not in want_workers)
        report.check(not extra, f"{kind} {extra} for no worker of the workspace")
    report.ok(f"per worker ({', '.join(want_workers)}): Deployment (command, probes /healthz + /readyz on "
              f"{HEALTH_PORT}, grace > shutdown_grace, non-root, read-only root, requests/limits, "
              "Prometheus annotations, Secret/ConfigMap refs), PodDisruptionBudget, KEDA ScaledObject on its queue")
    report.finish()


def check_console(docs, get, secret_keys, cm_data, report: Report) -> None:
    ctx = f"Deployment {CONSOLE}"
    dep = docs.get(("Deployment", CONSOLE))
    if not report.check(dep, f"no Deployment {CONSOLE} (console.yaml)"):
        return
    spec = dep["spec"]
    report.check(spec.get("replicas") == 1, f"{ctx}: replicas must be 1 (sessions live in the process)")
    report.check(spec.get("strategy", {}).get("type") == "Recreate",
                 f"{ctx}: strategy must be Recreate (one pod holds the ReadWriteOnce audit volume)")
    tpl = spec["template"]
    labels = tpl["metadata"].get("labels", {})
    sel = spec["selector"].get("matchLabels", {})
    report.check(sel and all(labels.get(k) == v for k, v in sel.items()),
                 f"{ctx}: selector {sel} does not match the pod labels {labels}")
    pod = tpl["spec"]
    c = pod["containers"][0]
    cmd = c.get("command", [])
    report.check(cmd[:2] == ["halosync", "console"] and "--listen" in cmd,
                 f"{ctx}: command {cmd} must be halosync console --listen 0.0.0.0:PORT")
    listen = cmd[cmd.index("--listen") + 1] if "--listen" in cmd and cmd.index("--listen") + 1 < len(cmd) else ""
    report.check(listen.startswith("0.0.0.0:"), f"{ctx}: --listen {listen!r} must be 0.0.0.0:PORT (reachable from the Service)")
    port = int(listen.rsplit(":", 1)[-1]) if listen.rsplit(":", 1)[-1].isdigit() else None
    ports = {p.get("name"): p["containerPort"] for p in c.get("ports", [])}
    report.check(port in ports.values(), f"{ctx}: no containerPort {port} (the --listen port)")
    for kind in ("livenessProbe", "readinessProbe"):
        hg = (c.get(kind) or {}).get("httpGet", {})
        report.check(hg.get("path") == "/healthz" and ports.get(hg.get("port"), hg.get("port")) == port,
                     f"{ctx}: {kind} must GET /healthz on {port}")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    report.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{ctx}: must run as non-root")
    report.check(csc.get("readOnlyRootFilesystem") is True, f"{ctx}: readOnlyRootFilesystem must be true")
    env = {e["name"]: "(secret)" for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
    for var in ("AMQP_URL", "REDIS_URL"):
        report.check(env.get(var) == "(secret)", f"{ctx}: {var} must come from a Secret")
    # The Service reaches the pod.
    svc = get("Service", CONSOLE, ctx) or {}
    ssel = svc.get("spec", {}).get("selector", {})
    report.check(ssel and all(labels.get(k) == v for k, v in ssel.items()),
                 f"Service {CONSOLE}: selector {ssel} does not select the console's pods")
    for sp in svc.get("spec", {}).get("ports", []):
        tp = sp.get("targetPort", sp.get("port"))
        report.check(ports.get(tp, tp) == port, f"Service {CONSOLE}: targetPort {tp} is not the console's port {port}")
    # Volumes: the config, the audit file on a PVC, the users' hash files.
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): vols.get(m["name"], {}) for m in c.get("volumeMounts", [])}
    cfg_vol = mounts.get("/etc/halosync", {})
    text = cm_data(cfg_vol.get("configMap", {}).get("name", ""), ctx).get("halosync.toml") if cfg_vol else None
    if not report.check(text, f"{ctx}: no halosync.toml ConfigMap mounted at /etc/halosync"):
        return
    cfg = load_toml(text, f"{ctx} halosync.toml", report) or {}
    console = cfg.get("console", {})
    if not report.check(console.get("users"), f"{ctx}: halosync.toml has no [console.users.NAME]: nobody could sign in"):
        return
    audit = PurePosixPath(console.get("audit_file", "halosync-audit.jsonl"))
    av = mounts.get(str(audit.parent), {})
    if report.check("persistentVolumeClaim" in av,
                    f"{ctx}: console.audit_file {audit} is not on a mounted PersistentVolumeClaim (it would be lost on restart)"):
        get("PersistentVolumeClaim", av["persistentVolumeClaim"]["claimName"], ctx)
    secret_files = set()
    for mp, vol in mounts.items():
        if "secret" in vol:
            secret_files |= {f"{mp}/{k}" for k in secret_keys(vol["secret"]["secretName"], ctx)}
    for name, u in console["users"].items():
        report.check(u.get("role") in ("viewer", "operator"), f"{ctx}: console.users.{name}.role must be viewer or operator")
        f = u.get("password_hash_file")
        report.check(f in secret_files, f"{ctx}: console.users.{name}.password_hash_file = {f} is not a key of a "
                                        f"mounted Secret (mounted: {sorted(secret_files)})")
    report.ok(f"{CONSOLE}: one replica (Recreate), halosync console on {port}, /healthz probes, Service, audit file "
              f"on a PersistentVolumeClaim, {len(console['users'])} user(s) with hashes from a mounted Secret")


def check_reconcile(docs, get, secret_keys, cm_data, report: Report) -> None:
    """The nightly `halosync reconcile` CronJob: the command, a configured
    connection, the snapshot on a mounted volume, the config and secrets
    the workers use, never retried."""
    ctx = f"CronJob {RECONCILE}"
    cj = docs.get(("CronJob", RECONCILE))
    if not report.check(cj, f"no CronJob {RECONCILE} (reconcile.yaml)"):
        return
    spec = cj["spec"]
    report.check(spec.get("concurrencyPolicy") == "Forbid", f"{ctx}: concurrencyPolicy must be Forbid (one read at a time)")
    job = spec["jobTemplate"]["spec"]
    report.check(job.get("backoffLimit") == 0, f"{ctx}: backoffLimit must be 0 (exit 1 = drift found, not a failure to retry)")
    pod = job["template"]["spec"]
    report.check(pod.get("restartPolicy") == "Never", f"{ctx}: restartPolicy must be Never")
    c = pod["containers"][0]
    cmd = c.get("command", [])
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    secret_env = {e["name"] for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}

    def arg(flag: str) -> str:
        v = cmd[cmd.index(flag) + 1] if flag in cmd and cmd.index(flag) + 1 < len(cmd) else ""
        m = re.fullmatch(r"\$\((\w+)\)", v)
        return env.get(m.group(1), "") if m else v

    report.check(cmd[:2] == ["halosync", "reconcile"], f"{ctx}: command {cmd} must be halosync reconcile ...")
    for var in ("AMQP_URL", "REDIS_URL"):
        report.check(var in secret_env, f"{ctx}: {var} must come from a Secret")
    psc, csc = pod.get("securityContext", {}), c.get("securityContext", {})
    report.check(psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) != 0, f"{ctx}: must run as non-root")
    report.check(csc.get("readOnlyRootFilesystem") is True, f"{ctx}: readOnlyRootFilesystem must be true")
    vols = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["mountPath"].rstrip("/"): vols.get(m["name"], {}) for m in c.get("volumeMounts", [])}
    snap = PurePosixPath(arg("--snapshot"))
    sv = mounts.get(str(snap.parent), {})
    if report.check("persistentVolumeClaim" in sv,
                    f"{ctx}: the snapshot {snap} is not on a mounted PersistentVolumeClaim"):
        get("PersistentVolumeClaim", sv["persistentVolumeClaim"]["claimName"], ctx)
    cfg_vol = mounts.get("/etc/halosync", {})
    text = cm_data(cfg_vol.get("configMap", {}).get("name", ""), ctx).get("halosync.toml") if cfg_vol else None
    if not report.check(text, f"{ctx}: no halosync.toml ConfigMap mounted at /etc/halosync"):
        return
    cfg = load_toml(text, f"{ctx} halosync.toml", report) or {}
    conn = arg("--connection")
    if report.check(conn in cfg.get("connections", {}), f"{ctx}: --connection {conn!r} is not a connection of halosync.toml"):
        f = cfg["connections"][conn].get("client_secret_file")
        if f:
            secret_files = set()
            for mp, vol in mounts.items():
                if "secret" in vol:
                    secret_files |= {f"{mp}/{k}" for k in secret_keys(vol["secret"]["secretName"], ctx)}
            report.check(f in secret_files, f"{ctx}: client_secret_file {f} is not a key of a mounted Secret")
    report.ok(f"{RECONCILE}: CronJob ({spec.get('schedule')}), halosync reconcile --connection {conn} on {snap} "
              "(mounted PersistentVolumeClaim), config and client secret mounted, never retried")


if __name__ == "__main__":
    main()
