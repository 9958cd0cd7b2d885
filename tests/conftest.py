"""Session fixtures shared by every test: a real redis-server on a free port,
and an offline environment (no model hub)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

# Tests never reach a model hub; the project's weights come from packages.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[object]:
    """A real redis-server on a free loopback port, for the whole session."""
    from cluster.redis_server import RedisServer

    with RedisServer() as server:
        yield server


@pytest.fixture()
def redis_client(redis_server: object) -> Iterator[object]:
    """A client of the session's server, on a database flushed before each test."""
    client = redis_server.client()
    client.flushdb()
    yield client
    client.close()
