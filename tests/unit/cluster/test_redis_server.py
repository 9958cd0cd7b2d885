from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import redis

from cluster.redis_server import RedisServer, RedisServerError, find_redis_server, free_port


def test_session_server_serves_real_commands(redis_client: redis.Redis) -> None:
    redis_client.set("part:1", "ok")
    assert redis_client.get("part:1") == b"ok"
    # A stream, as the result log will use.
    entry = redis_client.xadd("results", {"verdict": "defective"})
    assert redis_client.xlen("results") == 1
    assert redis_client.xrange("results")[0][0] == entry


def test_fixture_binds_loopback_only(redis_server: RedisServer) -> None:
    info = redis_server.client().config_get("bind")
    assert info["bind"] == "127.0.0.1"
    assert redis_server.url.startswith("redis://127.0.0.1:")


def test_start_stop_frees_the_port_and_workdir() -> None:
    server = RedisServer().start()
    port, workdir = server.port, server.workdir
    assert server.running and workdir is not None and workdir.exists()
    server.stop()
    assert not server.running
    assert not workdir.exists()
    with socket.socket() as sock:  # the port is free again (TIME_WAIT allowed)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))


def test_password_is_enforced() -> None:
    with RedisServer(password="s3cret") as server:
        assert server.client().ping()
        anonymous = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=5)
        with pytest.raises(redis.exceptions.AuthenticationError):
            anonymous.ping()


def test_occupied_port_is_a_clear_error() -> None:
    with RedisServer() as first, pytest.raises(RedisServerError, match=str(first.port)):
        RedisServer(port=first.port).start(timeout=5)


def test_missing_binary_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("INSPECTRAY_REDIS_SERVER", raising=False)
    with pytest.raises(RedisServerError, match="make setup"):
        find_redis_server()


def test_binary_is_the_real_redis() -> None:
    out = subprocess.run([find_redis_server(), "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and "Redis server v=" in out.stdout
    assert 1024 <= free_port() <= 65535


def test_free_ports_are_distinct_bindable_and_below_the_ephemeral_range() -> None:
    ports = [free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    low, _ = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert all(20_000 <= p < min(32_000, low) for p in ports)
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
