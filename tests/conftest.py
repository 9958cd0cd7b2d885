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


# -- the fault report -------------------------------------------------------------------
# Fault drills and fuzzers add rows (loadtests.faults.FaultRow); pytest prints the
# table after the run and writes it as JSON to $INSPECTRAY_FAULT_REPORT when set.
FAULT_REPORT_ENV = "INSPECTRAY_FAULT_REPORT"
_fault_rows: list = []


@pytest.fixture(scope="session")
def fault_report() -> list:
    """Append a FaultRow per drill or attack; reported at the end of the session."""
    return _fault_rows


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    if not _fault_rows:
        return
    import json

    from loadtests.faults import markdown_table

    terminalreporter.section("fault report")
    terminalreporter.write_line(markdown_table(_fault_rows))
    path = os.environ.get(FAULT_REPORT_ENV)
    if path:
        with open(path, "w") as out:
            json.dump([row.as_dict() for row in _fault_rows], out, indent=1)
        terminalreporter.write_line(f"written to {path}")
