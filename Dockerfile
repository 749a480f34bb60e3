# syntax=docker/dockerfile:1.7
#
# One image with every tickfleet binary: tickfleet-worker, tickfleet-api, tickfleet-operator,
# tickfleet-connector, tickctl and crdgen, in /usr/local/bin (plus tickfleet-probe, a healthcheck helper; see docker/healthprobe.rs).
#
# Why one image and not one per component: the binaries share almost all of their code and
# dependencies (librdkafka, tokio, the store), so one `cargo build` produces them all and one image
# layer holds them; a TickPipeline names a single `spec.image` for its workers and api, the operator
# can run the same tag, and a release is one artifact to sign, scan and pin. The cost is a few MB of
# binaries a given pod does not run. Each pod picks its program with `command:`.
#
#   docker build -t ghcr.io/tickfleet/tickfleet:dev .
#
# Build stage: the same cargo invocation as CI (scripts/test.sh) plus --release. The check
# scripts/check-packaging.sh fails when the two drift apart.
ARG RUST_VERSION=1.95
FROM docker.io/library/rust:${RUST_VERSION}-bookworm AS build
WORKDIR /src
# librdkafka is built from source by rdkafka-sys (gcc + make, both in this image). zlib is linked
# statically so the runtime image needs nothing beyond glibc and libgcc.
ENV LIBZ_SYS_STATIC=1 \
    CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0
COPY . .
# The cache mounts keep the registry and target dir between builds (BuildKit); binaries are copied
# out of the cached target dir into /out. The list of binaries comes from cargo's own JSON messages
# ("executable" of each built bin target), so a new binary in the workspace (tickfleet-api) is
# picked up without editing this file.
RUN --mount=type=cache,target=/usr/local/cargo/registry,sharing=locked \
    --mount=type=cache,target=/src/target,sharing=locked \
    set -eu; \
    cargo build --release --locked --workspace --bins --message-format=json-render-diagnostics > /tmp/build.json; \
    mkdir -p /out; \
    grep -o '"executable":"[^"]*"' /tmp/build.json | cut -d'"' -f4 | sort -u | xargs -r -I{} cp {} /out/; \
    for bin in tickfleet-worker tickfleet-operator tickfleet-connector tickctl crdgen; do test -x "/out/$bin"; done; \
    if [ -f api/Cargo.toml ]; then test -x /out/tickfleet-api; fi; \
    rustc --edition 2024 -O -C strip=symbols -D warnings -o /out/tickfleet-probe docker/healthprobe.rs; \
    ls -l /out; \
    mkdir -p /data/var/lib/tickfleet

# Runtime: distroless cc (glibc, libgcc, CA certificates, tzdata; no shell, no package manager),
# the `nonroot` variant runs as uid/gid 65532, which the operator's pods also set.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="tickfleet" \
      org.opencontainers.image.description="Kafka market ticks into Redis: worker, api, operator, exchange connector and tickctl" \
      org.opencontainers.image.source="https://github.com/tickfleet/tickfleet" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/ /usr/local/bin/
# A writable directory for tickctl's reports; docker-compose mounts a named volume here, and a new
# volume takes this directory's owner, so uid 65532 can write to it.
COPY --from=build --chown=65532:65532 /data/ /
USER 65532:65532
# worker admin port, api gRPC and admin ports, operator admin port
EXPOSE 9090 50051 9091 8080
# No sensible default process for a multi-binary image: say what is in it.
CMD ["/usr/local/bin/tickctl", "--help"]
