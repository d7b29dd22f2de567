# syntax=docker/dockerfile:1
#
# faktory-gateway container image.
#
#   docker build -t faktory-gateway:0.1.0 .
#   docker run --rm -p 7419:7419 -p 9419:9419 \
#     -e FAKTORY_GATEWAY_UPSTREAM=tcp://faktory:7419 faktory-gateway:0.1.0
#
# Three stages: `deps` builds wheels of the dependencies (from pyproject.toml alone, so this layer
# and the matching install layer below are rebuilt only when the dependencies change), `build`
# builds the gateway's own wheel, and the final stage installs both sets of wheels from bind mounts,
# so no wheel, compiler or source file ends up in the image.

# ---- dependencies -------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm AS deps

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
COPY pyproject.toml ./
# The requirement list is read from pyproject.toml (tomllib is in the standard library), so it is
# declared in one place only. Every dependency ships manylinux wheels; no compiler is needed.
RUN python -c "import tomllib; project = tomllib.load(open('pyproject.toml', 'rb'))['project']; open('requirements.txt', 'w').write('\n'.join(project['dependencies']) + '\n')" \
 && pip wheel --no-cache-dir --wheel-dir /wheels --requirement requirements.txt

# ---- the gateway's own wheel --------------------------------------------------------------------
FROM deps AS build

COPY README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /dist .

# ---- runtime ------------------------------------------------------------------------------------
FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="faktory-gateway" \
      org.opencontainers.image.description="A Faktory proxy that enforces Faktory Enterprise batch rules" \
      org.opencontainers.image.licenses="MIT"

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes (the wheels' .pyc files
# are compiled at install time). FAKTORY_GATEWAY_LISTEN: in a container the data port must listen
# on every interface; a sidecar that should only serve its own pod sets 127.0.0.1:7419.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    FAKTORY_GATEWAY_LISTEN=0.0.0.0:7419

# Layer 1: the dependencies (cached until pyproject.toml's dependencies change), and an unprivileged
# user with a fixed numeric id, so `runAsNonRoot` can verify it without a passwd lookup.
RUN --mount=type=bind,from=deps,source=/wheels,target=/wheels \
    pip install --no-cache-dir --no-index --disable-pip-version-check /wheels/*.whl \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nonroot

# Layer 2: the gateway itself, without touching the dependencies.
RUN --mount=type=bind,from=build,source=/dist,target=/dist \
    pip install --no-cache-dir --no-index --no-deps --disable-pip-version-check /dist/*.whl

USER 65532:65532

# 7419: the Faktory protocol (clients); 9419: HTTP /metrics, /startup, /liveness, /readiness.
EXPOSE 7419 9419

# Exec form: the gateway is PID 1 and receives SIGTERM itself, which starts its graceful drain.
ENTRYPOINT ["faktory-gateway"]
