# One image: ferry-operator (Deployment), ferry-forwarder (DaemonSet) and the ferry CLI.
#   docker build -t ferry:0.1.0 .
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p ferry-operator -p ferry-forwarder -p ferry-cli \
    && cp target/release/ferry-operator target/release/ferry-forwarder target/release/ferry target/release/kubectl-ferry /usr/local/bin/

FROM debian:bookworm-slim
# nft and its library (libnftables, which the forwarder loads to keep one context open)
# program the kernel data plane; CA certificates for the cloud APIs.
RUN apt-get update \
    && apt-get install -y --no-install-recommends nftables ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /usr/local/bin/ferry-operator /usr/local/bin/ferry-forwarder /usr/local/bin/ferry /usr/local/bin/kubectl-ferry /usr/local/bin/
# The operator runs as this user; the forwarder as root with only network capabilities.
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/ferry-operator"]
