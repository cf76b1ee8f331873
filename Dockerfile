# syntax=docker/dockerfile:1
#
# rungen-gateway container image.
#   docker build -t rungen-gateway:0.1.0 .
#   docker run --rm rungen-gateway:0.1.0 new-token
#   docker run --rm -p 8080:8080 -v $PWD/gateway.toml:/etc/rungen-gateway/config/gateway.toml:ro \
#     rungen-gateway:0.1.0
#
# The Helm chart (helm/rungen-gateway) mounts its ConfigMap at /etc/rungen-gateway/config, the
# RunGen API keys at /etc/rungen-gateway/secrets and the TLS Secret at /etc/rungen-gateway/tls, and
# runs the same binary and arguments as the defaults below (.ci/helm-check.sh checks they agree).

# ---- build ------------------------------------------------------------------------------------
FROM rust:1-bookworm AS build
WORKDIR /src
# PGO=1 (the default): benches/pgo.sh builds the binary with profile-guided optimisation, trained
# on loopback with the mock upstream under wrk and h2load (~20 % less CPU per cache hit; see
# benches/COMPARE.md). It needs those two, openssl, curl and redis-server (cluster mode is trained
# too) from Debian, and llvm-profdata from rustup's llvm-tools component.
# --build-arg PGO=0 builds the plain `dist` profile.
ARG PGO=1
RUN if [ "$PGO" = 1 ]; then \
      apt-get update -qq \
      && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends wrk nghttp2-client openssl curl redis-server \
      && rm -rf /var/lib/apt/lists/* \
      && rustup component add llvm-tools; \
    fi
# Everything cargo needs for the binary: the manifest and lockfile, the sources, the config that
# is compiled in (src/cli.rs embeds config/demo.toml), and the bench/test targets the manifest
# declares (cargo reads every target when it loads the package).
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY config ./config
COPY benches ./benches
COPY tests ./tests
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ "$PGO" = 1 ]; then \
      SKIP_INSTALL=1 bash benches/pgo.sh >/tmp/pgo.out && bin=$(tail -n 1 /tmp/pgo.out); \
    else \
      cargo build --profile dist --locked --bin rungen-gateway && bin=target/dist/rungen-gateway; \
    fi \
    && install -D -m 0755 "$bin" /out/rungen-gateway

# ---- runtime ----------------------------------------------------------------------------------
# distroless/cc: glibc and libgcc only; no shell, no package manager. TLS roots are compiled in
# (webpki-roots), so no CA bundle is needed. The :nonroot tag's user is 65532.
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
LABEL org.opencontainers.image.title="rungen-gateway" \
      org.opencontainers.image.description="Caching reverse-proxy gateway in front of the RunGen.AI API" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="0.1.0"
COPY --from=build /out/rungen-gateway /usr/local/bin/rungen-gateway
# Numeric, so Kubernetes' runAsNonRoot can verify it. The gateway writes no files: run it with a
# read-only root filesystem (the chart does).
USER 65532:65532
# 8080: public listener; 9090: admin listener (health, readiness, metrics, reload).
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/rungen-gateway"]
CMD ["serve", "--config", "/etc/rungen-gateway/config/gateway.toml", "--log-format", "json"]
