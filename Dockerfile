# Tollgate: gateway and mock-upstream in a slim runtime image, running as a non-root user.
#   docker build -t tollgate .
#   docker run --rm -p 8080:8080 -p 9090:9090 -e TOLLGATE_API_TOKEN="$(openssl rand -hex 24)" \
#       -v "$PWD/policies:/etc/tollgate:ro" tollgate \
#       run --config /etc/tollgate/example.yaml --listen 0.0.0.0:8080 --api-listen 0.0.0.0:9090
# The API listener (/check, /status) needs that token: without one the gateway refuses to start
# on a non-loopback address.
FROM rust:1-bookworm AS build
RUN apt-get update && apt-get install -y --no-install-recommends cmake pkg-config libssl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p gateway -p mock-upstream \
    && mkdir /out && cp target/release/gateway target/release/mock-upstream /out/

FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends ca-certificates libssl3 \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --no-create-home tollgate
COPY --from=build /out/gateway /out/mock-upstream /usr/local/bin/
COPY policies /etc/tollgate
USER tollgate
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/gateway"]
CMD ["run", "--config", "/etc/tollgate/example.yaml", "--listen", "0.0.0.0:8080", "--api-listen", "0.0.0.0:9090"]
