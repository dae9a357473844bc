# Both Warren binaries in one small image; the compose file picks the entrypoint.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p warren-consumer-app -p warren-producer-app

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/warren-consumer /src/target/release/warren-producer /usr/local/bin/
# The consumer's own files (the default embedded entity store): a folder the unprivileged
# user owns, a volume so they outlive the container.
RUN mkdir -p /var/lib/warren && chown 10001 /var/lib/warren
ENV WARREN_DATA_DIR=/var/lib/warren
VOLUME /var/lib/warren
WORKDIR /var/lib/warren
USER 10001
EXPOSE 9464
ENTRYPOINT ["warren-consumer"]
