# Builds every policy-bus binary into one small image; compose.yaml runs each process from it.
# The image runs any of them: `docker run policy-bus policy-agent acl`, `... policyctl tap`.
FROM rust:1.89-bookworm AS build
WORKDIR /src
# The dependencies first, in their own layer: it is rebuilt only when a manifest or the lock
# changes, not on every change to the engine's sources. Stub sources stand in for the crates.
COPY Cargo.toml Cargo.lock ./
COPY bus/Cargo.toml bus/
COPY daemon/Cargo.toml daemon/
COPY agents/Cargo.toml agents/
COPY dispatcher/Cargo.toml dispatcher/
COPY policyctl/Cargo.toml policyctl/
COPY tests/Cargo.toml tests/
COPY fuzz/Cargo.toml fuzz/
RUN for crate in bus daemon agents dispatcher policyctl tests fuzz; do \
      mkdir -p "$crate/src" "$crate/benches" "$crate/tests/e2e" \
      && touch "$crate/src/lib.rs" \
      && echo 'fn main() {}' > "$crate/src/main.rs"; \
    done \
 && for target in agents/benches/acl agents/benches/wasm bus/benches/codec fuzz/tests/fuzz tests/tests/e2e/main; do \
      echo 'fn main() {}' > "$target.rs"; \
    done \
 && cargo build --locked --release --bins \
 && rm -rf bus daemon agents dispatcher policyctl tests fuzz
COPY . .
RUN cargo build --locked --release --bins \
 && mkdir -p /out \
 && cp target/release/policy-dispatcher target/release/policy-agent target/release/policyctl /out/

FROM debian:bookworm-slim
# ca-certificates: `tls://` NATS URLs verify the server against the system's roots.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates=20230311* \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home policy \
 && mkdir /auth && chown 10001 /auth
COPY --from=build /out/ /usr/local/bin/
COPY examples/ /etc/policy-bus/examples/
USER 10001
ENV NATS_URL=nats://nats:4222
# No fixed entrypoint: the command names the binary (compose gives each service its own).
CMD ["policy-dispatcher"]
