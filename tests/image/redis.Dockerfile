# CI only: a stand-in for redis:7.4-bookworm, which cannot be pulled here: Debian's redis-server
# (7.0, the version the tests use), run as the redis user in /data like the official image.
# The official image's entrypoint adds `--protected-mode no` when it is given no configuration file;
# tests/image/compose.ci.yaml passes that flag itself.
FROM debian:bookworm-slim
ARG REDIS_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends "redis-server=${REDIS_VERSION}" \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir /data && chown redis:redis /data
WORKDIR /data
USER redis
EXPOSE 6379
CMD ["redis-server"]
