# CI only: a stand-in for contribsys/faktory:1.9.4, which cannot be pulled here. The same Faktory
# release (the server binary scripts/install-test-deps.sh builds, copied into the build context by
# scripts/image-smoke.sh) at the same path, /faktory, with the redis-server it starts for itself.
# The official image is Alpine-based; this one is Debian, like everything else CI can build.
FROM debian:bookworm-slim
ARG REDIS_VERSION
RUN apt-get update \
 && apt-get install -y --no-install-recommends "redis-server=${REDIS_VERSION}" \
 && rm -rf /var/lib/apt/lists/* \
 && mkdir -p /var/lib/faktory
COPY faktory /faktory
EXPOSE 7419 7420
CMD ["/faktory", "-b", ":7419", "-w", ":7420", "-e", "development"]
