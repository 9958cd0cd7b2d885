from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import deployments.store as store_module
from cluster.redis_server import RedisServer, free_port
from deployments.store import ApiKey, AuthError, RedisStore, StoreUnavailable

PREFIX = "t"
FAST_S = 0.5  # "well under a second" for a call while Redis is down


def result(request_id: str, **extra: object) -> dict:
    return {"request_id": request_id, "category": "bottle", "prediction": "defective", **extra}


def stream_ids(client: redis.Redis, stream: str = f"{PREFIX}:results") -> list[str]:
    return [fields[b"request_id"].decode() for _, fields in client.xrange(stream)]


def dead_url() -> str:
    return f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there


def spool_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("spool-*.jsonl"))


@pytest.fixture()
def store(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> Iterator[RedisStore]:
    opened = RedisStore(redis_server.url, tmp_path / "spool", prefix=PREFIX)
    yield opened
    opened.close()


@pytest.fixture()
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server this test may stop and start again; its data survives restarts (AOF)."""
    server = RedisServer(workdir=tmp_path / "redis", appendonly=True).start()
    yield server
    server.stop()


# -- result cache -------------------------------------------------------------


def test_cache_round_trip_with_ttl(store: RedisStore, redis_client: redis.Redis) -> None:
    key = RedisStore.cache_key("ab" * 32, "bottle", {"top_k": 3}, {"detector": "v1"})
    assert store.get_cached(key) is None
    answer = {"request_id": "r-1", "prediction": "good", "confidence": 0.97}
    store.put_cached(key, answer)
    assert store.get_cached(key) == answer
    ttl = redis_client.ttl(f"{PREFIX}:{key}")
    assert 0 < ttl <= store.cache_ttl_s


def test_an_answer_cached_under_other_registered_types_is_a_miss(store: RedisStore) -> None:
    key = RedisStore.cache_key("ab" * 32, "bottle", {}, {"plan": "p1"})
    answer = {"request_id": "r-1", "prediction": "good"}
    store.put_cached(key, answer, tag="types-a")
    assert store.get_cached(key, tag="types-a") == answer
    assert store.get_cached(key, tag="types-b") is None
    assert store.get_cached(key) is None  # untagged: cached with no registered types


def test_lookup_reads_descriptions_and_the_cache_in_one_round_trip(
    store: RedisStore, redis_client: redis.Redis, tmp_path: Path
) -> None:
    scratch = {"name": "scratch", "description": "thin line"}
    store.register_description("bottle", scratch)

    def tag(registered: dict[str, list[dict]]) -> str:
        return ",".join(f"{c}:{d['name']}" for c, items in registered.items() for d in items)

    key = RedisStore.cache_key("ab" * 32, "bottle", {}, {"plan": "p1"})
    assert store.publish(result("r-1"), cache_key=key, cache_tag="bottle:scratch")
    redis_client.config_resetstat()
    described, tagged, cached = store.lookup(key, ["bottle", "screw"], tag)
    assert described == {"bottle": [scratch], "screw": []} and tagged == "bottle:scratch"
    assert cached == result("r-1")
    calls = {
        name.removeprefix("cmdstat_"): stats["calls"]
        for name, stats in redis_client.info("commandstats").items()
        if not name.startswith(("cmdstat_config", "cmdstat_info"))  # this test's own
    }
    assert calls == {"hgetall": 2, "hmget": 1}  # nothing else was read
    # A type registered since: the answer no longer stands for this image.
    store.register_description("bottle", {"name": "dent", "description": "a dip"})
    described, tagged, cached = store.lookup(key, ["bottle"], tag)
    assert [d["name"] for d in described["bottle"]] == ["dent", "scratch"] and cached is None
    assert tagged == "bottle:dent,bottle:scratch"
    # Redis down: the descriptions last seen, and a miss.
    down = RedisStore(dead_url(), tmp_path / "down", prefix=PREFIX, socket_timeout_s=0.2)
    assert down.lookup(key, ["bottle"], tag) == ({"bottle": []}, "", None)
    down.close()
    assert store.lookup(key, ["bottle"], tag)[0] == described


def test_cache_key_is_deterministic_and_follows_versions_and_options() -> None:
    base = RedisStore.cache_key(
        "ff" * 32, "bottle", {"a": 1, "b": [1, 2]}, {"det": "1", "cls": "2"}
    )
    reordered = RedisStore.cache_key(
        "ff" * 32, "bottle", {"b": [1, 2], "a": 1}, {"cls": "2", "det": "1"}
    )
    assert base == reordered
    assert base.startswith("answer:") and len(base) == len("answer:") + 64
    new_model = RedisStore.cache_key(
        "ff" * 32, "bottle", {"a": 1, "b": [1, 2]}, {"det": "1", "cls": "3"}
    )
    other_options = RedisStore.cache_key(
        "ff" * 32, "bottle", {"a": 2, "b": [1, 2]}, {"det": "1", "cls": "2"}
    )
    routed = RedisStore.cache_key("ff" * 32, None, {"a": 1, "b": [1, 2]}, {"det": "1", "cls": "2"})
    assert len({base, new_model, other_options, routed}) == 4


# -- result stream ------------------------------------------------------------


def test_publish_appends_the_result_to_the_stream(
    store: RedisStore, redis_client: redis.Redis
) -> None:
    answer = result("r-1", confidence=0.91, boxes=[[1.0, 2.0, 3.0, 4.0]])
    assert store.publish(answer) is True
    [(_, fields)] = redis_client.xrange(store.stream)
    assert fields[b"request_id"] == b"r-1"
    assert json.loads(fields[b"result"]) == answer
    assert 0 < redis_client.ttl(f"{PREFIX}:published:r-1") <= store.published_ttl_s
    with pytest.raises(ValueError, match="request_id"):
        store.publish({"prediction": "good"})


def test_duplicate_publish_appends_once(store: RedisStore, redis_client: redis.Redis) -> None:
    assert store.publish(result("r-1")) is True
    assert store.publish(result("r-1", prediction="good")) is True  # already in: still True
    assert store.publish(result("r-2")) is True
    assert stream_ids(redis_client) == ["r-1", "r-2"]
    assert (
        json.loads(redis_client.xrange(store.stream)[0][1][b"result"])["prediction"] == "defective"
    )


def test_publish_with_a_cache_key_caches_and_appends_once_in_one_round_trip(
    store: RedisStore, redis_client: redis.Redis, tmp_path: Path
) -> None:
    key = RedisStore.cache_key("cd" * 32, "bottle", {}, {"detector": "v1"})
    answer = result("r-9", prediction="good")
    assert store.publish(answer, cache_key=key)
    assert store.publish(answer, cache_key=key)  # a retry of the same result
    assert stream_ids(redis_client) == ["r-9"]
    assert store.get_cached(key) == answer
    assert 0 < redis_client.ttl(f"{PREFIX}:{key}") <= store.cache_ttl_s
    down = RedisStore(dead_url(), tmp_path / "down-spool", prefix=PREFIX, socket_timeout_s=0.2)
    assert not down.publish(result("r-10"), cache_key=key)  # spooled, not lost
    assert down.spooled() == 1
    down.close()


def test_publish_runs_its_script_by_hash_and_reloads_it_after_a_flush(
    store: RedisStore, redis_client: redis.Redis
) -> None:
    redis_client.script_flush()  # as after a Redis restart without persistence
    first = RedisStore.cache_key("ab" * 32, "bottle", {}, {"detector": "v1"})
    assert store.publish(result("r-1"), cache_key=first)  # NOSCRIPT: loaded, then run
    redis_client.config_resetstat()
    second = RedisStore.cache_key("ef" * 32, "bottle", {}, {"detector": "v1"})
    assert store.publish(result("r-2"), cache_key=second)
    assert store.publish(result("r-2"), cache_key=second)  # a retry: appended once
    assert stream_ids(redis_client) == ["r-1", "r-2"]
    assert store.get_cached(first) == result("r-1")
    assert store.get_cached(second) == result("r-2")
    calls = {
        name.removeprefix("cmdstat_"): stats["calls"]
        for name, stats in redis_client.info("commandstats").items()
    }
    # Two publishes, each one SET and one EVALSHA, and no SCRIPT EXISTS before them.
    assert calls["evalsha"] == 2 and calls["set"] >= 2
    assert not any(name.startswith("script") for name in calls)


def test_stream_is_bounded(
    redis_server: RedisServer, redis_client: redis.Redis, tmp_path: Path
) -> None:
    bounded = RedisStore(redis_server.url, tmp_path / "spool", prefix=PREFIX, stream_maxlen=50)
    for i in range(400):
        assert bounded.publish(result(f"r-{i}"))
    length = redis_client.xlen(bounded.stream)
    # MAXLEN ~ trims whole radix-tree nodes (100 entries by default).
    assert 50 <= length <= 150
    assert stream_ids(redis_client)[-1] == "r-399"  # trimming drops the oldest
    bounded.close()


def test_consumer_group_reads_and_acks(store: RedisStore, redis_client: redis.Redis) -> None:
    store.ensure_group("audit")
    store.ensure_group("audit")  # idempotent
    for i in range(3):
        store.publish(result(f"r-{i}"))
    entries = store.read_group("audit", "auditor-1", count=10)
    assert [answer["request_id"] for _, answer in entries] == ["r-0", "r-1", "r-2"]
    assert store.read_group("audit", "auditor-1") == []  # delivered already
    assert store.ack("audit", [entry_id for entry_id, _ in entries[:2]]) == 2
    assert redis_client.xpending(store.stream, "audit")["pending"] == 1
    # A blocking read longer than the socket timeout waits, rather than failing.
    started = time.monotonic()
    assert store.read_group("audit", "auditor-1", block_ms=400) == []
    assert time.monotonic() - started >= 0.35
    assert store.available


# -- Redis down: spool, fast paths, breaker, replay ----------------------------


def test_redis_down_spools_stays_fast_then_replays_each_result_once(
    own_server: RedisServer, tmp_path: Path
) -> None:
    # retry_after_s=0: no breaker, so every call below really tries the dead server.
    store = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX, retry_after_s=0.0)
    assert store.publish(result("r-0")) is True
    own_server.stop()

    for i in range(1, 6):
        assert store.publish(result(f"r-{i}")) is False
    assert store.spooled() == 5
    [spool] = spool_files(tmp_path / "spool")
    assert [json.loads(line)["request_id"] for line in spool.read_text().splitlines()] == [
        f"r-{i}" for i in range(1, 6)
    ]
    calls = {
        "get_cached": lambda: store.get_cached("cache:x"),
        "put_cached": lambda: store.put_cached("cache:x", {"v": 1}),
        "allow": lambda: store.allow("some-key", 1),
        "descriptions": lambda: store.descriptions("bottle"),
        "publish": lambda: store.publish(result("r-6")),
    }
    answers = {}
    for name, call in calls.items():
        started = time.monotonic()
        answers[name] = call()
        assert time.monotonic() - started < FAST_S, name
    assert answers["get_cached"] is None and answers["descriptions"] == []
    assert answers["allow"] == (True, 0.0) and store.allow("some-key", 1) == (True, 0.0)
    assert not store.available
    assert store.replay_spool() == 0 and store.spooled() == 6  # still down: all kept

    own_server.start()
    assert store.replay_spool() == 6
    assert store.spooled() == 0 and spool_files(tmp_path / "spool") == []
    client = own_server.client()
    assert sorted(stream_ids(client)) == [f"r-{i}" for i in range(7)]  # r-0 survived restart
    assert store.replay_spool() == 0
    store.close()


def test_hung_redis_costs_one_socket_timeout(own_server: RedisServer, tmp_path: Path) -> None:
    store = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX, socket_timeout_s=0.25)
    assert store.ping()
    os.kill(own_server.process.pid, signal.SIGSTOP)  # accepts connections, never answers
    try:
        started = time.monotonic()
        assert store.get_cached("cache:x") is None
        assert time.monotonic() - started < 0.25 * 2  # one timeout, no retries
        started = time.monotonic()
        assert store.publish(result("r-1")) is False  # breaker open: straight to the spool
        assert time.monotonic() - started < 0.1
    finally:
        os.kill(own_server.process.pid, signal.SIGCONT)
    assert store.spooled() == 1
    store.close()


def test_breaker_skips_redis_then_probes_again(own_server: RedisServer, tmp_path: Path) -> None:
    store = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX, retry_after_s=1.5)
    store.put_cached("cache:x", {"v": 1})
    own_server.stop()
    assert store.get_cached("cache:x") is None
    failed_at = time.monotonic()
    assert not store.available
    own_server.start()
    assert time.monotonic() - failed_at < 1.3  # precondition: still inside retry_after_s
    assert store.get_cached("cache:x") is None  # skipped although Redis is back
    time.sleep(max(0.0, failed_at + 1.6 - time.monotonic()))
    assert store.get_cached("cache:x") == {"v": 1}  # probed, and found it
    assert store.available
    own_server.stop()
    assert store.ping() is False and not store.available
    own_server.start()
    assert store.ping() is True and store.available  # PING ignores the breaker
    store.close()


def test_replay_interrupted_midway_loses_nothing(
    own_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spool = tmp_path / "spool"
    offline = RedisStore(dead_url(), spool, prefix=PREFIX)
    for i in range(6):
        assert offline.publish(result(f"r-{i}")) is False
    store = RedisStore(own_server.url, spool, prefix=PREFIX)
    assert store.publish(result("r-2"))  # reached the stream before the replay

    publish_once = store._publish_once
    calls = []

    def stop_redis_on_fourth_line(**kwargs: object) -> object:
        calls.append(kwargs)
        if len(calls) == 4:
            own_server.stop()
        return publish_once(**kwargs)

    monkeypatch.setattr(store, "_publish_once", stop_redis_on_fourth_line)
    # r-0, r-1 appended; r-2 a duplicate; Redis dies on r-3.
    assert store.replay_spool() == 2
    assert store.spooled() == 6 and len(spool_files(spool)) == 1

    own_server.start()
    assert store.ping()
    assert store.replay_spool() == 3  # r-3, r-4, r-5; r-0..r-2 recognised
    assert store.spooled() == 0
    ids = stream_ids(own_server.client())
    assert sorted(ids) == [f"r-{i}" for i in range(6)]  # each exactly once
    offline.close()
    store.close()


def test_two_stores_share_a_spool_folder(store: RedisStore, redis_client: redis.Redis) -> None:
    first = RedisStore(dead_url(), store.spool_dir, prefix=PREFIX)
    second = RedisStore(dead_url(), store.spool_dir, prefix=PREFIX)
    for i in range(3):
        assert first.publish(result(f"a-{i}")) is False
        assert second.publish(result(f"b-{i}")) is False
    assert len(spool_files(store.spool_dir)) == 2  # one file per store
    assert store.spooled() == 6
    assert store.replay_spool() == 6
    assert sorted(stream_ids(redis_client)) == ["a-0", "a-1", "a-2", "b-0", "b-1", "b-2"]
    assert spool_files(store.spool_dir) == []
    # The writer's file was unlinked under it: it must start a fresh one, not write into the void.
    assert second.publish(result("b-3")) is False
    assert store.spooled() == 1
    assert store.replay_spool() == 1
    assert stream_ids(redis_client)[-1] == "b-3"
    first.close()
    second.close()


def test_truncated_last_line_is_skipped_with_a_warning(
    store: RedisStore, redis_client: redis.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    offline = RedisStore(dead_url(), store.spool_dir, prefix=PREFIX)
    offline.publish(result("r-1"))
    offline.publish(result("r-2"))
    [path] = spool_files(store.spool_dir)
    with path.open("ab") as spool:
        spool.write(b'{"request_id": "r-cut", "predic')  # a crash mid-write
    with caplog.at_level("WARNING", logger="deployments.store"):
        assert store.replay_spool() == 2
    assert "unreadable line 3" in caplog.text
    assert stream_ids(redis_client) == ["r-1", "r-2"]
    assert spool_files(store.spool_dir) == []
    offline.close()


def test_a_write_after_a_cut_line_stays_whole(store: RedisStore, redis_client: redis.Redis) -> None:
    offline = RedisStore(dead_url(), store.spool_dir, prefix=PREFIX)
    offline.publish(result("r-1"))
    [path] = spool_files(store.spool_dir)
    with path.open("ab") as spool:
        spool.write(b'{"request_id": "r-cut"')
    offline.publish(result("r-2"))  # must not be glued onto the cut line
    assert store.replay_spool() == 2
    assert stream_ids(redis_client) == ["r-1", "r-2"]
    offline.close()


# -- taxonomy and descriptions ------------------------------------------------


def test_taxonomy_round_trip(store: RedisStore) -> None:
    types = [{"name": "broken_large", "description": "a large break", "keywords": ["crack"]}]
    store.set_taxonomy("bottle", types)
    assert store.taxonomy("bottle") == types
    assert store.taxonomy("screw") == []


def test_descriptions_register_replace_and_list_sorted(
    store: RedisStore, redis_server: RedisServer
) -> None:
    scratch = {
        "name": "scratch",
        "description": "thin line",
        "keywords": ["line"],
        "contrast": "bright",
    }
    dent = {"name": "dent", "description": "a dip", "keywords": [], "contrast": "dark"}
    store.register_description("bottle", scratch)
    store.register_description("bottle", dent)
    store.register_description("screw", {"name": "thread_damage", "description": "x"})
    assert store.descriptions("bottle") == [dent, scratch]
    deeper = {**dent, "description": "a deep dip"}
    store.register_description("bottle", deeper)
    other_router = RedisStore(redis_server.url, store.spool_dir, prefix=PREFIX)
    assert other_router.descriptions("bottle") == [deeper, scratch]
    assert other_router.descriptions("carpet") == []
    with pytest.raises(ValueError, match="name"):
        store.register_description("bottle", {"description": "nameless"})
    other_router.close()


def test_descriptions_when_redis_down(own_server: RedisServer, tmp_path: Path) -> None:
    store = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX)
    other = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX)
    store.register_description("bottle", {"name": "scratch", "description": "thin line"})
    other.register_description("bottle", {"name": "dent", "description": "a dip"})
    store.set_taxonomy("bottle", [{"name": "broken_large"}])
    seen = store.descriptions("bottle")
    assert [d["name"] for d in seen] == ["dent", "scratch"]
    own_server.stop()
    assert store.descriptions("bottle") == seen  # the mirror
    assert store.taxonomy("bottle") == [{"name": "broken_large"}]
    fresh = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX)
    assert fresh.descriptions("bottle") == []  # never saw any
    with pytest.raises(StoreUnavailable):
        store.register_description("bottle", {"name": "stain", "description": "a blot"})
    assert [d["name"] for d in store.descriptions("bottle")] == ["dent", "scratch"]
    for opened in (store, other, fresh):
        opened.close()


# -- API keys and rate limits ---------------------------------------------------


def test_authenticate_accepts_and_refuses(store: RedisStore) -> None:
    key = store.add_api_key("acme", categories=["bottle", "screw"], rate_per_minute=100)
    assert len(key) >= 43  # token_urlsafe(32)
    grant = store.authenticate(key, "bottle")
    assert grant == ApiKey(tenant="acme", categories=("bottle", "screw"), rate_per_minute=100)
    assert store.authenticate(key) == grant

    for missing in (None, ""):
        with pytest.raises(AuthError) as refused:
            store.authenticate(missing, "bottle")
        assert refused.value.status == 401
    with pytest.raises(AuthError) as refused:
        store.authenticate(key + "x", "bottle")
    assert refused.value.status == 401 and "unknown" in refused.value.detail

    globex = store.add_api_key("globex", categories=["carpet"])
    with pytest.raises(AuthError) as refused:
        store.authenticate(globex, "bottle")  # acme's category
    assert refused.value.status == 403

    ops = store.add_api_key("ops", key="ops-key-given")
    assert ops == "ops-key-given"
    assert store.authenticate(ops, "anything") == ApiKey("ops", None, None)

    assert store.revoke_api_key(key) is True
    assert store.revoke_api_key(key) is False
    assert store.revoke_api_key("never-issued") is False
    with pytest.raises(AuthError) as refused:
        store.authenticate(key, "bottle")
    assert refused.value.status == 403 and "revoked" in refused.value.detail


def test_auth_configured_counts_revoked_keys(
    store: RedisStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = RedisStore(store.url, store.spool_dir, prefix=PREFIX)
    assert store.auth_configured() is False
    key = other.add_api_key("acme")
    assert store.auth_configured() is False  # cached answer
    monkeypatch.setattr(store_module, "AUTH_CONFIGURED_CACHE_S", 0.0)
    assert store.auth_configured() is True
    other.revoke_api_key(key)
    assert store.auth_configured() is True  # revoking the last key must not open the API
    other.close()


def scan_everything(client: redis.Redis) -> list[bytes]:
    """Every key name and every stored value, as bytes."""
    found: list[bytes] = []
    for name in client.scan_iter():
        found.append(name)
        kind = client.type(name)
        if kind == b"string":
            found.append(client.get(name))
        elif kind == b"hash":
            for field, value in client.hgetall(name).items():
                found += [field, value]
        elif kind == b"set":
            found += list(client.smembers(name))
        elif kind == b"stream":
            for _, fields in client.xrange(name):
                found += [*fields.keys(), *fields.values()]
        else:
            raise AssertionError(f"unexpected type {kind!r} of {name!r}")
    return found


def test_api_keys_are_stored_hashed(store: RedisStore, redis_client: redis.Redis) -> None:
    import hashlib

    key = store.add_api_key("acme", categories=["bottle"], rate_per_minute=5)
    store.authenticate(key, "bottle")
    store.allow(key, 5)
    revoked = store.add_api_key("acme")
    store.revoke_api_key(revoked)
    stored = scan_everything(redis_client)
    assert len(stored) > 4
    for plaintext in (key, revoked):
        assert not any(plaintext.encode() in item for item in stored)
    assert any(hashlib.sha256(key.encode()).hexdigest().encode() in item for item in stored)


def test_rate_limit_allows_n_then_denies(store: RedisStore) -> None:
    to_next_minute = 60 - time.time() % 60
    if to_next_minute < 2:  # keep all calls inside one fixed window
        time.sleep(to_next_minute + 0.05)
    key = store.add_api_key("acme", rate_per_minute=3)
    other = store.add_api_key("globex", rate_per_minute=3)
    assert [store.allow(key, 3) for _ in range(3)] == [(True, 0.0)] * 3
    allowed, retry_after = store.allow(key, 3)
    assert allowed is False and 0 < retry_after <= 60
    assert store.allow(other, 3) == (True, 0.0)  # counted per key
    assert all(store.allow(key, None)[0] for _ in range(5))  # no limit


def test_auth_while_redis_down(
    own_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX)
    other = RedisStore(own_server.url, tmp_path / "spool", prefix=PREFIX)
    key = store.add_api_key("acme", categories=["bottle"])
    never_seen = other.add_api_key("acme", categories=["bottle"])
    assert store.authenticate(key, "bottle").tenant == "acme"
    own_server.stop()

    assert store.authenticate(key, "bottle").tenant == "acme"  # verified a moment ago
    with pytest.raises(AuthError) as refused:
        store.authenticate(key, "screw")  # the remembered grant still limits categories
    assert refused.value.status == 403
    with pytest.raises(StoreUnavailable):
        store.authenticate(never_seen, "bottle")
    with pytest.raises(AuthError) as refused:
        store.authenticate(None)
    assert refused.value.status == 401
    monkeypatch.setattr(store_module, "VERIFIED_KEY_GRACE_S", 0.0)  # the grace has passed
    with pytest.raises(StoreUnavailable):
        store.authenticate(key, "bottle")
    assert store.auth_configured() is True
    store.close()
    other.close()
