"""The Dockerfile builds with the release command of CI and ships every binary.

No image can be built here (no Docker engine), so the check reads the
Dockerfile:

* its one `cargo build` runs exactly RELEASE_BUILD (the Makefile variable,
  passed in the environment by `make check-deploy`, else read from the
  Makefile);
* the binaries it copies out of target/release are exactly the workspace's
  binaries (`cargo metadata`, less halosync-bench, plus the workers still
  pending, see lib.PENDING): renaming or adding a binary fails the check;
* the builder's Rust is at least the workspace's rust-version, builder and
  runtime are the same Debian release (glibc), the runtime stage runs as a
  non-root numeric user, has no ENTRYPOINT, holds ca-certificates and
  /app/schemas, and copies the binaries from where the build put them;
* .dockerignore keeps target/ and .git/ out and everything the build needs in.
"""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import tomllib

from lib import ROOT, Report, cargo_metadata, rel, shipped_binaries

DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
RUNTIME_USER = "10001"


def release_build() -> str | None:
    cmd = os.environ.get("RELEASE_BUILD")
    if cmd:
        return cmd.strip()
    m = re.search(r"^RELEASE_BUILD\s*:?=\s*(.+)$", (ROOT / "Makefile").read_text(), re.M)
    return m.group(1).strip() if m else None


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comment
    lines dropped, as Docker reads them (no heredocs: this file uses none)."""
    out, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or (not buf and not s):
            continue
        if line.rstrip().endswith("\\"):
            buf += line.rstrip()[:-1] + " "
            continue
        buf += line
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), args.strip()))
        buf = ""
    if buf.strip():
        word, _, args = buf.strip().partition(" ")
        out.append((word.upper(), args.strip()))
    return out


def run_commands(args: str) -> list[str]:
    """The shell commands of a RUN (flags like --mount removed), split on
    &&, || and ;."""
    while args.startswith("--"):
        args = args.split(None, 1)[1] if " " in args else ""
    return [c.strip() for c in re.split(r"&&|\|\||;", args) if c.strip()]


def stages(instrs):
    """[(FROM args, [instructions])]"""
    out = []
    for word, args in instrs:
        if word == "FROM":
            out.append((args, []))
        elif out:
            out[-1][1].append((word, args))
    return out


def check_dockerignore(report: Report) -> None:
    if not report.check(DOCKERIGNORE.is_file(), ".dockerignore is missing (the context would include target/)"):
        return
    patterns = []
    for line in DOCKERIGNORE.read_text().splitlines():
        s = line.strip()
        if s and not s.startswith("#"):
            patterns.append(s)

    def ignored(path: str) -> bool:
        result = False
        for p in patterns:
            neg = p.startswith("!")
            pat = p.lstrip("!").strip("/")
            parts = path.split("/")
            hit = any(fnmatch.fnmatch("/".join(parts[: i + 1]), pat) for i in range(len(parts)))
            if pat.startswith("**/"):
                hit = hit or any(fnmatch.fnmatch(x, pat[3:]) for x in parts)
            if hit:
                result = not neg
        return result

    for must in ("target", ".git"):
        report.check(ignored(must), f".dockerignore must exclude {must}/")
    meta = cargo_metadata()
    needed = {"Cargo.toml", "Cargo.lock", "schemas/envelope.schema.json", "schemas/examples/valid"}
    for pkg in meta["packages"]:
        needed.add(str((ROOT / pkg["manifest_path"]).relative_to(ROOT)))
        for t in pkg["targets"]:
            needed.add(str((ROOT / t["src_path"]).relative_to(ROOT)))
    for path in sorted(needed):
        report.check(not ignored(path), f".dockerignore excludes {path}, which the build needs")
    report.ok(f".dockerignore excludes target/ and .git/ and keeps the {len(needed)} files and folders the build needs")


def main() -> None:
    report = Report("Dockerfile builds with RELEASE_BUILD and ships every binary")
    expected = shipped_binaries(report)
    cmd = release_build()
    if not report.check(cmd, "RELEASE_BUILD is neither in the environment nor in the Makefile"):
        report.finish()
    instrs = instructions(DOCKERFILE.read_text())
    st = stages(instrs)
    if not report.check(len(st) >= 2, "the Dockerfile must be multi-stage (builder + runtime)"):
        report.finish()

    # --- the build step
    builds = []
    for i, (_, body) in enumerate(st):
        for word, args in body:
            if word == "RUN":
                builds += [(i, c) for c in run_commands(args) if re.match(r"cargo\s+build\b", c)]
    if report.check(len(builds) == 1, f"expected exactly one `cargo build` in the Dockerfile, found {len(builds)}"):
        _, got = builds[0]
        report.check(shlex.split(got) == shlex.split(cmd),
                     f"the Dockerfile builds with `{got}`, CI's RELEASE_BUILD is `{cmd}`")
        report.ok(f"the Dockerfile's build step runs exactly `{cmd}`")
    build_stage = builds[0][0] if builds else 0
    builder_from, builder_body = st[build_stage]

    # --- the binaries copied out of target/release
    copied, out_dirs = set(), set()
    for word, args in builder_body:
        if word == "RUN":
            for c in run_commands(args):
                names = re.findall(r"target/release/([A-Za-z0-9_.-]+)", c)
                copied |= set(names)
                if names:
                    m = re.search(r"-t\s+(\S+)", c)
                    if report.check(m, f"copying binaries without `install -t DIR`: {c[:80]}..."):
                        out_dirs.add(m.group(1).rstrip("/"))
    missing, extra = expected - copied, copied - expected
    report.check(not missing, f"the Dockerfile does not copy {sorted(missing)} (workspace binaries)")
    report.check(not extra, f"the Dockerfile copies {sorted(extra)}, which the workspace does not build "
                            "(renamed or removed?)")
    if not missing and not extra:
        report.ok(f"the image ships exactly the workspace's binaries: {', '.join(sorted(expected))}")

    # --- builder image: Rust >= rust-version, Debian release
    ws = tomllib.loads((ROOT / "Cargo.toml").read_text())
    need = ws.get("workspace", {}).get("package", {}).get("rust-version", "0")
    m = re.match(r"rust:(\d+)\.(\d+)(?:\.\d+)?-(\w+)\s+AS\s+(\S+)", builder_from, re.I)
    runtime_from, runtime_body = st[-1]
    r = re.match(r"debian:(\w+)-slim\b", runtime_from)
    if report.check(m, f"builder must be FROM rust:X.Y-<debian> AS NAME, found `{builder_from}`"):
        have = (int(m.group(1)), int(m.group(2)))
        want = tuple(int(x) for x in need.split(".")[:2])
        report.check(have >= want, f"builder Rust {have[0]}.{have[1]} < the workspace's rust-version {need}")
        if report.check(r, f"runtime must be FROM debian:<release>-slim, found `{runtime_from}`"):
            report.check(m.group(3) == r.group(1),
                         f"builder is Debian {m.group(3)}, runtime Debian {r.group(1)}: glibc must match")
        stage_name = m.group(4)
        report.ok(f"builder {builder_from.split()[0]} (rust-version {need}), runtime {runtime_from.split()[0]}")

        # --- runtime stage
        copies = [a for w, a in runtime_body if w == "COPY"]
        from_builder = [a for a in copies if a.startswith(f"--from={stage_name} ")]
        srcs = {a.split()[1].rstrip("/") for a in from_builder}
        report.check(out_dirs and out_dirs <= srcs,
                     f"runtime copies {sorted(srcs)} from {stage_name}, the binaries were installed in {sorted(out_dirs)}")
        report.check(any(a.split()[1:] and a.split()[-1].rstrip("/") == "/usr/local/bin" for a in from_builder),
                     "the binaries must land in /usr/local/bin (on PATH: services run them by name)")
    report.check(any(re.match(r"schemas/?\s+/app/schemas/?$", a) for w, a in runtime_body if w == "COPY"),
                 "runtime must COPY schemas/ /app/schemas/ (compose's setup publishes /app/schemas/examples/valid)")
    users = [a for w, a in runtime_body if w == "USER"]
    report.check(users and users[-1].split(":")[0] == RUNTIME_USER,
                 f"runtime must end with USER {RUNTIME_USER} (numeric, non-root: runAsNonRoot needs a number), found {users}")
    report.check(not any(w == "ENTRYPOINT" for w, _ in runtime_body),
                 "runtime must not set an ENTRYPOINT: each service sets its command")
    report.check(any("ca-certificates" in a for w, a in runtime_body if w == "RUN"),
                 "runtime must install ca-certificates (HaloPSA is reached over HTTPS)")
    report.check(any(w == "EXPOSE" and "9090" in a.split() for w, a in runtime_body),
                 "runtime should EXPOSE 9090 (worker.health_port)")
    report.ok(f"runtime stage: USER {RUNTIME_USER}, no ENTRYPOINT, ca-certificates, /app/schemas, binaries in /usr/local/bin")

    check_dockerignore(report)
    report.note(f"{rel(DOCKERFILE)} is read, not built: no container engine is needed")
    report.finish()


if __name__ == "__main__":
    main()
