# The wasmcache daemon's container image, as deploy/kubernetes/daemonset.yaml runs it:
#   docker build -t ghcr.io/wasmcache/wasmcache:0.1.0 .
# A Rust stage builds the release binary with the locked dependencies; the runtime stage is
# distroless (glibc, libgcc, CA certificates, no shell) and runs as the non-root UID/GID 65532,
# the group that client pods need to reach the daemon's 0660 socket.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The registry and target directories are BuildKit caches, kept between builds; the binary is
# copied out of the cache in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin wasmcache \
    && install -D -m 0755 target/release/wasmcache /out/wasmcache

FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="wasmcache" \
      org.opencontainers.image.description="Node-local cache for WebAssembly modules stored in OCI registries" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/wasmcache /usr/local/bin/wasmcache
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/wasmcache"]
CMD ["serve"]
