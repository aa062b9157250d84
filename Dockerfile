# wscluster container image.
#
#   docker build -t ghcr.io/wscluster/wscluster:0.1.0 .
#   docker run --rm -p 8080:8080 -e WSC_DEV=1 ghcr.io/wscluster/wscluster:0.1.0
#
# The Helm chart (helm/wscluster) runs this image as uid 10001 with a
# read-only root filesystem and every capability dropped.

# ---- build -------------------------------------------------------------------
FROM rust:1-bookworm AS builder
WORKDIR /src
# .dockerignore keeps target/, .git/, .cache/ and helm/ out of the context.
# The workspace's other members (bench/, testkit/) are copied for cargo to
# read the workspace, but only the server package is built.
COPY . .
RUN cargo build --release --locked -p wscluster --bin wscluster \
 && install -D -m 0755 target/release/wscluster /out/wscluster

# ---- run ---------------------------------------------------------------------
FROM debian:bookworm-slim
# ca-certificates: rediss:// (TLS) connections verify the server certificate.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 wscluster \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin wscluster
COPY --from=builder /out/wscluster /usr/local/bin/wscluster
# Numeric user, so Kubernetes can verify runAsNonRoot.
USER 10001:10001
ENV WSC_LISTEN=0.0.0.0:8080
EXPOSE 8080
# SIGTERM starts the drain (close code 1012 over WSC_DRAIN_MS); exit 0 within
# WSC_DRAIN_MS + 1 s.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/wscluster"]
LABEL org.opencontainers.image.title="wscluster" \
      org.opencontainers.image.description="Elastic WebSocket cluster on Redis: identical self-registering nodes" \
      org.opencontainers.image.source="https://github.com/wscluster/wscluster" \
      org.opencontainers.image.licenses="MIT OR Apache-2.0"
