# syntax=docker/dockerfile:1

# The channel-assignment image: a static-enough Rust binary on distroless.
# Build:  docker build -t channel-assignment:dev .
# No system protoc is needed: build.rs compiles the proto with protox.

ARG RUST_VERSION=1.95

# --- cargo-chef: dependencies in their own cached layer -----------------------
FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /build

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
# Only the recipe (Cargo.toml, Cargo.lock, skeleton): a source change does
# not invalidate this layer, so dependencies are not rebuilt.
COPY --from=planner /build/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
RUN cargo build --release --locked --bin channel-assignment

# --- runtime: only the binary (distroless cc has glibc, libgcc and CA certs) --
FROM gcr.io/distroless/cc-debian12:nonroot AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="channel-assignment" \
      org.opencontainers.image.description="gRPC service that links mailboxes and phone numbers to AI-agent identities" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="MIT" \
      org.opencontainers.image.base.name="gcr.io/distroless/cc-debian12:nonroot"
COPY --from=builder /build/target/release/channel-assignment /usr/local/bin/channel-assignment
# distroless "nonroot": uid and gid 65532, numeric so that Kubernetes can
# verify runAsNonRoot without a passwd lookup.
USER 65532:65532
# gRPC, Prometheus metrics
EXPOSE 50051 8080 9090
ENV GRPC_LISTEN_ADDR=0.0.0.0:50051 \
    METRICS_LISTEN_ADDR=0.0.0.0:9090 \
    LOG_FORMAT=json
ENTRYPOINT ["/usr/local/bin/channel-assignment"]
CMD ["serve"]
