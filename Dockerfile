# syntax=docker/dockerfile:1
#
# One image holds every halosync binary: the four workers, the operator's
# tool `halosync` and the simulator `halo-sim`. It has no ENTRYPOINT: each
# service (deploy/compose.yaml, deploy/k8s/) sets its command.
#
#   docker build -t halosync:dev .
#   docker run --rm halosync:dev halosync --help
#
# `make check-deploy` (deploy/checks/dockerfile.py) checks that the build
# step below runs exactly the Makefile's RELEASE_BUILD and that the binaries
# copied are exactly the workspace's binaries (cargo metadata), so renaming
# or adding a binary without updating this file fails the check.

############################ builder ############################
FROM rust:1.95-bookworm AS builder

# aws-lc-sys (rustls' crypto) builds with the C compiler alone on x86_64 and
# aarch64 Linux; cmake is its fallback builder on other targets.
RUN apt-get update \
 && apt-get install -y --no-install-recommends cmake \
 && rm -rf /var/lib/apt/lists/*

WORKDIR /src
COPY . .

# The crates.io index, the downloaded crates and target/ live in BuildKit
# cache mounts, so a rebuild after a code change only recompiles the
# workspace's own crates. target/ is a cache mount, so the binaries are
# copied out to /out/bin in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/usr/local/cargo/git,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    cargo build --release --locked --workspace --bins \
 && install -D -m 0755 -t /out/bin \
      target/release/halosync \
      target/release/halo-sim \
      target/release/halosync-account \
      target/release/halosync-subscription \
      target/release/halosync-usage \
      target/release/halosync-overage

############################ runtime ############################
# Same Debian release as the builder, so the binaries find the glibc they
# were linked against.
FROM debian:bookworm-slim AS runtime

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 halosync \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin halosync \
 && install -d -o 10001 -g 10001 -m 0750 /var/lib/halosync
# /var/lib/halosync: the console's audit trail (console.audit_file); a
# volume mounted there takes this owner, so the non-root user can write it.

COPY --from=builder /out/bin/ /usr/local/bin/
# `halosync publish /app/schemas/examples/valid` (compose's setup service)
# and anyone validating events by hand use these; the workers embed them.
COPY schemas/ /app/schemas/

WORKDIR /app
ENV HALOSYNC_CONFIG=/etc/halosync/halosync.toml \
    RUST_LOG=info
# worker.health_port: /metrics, /healthz, /readyz; 8088: halosync console
EXPOSE 9090 8088
USER 10001:10001
CMD ["halosync", "--help"]

LABEL org.opencontainers.image.title="halosync" \
      org.opencontainers.image.description="HaloPSA sync workers, operator tool and simulator" \
      org.opencontainers.image.licenses="Apache-2.0"
