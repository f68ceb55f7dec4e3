# syntax=docker/dockerfile:1
# The tracer agent image: `docker build -t REGISTRY/tracer:TAG .` (BuildKit, Docker ≥ 23).
# The builder runs the same `cargo xtask` steps as development and CI; the runtime image holds
# the `tracer` binary and nothing else. Deployment and capabilities: docs/deploy.md.

FROM rust:1.95-bookworm AS builder
WORKDIR /src
COPY . .
# LLVM 22, the nightly toolchain's rust-src and bpf-linker (xtask/src/setup.rs).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo xtask setup --toolchain-only
RUN apt-get update -qq \
 && apt-get install -y -qq --no-install-recommends libcap2-bin \
 && rm -rf /var/lib/apt/lists/*
# Permitted, not effective, file capabilities: a non-root agent gets those the pod's
# securityContext grants and raises them itself, and names any that is missing.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo xtask build --release \
 && install -D -m 0755 target/release/tracer /out/tracer \
 && setcap cap_bpf,cap_net_admin,cap_perfmon,cap_sys_resource+p /out/tracer \
 && getcap /out/tracer

# glibc and libgcc, no shell, no package manager; uid 65532 "nonroot".
FROM gcr.io/distroless/cc-debian12:nonroot
# BuildKit keeps the security.capability extended attribute through COPY --from.
COPY --from=builder /out/tracer /tracer
USER 65532:65532
EXPOSE 9477
ENTRYPOINT ["/tracer", "agent"]
