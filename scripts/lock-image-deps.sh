#!/usr/bin/env bash
# Regenerates the image's dependency locks (exact versions with sha256 hashes) from pyproject.toml:
#   packaging/image-requirements.txt        what the image runs (project.dependencies)
#   packaging/image-build-requirements.txt  what builds the gateway's wheel (build-system.requires)
# Resolved by Debian bookworm's own python3 (3.11.2, the interpreter in the image), because markers
# depend on it: redis needs async-timeout below Python 3.11.3. pip-tools records the hashes of every
# file of each pinned release, so the lock serves amd64 and arm64 builds alike.
# Run it after changing the dependencies in pyproject.toml; `--upgrade` moves to the newest releases.
set -euo pipefail
cd "$(dirname "$0")/.."
python=/usr/bin/python3
"$python" -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \
  || { echo "lock-image-deps: needs Debian bookworm's python3 (3.11) at $python" >&2; exit 1; }
tools=$(mktemp -d)
trap 'rm -rf "$tools"' EXIT
"$python" -m venv "$tools/venv"
"$tools/venv/bin/pip" install -q --disable-pip-version-check "pip-tools>=7.4,<8"
# Only PyPI: a local wheel directory (PIP_FIND_LINKS) would put hashes into the lock that no build
# can download.
export PIP_FIND_LINKS=""
common=(--generate-hashes --strip-extras --allow-unsafe --no-emit-find-links --no-emit-index-url
        --no-emit-trusted-host --quiet "$@")
"$tools/venv/bin/pip-compile" "${common[@]}" --output-file packaging/image-requirements.txt pyproject.toml
"$tools/venv/bin/pip-compile" "${common[@]}" --all-build-deps --only-build-deps \
  --output-file packaging/image-build-requirements.txt pyproject.toml
echo "lock-image-deps: wrote packaging/image-requirements.txt and packaging/image-build-requirements.txt"
