"""Fixtures the batch tests share: the Ent stand-in in front of the shared Faktory, and gateways
in front of it on the shared Redis (one of each per test module); and a Go program that writes
and reads jobs with Go's encoding/json."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.support.processes import REPO, GatewayProcess
from tests.support.standin import StandinProcess


@pytest.fixture(scope="module")
def standin(faktory):
    process = StandinProcess(faktory.url).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def strict(standin, redis_server):
    process = GatewayProcess(standin.url, "--redis", redis_server.url).start()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def member_reopen(standin, redis_server):
    process = GatewayProcess(standin.url, "--redis", redis_server.url, "--mode", "member-reopen").start()
    yield process
    process.stop()


@pytest.fixture(scope="session")
def jobjson(tmp_path_factory):
    """tests/clients/go/jobjson, built with the Go toolchain that builds the test server."""
    binary = tmp_path_factory.mktemp("go") / "jobjson"
    subprocess.run(
        ["go", "build", "-o", str(binary), "./jobjson"],
        cwd=REPO / "tests/clients/go",
        env={**os.environ, "GOFLAGS": "-mod=mod"},
        check=True,
        capture_output=True,
        timeout=300,
    )
    return binary
