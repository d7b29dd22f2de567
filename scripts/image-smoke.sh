#!/usr/bin/env bash
# Builds the container image and runs it, and the compose stack, for real (issue 12).
#
# Offline: no container registry is reachable, so every base is made here and nothing is pulled.
#   1. installs docker.io, debootstrap and docker-compose from Debian (once);
#   2. starts a private dockerd (own socket, data root and exec root; stopped by pid on exit);
#   3. makes debian:bookworm-slim from `debootstrap --variant=minbase bookworm` (kept in the
#      private data root, so a second run reuses it);
#   4. builds the gateway image from ./Dockerfile (pip's HTTPS goes through a BuildKit secret
#      holding the CA certificates of /usr/local/share/ca-certificates, if any), and the CI
#      stand-ins for the compose file's Faktory and Redis images (tests/image/*.Dockerfile);
#   5. runs tests/image/smoke.py, which checks the image and the compose stack and fails on any
#      check that does not hold.
# Needs root (dockerd) and the test dependencies (scripts/install-test-deps.sh). Exits non-zero,
# with a line saying what failed, on any failure.
set -euo pipefail
cd "$(dirname "$0")/.."
repo=$(pwd)
started=$SECONDS

state=${FGW_CI_STATE:-/var/lib/faktory-gateway-ci}   # the private dockerd's images and build cache
run=${FGW_CI_RUN:-/run/faktory-gateway-ci}           # its socket, pid file and exec root
docker=/usr/bin/docker   # Debian's CLI: it has BuildKit's --secret (a newer CLI on PATH may lack buildx)
image=faktory-gateway:ci
base=debian:bookworm-slim

say() { echo "== image-smoke: $*"; }
fail() { echo "image-smoke: FAILED: $*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || fail "must run as root (it starts its own dockerd)"
[ -x .venv/bin/python ] && [ -x .tools/bin/faktory ] || fail "run scripts/install-test-deps.sh first"

missing=()
[ -x /usr/sbin/dockerd ] && [ -x "$docker" ] || missing+=(docker.io)
command -v debootstrap >/dev/null || missing+=(debootstrap)
[ -x /usr/bin/docker-compose ] || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  say "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# ---- a private dockerd, stopped by its pid whatever happens ------------------------------------
mkdir -p "$state" "$run"
export DOCKER_HOST="unix://$run/docker.sock"
# A run that was killed may have left its dockerd behind: stop it by its pid, after checking that
# the pid is that dockerd (its own data root) and not some other process that reused the number.
if [ -f "$run/dockerd.pid" ] && old=$(cat "$run/dockerd.pid") && kill -0 "$old" 2>/dev/null; then
  if tr '\0' ' ' <"/proc/$old/cmdline" | grep -q -- "--data-root $state/docker"; then
    say "stopping the dockerd of an earlier run (pid $old)"
    kill "$old"
    for _ in $(seq 100); do kill -0 "$old" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$old" 2>/dev/null && fail "the dockerd of an earlier run (pid $old) does not stop"
  fi
fi
rm -f "$run/dockerd.pid" "$run/docker.sock"
dockerd_pid=""
cleanup() {
  status=$?
  if [ -n "$dockerd_pid" ]; then
    # Containers first (compose stacks are taken down by smoke.py itself; this catches leftovers).
    ids=$("$docker" ps -aq 2>/dev/null || true)
    [ -z "$ids" ] || "$docker" rm -f $ids >/dev/null 2>&1 || true
    kill "$dockerd_pid" 2>/dev/null || true
    for _ in $(seq 100); do kill -0 "$dockerd_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$dockerd_pid" 2>/dev/null; then kill -9 "$dockerd_pid" 2>/dev/null || true; fi
  fi
  [ "$status" -eq 0 ] || echo "image-smoke: FAILED (exit $status); dockerd log: $run/dockerd.log" >&2
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
/usr/sbin/dockerd --data-root "$state/docker" --exec-root "$run/exec" --pidfile "$run/dockerd.pid" \
  --host "$DOCKER_HOST" >"$run/dockerd.log" 2>&1 &
dockerd_pid=$!
for _ in $(seq 200); do
  "$docker" version >/dev/null 2>&1 && break
  kill -0 "$dockerd_pid" 2>/dev/null || fail "dockerd exited: $(tail -5 "$run/dockerd.log")"
  sleep 0.1
done
"$docker" version >/dev/null 2>&1 || fail "dockerd did not answer within 20 s"
# Everything in this private engine is this script's: containers a killed run left behind (the
# compose stack restarts by itself) go, with their networks and volumes.
ids=$("$docker" ps -aq)
[ -z "$ids" ] || "$docker" rm -f $ids >/dev/null
"$docker" network prune -f >/dev/null
"$docker" volume prune -f >/dev/null
say "dockerd $dockerd_pid ready ($((SECONDS - started)) s)"

# ---- the Debian base, made with debootstrap ----------------------------------------------------
# The official debian:bookworm-slim is also a debootstrap'ed minbase, trimmed of documentation. This
# one has the same apt sources (bookworm, bookworm-updates, bookworm-security), the same dpkg path
# exclusions and the same apt settings that keep package caches out of layers. It is rebuilt when
# older than a week (to pick up Debian's updates) or when this recipe changes (base_recipe).
base_recipe=2
mirror=$(awk '/^URIs:/ && $2 ~ /\/debian\/?$/ {print $2; exit}' /etc/apt/sources.list.d/*.sources 2>/dev/null || true)
mirror=${mirror:-http://deb.debian.org/debian}
security=${mirror%/debian}/debian-security
created=$("$docker" image inspect -f '{{.Created}}' "$base" 2>/dev/null || true)
recipe=$("$docker" image inspect -f '{{index .Config.Labels "org.faktory-gateway.ci-base-recipe"}}' "$base" 2>/dev/null || true)
if [ -z "$created" ] || [ "$recipe" != "$base_recipe" ] \
   || [ $(( $(date +%s) - $(date -d "$created" +%s) )) -gt 604800 ]; then
  say "making $base with debootstrap from $mirror"
  rootfs=$(mktemp -d /var/tmp/fgw-rootfs.XXXXXX)
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$run/debootstrap.log" 2>&1 \
    || { rm -rf "$rootfs"; fail "debootstrap: $(tail -5 "$run/debootstrap.log")"; }
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<SOURCES
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SOURCES
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/docker" <<'EXCLUDES'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EXCLUDES
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'APTCLEAN'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APTCLEAN
  printf 'APT::AutoRemove::SuggestsImportant "false";\n' >"$rootfs/etc/apt/apt.conf.d/docker-autoremove-suggests"
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete
  rm -rf "$rootfs"/usr/share/{man,info}/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  find "$rootfs/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  tar --numeric-owner -C "$rootfs" -c . | "$docker" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --change 'LABEL org.faktory-gateway.ci-base="debootstrap --variant=minbase bookworm"' \
    --change "LABEL org.faktory-gateway.ci-base-recipe=$base_recipe" \
    - "$base" >/dev/null
  rm -rf "$rootfs"
fi
say "base $base ready ($((SECONDS - started)) s)"

# ---- images ---------------------------------------------------------------------------------------
# pip inside the build needs the CA that intercepts HTTPS here; a secret is mounted for one RUN
# step only and is never written to a layer.
ca_bundle="$run/pip-ca.pem"
: >"$ca_bundle"
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] && cat "$crt" >>"$ca_bundle"
done
secret=()
[ -s "$ca_bundle" ] && secret=(--secret "id=pip-ca,src=$ca_bundle")

build_log="$run/build.log"
say "building $image"
DOCKER_BUILDKIT=1 "$docker" build --pull=false --progress=plain "${secret[@]}" -t "$image" . \
  >"$build_log" 2>&1 || { tail -40 "$build_log" >&2; fail "docker build of the gateway image"; }
say "built $image ($((SECONDS - started)) s)"

redis_version=$(dpkg-query -W -f '${Version}' redis-server)
ctx=$(mktemp -d)
cp .tools/bin/faktory "$ctx/faktory"
DOCKER_BUILDKIT=1 "$docker" build --pull=false --progress=plain -f tests/image/faktory.Dockerfile \
  --build-arg "REDIS_VERSION=$redis_version" -t faktory-gateway-ci/faktory:1.9.4 "$ctx" \
  >>"$build_log" 2>&1 || { rm -rf "$ctx"; tail -40 "$build_log" >&2; fail "docker build of the CI Faktory image"; }
rm -rf "$ctx"
DOCKER_BUILDKIT=1 "$docker" build --pull=false --progress=plain -f tests/image/redis.Dockerfile \
  --build-arg "REDIS_VERSION=$redis_version" -t faktory-gateway-ci/redis:7.0 tests/image \
  >>"$build_log" 2>&1 || { tail -40 "$build_log" >&2; fail "docker build of the CI Redis image"; }
say "built the CI Faktory and Redis images ($((SECONDS - started)) s)"

# ---- the checks ---------------------------------------------------------------------------------
FGW_IMAGE=$image DOCKER="$docker" .venv/bin/python -m tests.image.smoke
# Dangling layers of earlier builds would pile up in the private data root run after run.
"$docker" image prune -f >/dev/null
say "passed in $((SECONDS - started)) s"
