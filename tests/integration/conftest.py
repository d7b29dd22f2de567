"""Fixtures the batch tests share: the Ent stand-in in front of the shared Faktory, and gateways
in front of it on the shared Redis (one of each per test module)."""

from __future__ import annotations

import pytest

from tests.support.processes import GatewayProcess
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
