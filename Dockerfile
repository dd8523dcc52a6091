# Tollgate: gateway, control-plane and mock-upstream in one slim image, running as a non-root user.
#
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 tollgate          # the demo: example policy in front of the mock
#
# The default command (`tollgate-demo`) starts mock-upstream on the container's loopback and the
# gateway enforcing policies/example.yaml in front of it, the proxy on 0.0.0.0:8080. Its API
# listener (/check charges any subject) stays on the container's loopback unless you give it a
# token: `-e TOLLGATE_API_TOKEN="$(openssl rand -hex 24)" -p 9090:9090` publishes it on 0.0.0.0:9090.
#
# Any binary runs as the command instead, e.g. a gateway following a control plane:
#   docker run tollgate gateway run --control-plane http://cp:7070 --listen 0.0.0.0:8080 …
#   docker run tollgate control-plane serve --listen 0.0.0.0:7070 --database postgres://…
# deploy/compose.yaml runs a whole fleet. The HEALTHCHECK asks /healthz on TOLLGATE_HEALTH_PORT
# (default 9090, the gateway's API; 7070 for control-plane serve, 8000 for mock-upstream).

# Pinned: the toolchain and Debian release the project is built and tested with.
FROM rust:1.95-bookworm AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev zlib1g-dev \
       libcurl4-openssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# .cargo/config.toml links the system OpenSSL (pingora, librdkafka's TLS) instead of a vendored copy.
RUN cargo build --release --locked -p gateway -p control-plane -p mock-upstream \
    && mkdir /out \
    && cp target/release/gateway target/release/control-plane target/release/mock-upstream /out/

FROM debian:12.11-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/tollgate --create-home tollgate
COPY --from=build /out/gateway /out/control-plane /out/mock-upstream /usr/local/bin/
COPY deploy/container/tollgate-demo deploy/container/tollgate-healthcheck /usr/local/bin/
COPY policies/example.yaml /etc/tollgate/example.yaml
USER 10001:10001
# Relative paths (spool, snapshot, journal, SQLite files) land in the user's own directory.
WORKDIR /var/lib/tollgate
ENV TOLLGATE_HEALTH_PORT=9090
EXPOSE 8080 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["/usr/local/bin/tollgate-healthcheck"]
CMD ["/usr/local/bin/tollgate-demo"]
