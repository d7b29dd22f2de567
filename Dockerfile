#
# faktory-gateway container image.
#
#   docker build -t faktory-gateway:0.1.0 .
#   docker run --rm -p 7419:7419 -p 9419:9419 \
#     -e FAKTORY_GATEWAY_UPSTREAM=tcp://faktory:7419 faktory-gateway:0.1.0
#
# Base: debian:bookworm-slim with Debian's own python3 (3.11), chosen over python:3.12-slim-bookworm
# for Debian's security support of the interpreter and because CI can build this very file offline
# (docs/decisions.md, "The image's base"). BuildKit is required (RUN --mount); Docker 23+ uses it
# by default, older engines need DOCKER_BUILDKIT=1.
#
# Behind a TLS-intercepting proxy, hand pip the proxy's CA as a build secret; it is mounted for one
# RUN step only and never stored in a layer:
#   DOCKER_BUILDKIT=1 docker build --secret id=pip-ca,src=/path/to/proxy-ca.crt -t faktory-gateway .
#
# Stages: `python` is the base with Debian's python3, shared by the builder and the runtime (one
# interpreter, so the wheels match it); `deps` downloads the locked dependency wheels
# (packaging/image-requirements.txt, every file pinned by sha256; cached until the lock changes);
# `build` builds the gateway's own wheel with the locked setuptools; the final stage creates a venv
# without pip and installs both sets of wheels from bind mounts with the builder's pip, so no
# wheel, pip, compiler or source file ends up in the image.

# ---- the interpreter ----------------------------------------------------------------------------
FROM debian:bookworm-slim AS python

# python3 is pinned to the Debian package that selects Python 3.11; the interpreter itself
# (python3.11, libpython3.11-stdlib) comes at the version bookworm-security currently ships, so a
# rebuild picks up Debian's security fixes.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/*

# ---- dependencies -------------------------------------------------------------------------------
FROM python AS deps

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_PYTHON_VERSION_WARNING=1 \
    PYTHONDONTWRITEBYTECODE=1

# python3-venv brings ensurepip (and with it pip) for the builder's own venv, /build.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3-venv=3.11.2-1+b1 \
 && rm -rf /var/lib/apt/lists/* \
 && python3 -m venv /build

WORKDIR /src
COPY packaging/image-requirements.txt packaging/image-build-requirements.txt /build/
# --require-hashes: pip refuses any file whose sha256 is not in the lock. --only-binary: every
# dependency ships manylinux wheels for CPython 3.11 (amd64 and arm64); nothing is compiled.
RUN --mount=type=secret,id=pip-ca,required=false \
    if [ -s /run/secrets/pip-ca ]; then export PIP_CERT=/run/secrets/pip-ca; fi \
 && /build/bin/pip install --no-cache-dir --require-hashes --only-binary=:all: \
        --requirement /build/image-build-requirements.txt \
 && /build/bin/pip download --no-cache-dir --require-hashes --only-binary=:all: --dest /wheels \
        --requirement /build/image-requirements.txt

# ---- the gateway's own wheel --------------------------------------------------------------------
FROM deps AS build

COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN /build/bin/pip wheel --no-cache-dir --no-deps --no-index --no-build-isolation --wheel-dir /dist .

# ---- runtime ------------------------------------------------------------------------------------
FROM python

LABEL org.opencontainers.image.title="faktory-gateway" \
      org.opencontainers.image.description="A Faktory proxy that enforces Faktory Enterprise batch rules" \
      org.opencontainers.image.licenses="MIT"

# PYTHONDONTWRITEBYTECODE: the root filesystem is read-only in Kubernetes (the wheels' .pyc files
# are compiled at install time). FAKTORY_GATEWAY_LISTEN: in a container the data port must listen
# on every interface; a sidecar that should only serve its own pod sets 127.0.0.1:7419.
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/faktory-gateway/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    FAKTORY_GATEWAY_LISTEN=0.0.0.0:7419

# Layer 1: a venv without pip holding the locked dependencies (cached until the lock changes), and
# an unprivileged user with a fixed numeric id, so `runAsNonRoot` can verify it without a passwd
# lookup. The builder's pip installs into the venv (`--python`) from the downloaded wheels only,
# checking every hash again.
RUN --mount=type=bind,from=deps,source=/build,target=/build \
    --mount=type=bind,from=deps,source=/wheels,target=/wheels \
    python3 -m venv --without-pip /opt/faktory-gateway \
 && /build/bin/pip --python /opt/faktory-gateway/bin/python install --no-cache-dir --no-index \
        --find-links /wheels --require-hashes --requirement /build/image-requirements.txt \
 && groupadd --system --gid 65532 nonroot \
 && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin nonroot

# Layer 2: the gateway itself, without touching the dependencies.
RUN --mount=type=bind,from=deps,source=/build,target=/build \
    --mount=type=bind,from=build,source=/dist,target=/dist \
    /build/bin/pip --python /opt/faktory-gateway/bin/python install --no-cache-dir --no-index \
        --no-deps /dist/*.whl

USER 65532:65532

# 7419: the Faktory protocol (clients); 9419: HTTP /metrics, /startup, /liveness, /readiness.
EXPOSE 7419 9419

# Exec form: the gateway is PID 1 and receives SIGTERM itself, which starts its graceful drain.
ENTRYPOINT ["faktory-gateway"]
