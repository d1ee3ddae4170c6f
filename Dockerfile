# Builds every policy-bus binary into one small image; compose.yaml runs each process from it.
FROM rust:1.89-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --locked --release --bins \
 && mkdir -p /out \
 && cp target/release/policy-dispatcher target/release/policy-agent target/release/policyctl /out/

FROM debian:bookworm-slim
RUN useradd --system --no-create-home policy \
 && mkdir /auth && chown policy /auth
COPY --from=build /out/ /usr/local/bin/
COPY examples/ /etc/policy-bus/examples/
USER policy
ENV NATS_URL=nats://nats:4222
ENTRYPOINT ["/usr/local/bin/policy-dispatcher"]
