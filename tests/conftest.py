"""Shared fixtures: real Faktory, real Redis and the gateway as users run it."""

from __future__ import annotations

import pytest

from tests.support.processes import FaktoryServer, GatewayProcess, RedisCluster, RedisServer


@pytest.fixture(scope="session")
def faktory():
    """One Faktory OSS server for the tests that only need a well-behaved server."""
    server = FaktoryServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def gateway(faktory):
    """The gateway in front of the shared Faktory, with the embedded store."""
    process = GatewayProcess(faktory.url, "--log-level", "warning").start()
    yield process
    process.stop()


@pytest.fixture
def fresh_faktory():
    """A Faktory server of the test's own, for tests that stop, kill or reconfigure it."""
    server = FaktoryServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer().start()
    yield server
    server.cleanup()


@pytest.fixture(scope="session")
def redis_cluster():
    """A real three-master Redis Cluster (redis-server --cluster-enabled yes, redis-cli --cluster create)."""
    cluster = RedisCluster()
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.cleanup()
