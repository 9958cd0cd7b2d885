"""The serving router's one door to Redis.

It holds the result cache, the result stream, defect descriptions, API keys and
rate limits.

Redis helps inspection but must never fail or stall it. Every call carries a
short socket timeout and no client-side retries; after a connection failure a
circuit breaker skips Redis for ``retry_after_s``, then lets one call probe it.
While Redis is down the cache misses, rate limits allow, descriptions come from
an in-memory mirror, and results go to a spool on disk that
:meth:`RedisStore.replay_spool` moves into the stream once Redis is back.

An inspection reads Redis once before it runs (:meth:`RedisStore.lookup`: the
registered descriptions it may rank and its cached answer) and writes once after
(:meth:`RedisStore.publish`: the stream and the cache).

Results reach the stream exactly once: one Lua script marks the request id as
published (``SET NX``) and appends only if the mark was new, so a result
replayed after a lost reply, or by two routers, is appended once.

No Ray here: the router wraps this class, and tests run it against a real
redis-server.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

T = TypeVar("T")

# How long a key verified against Redis stays good while Redis is down.
VERIFIED_KEY_GRACE_S = 60.0
# How long auth_configured() trusts its last answer.
AUTH_CONFIGURED_CACHE_S = 5.0
RATE_WINDOW_S = 60

# Errors that mean "Redis is unreachable", as opposed to a bad command.
# (redis-py's TimeoutError is not a ConnectionError.)
_DOWN_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

# KEYS: published marker, stream. ARGV: marker ttl, maxlen, request id, result json.
# Returns the new entry id, or nil when the request id was already published.
_PUBLISH_ONCE_LUA = """
if redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[2], '*',
                    'request_id', ARGV[3], 'result', ARGV[4])
end
return false
"""


class StoreUnavailable(RuntimeError):
    """Redis is down and the operation cannot be done without it."""


class AuthError(Exception):
    """A request's API key was refused.

    Args:
        status: HTTP status to answer: 401 (missing or unknown key) or 403
            (revoked key, or a category the key does not cover).
        detail: Why, in words safe to send to the caller.
    """

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"{status}: {detail}")
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class ApiKey:
    """What an API key grants.

    Attributes:
        tenant: Who the key belongs to.
        categories: Product categories the key may inspect; ``None`` means all.
        rate_per_minute: Requests allowed per minute; ``None`` means unlimited.
    """

    tenant: str
    categories: tuple[str, ...] | None
    rate_per_minute: int | None


def _key_hash(key: str) -> str:
    # Keys are kept only as their sha256: a dump of Redis gives no usable key.
    return hashlib.sha256(key.encode()).hexdigest()


class RedisStore:
    """Cache, result stream, descriptions and API keys in one Redis.

    Args:
        url: ``redis://`` URL (database included).
        spool_dir: Folder for results that could not be published; several
            routers may share it.
        prefix: Namespace of every Redis key.
        stream_maxlen: Approximate bound of the result stream (``MAXLEN ~``).
        cache_ttl_s: Lifetime of a cached result.
        socket_timeout_s: Connect and read timeout of every Redis call.
        retry_after_s: How long to skip Redis after a connection failure.
        published_ttl_s: How long a request id is remembered as published, i.e.
            the window in which a replay is recognised as a duplicate.
    """

    def __init__(
        self,
        url: str,
        spool_dir: str | Path,
        *,
        prefix: str = "inspectray",
        stream_maxlen: int = 100_000,
        cache_ttl_s: int = 3600,
        socket_timeout_s: float = 0.25,
        retry_after_s: float = 2.0,
        published_ttl_s: int = 7 * 24 * 3600,
    ) -> None:
        self.url = url
        self.prefix = prefix
        self.stream = f"{prefix}:results"
        self.stream_maxlen = stream_maxlen
        self.cache_ttl_s = cache_ttl_s
        self.socket_timeout_s = socket_timeout_s
        self.retry_after_s = retry_after_s
        self.published_ttl_s = published_ttl_s
        self._redis = self._connect(socket_timeout_s)
        # Blocking stream reads outlive socket_timeout_s: one client per block time.
        self._blocking: dict[int, redis.Redis] = {}
        self._publish_once = self._redis.register_script(_PUBLISH_ONCE_LUA)

        # Circuit breaker: _retry_at is when Redis may be tried again.
        self._breaker_lock = threading.Lock()
        self._down_since: float | None = None
        self._retry_at = 0.0

        self.spool_dir = Path(spool_dir)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self._spool_lock = threading.Lock()
        self._spool_fd: int | None = None
        self._spool_path: Path | None = None

        # What this store last saw, for answering while Redis is down.
        self._descriptions: dict[str, list[dict]] = {}
        self._taxonomy: dict[str, list[dict]] = {}
        self._verified: dict[str, tuple[ApiKey, float]] = {}  # key hash -> (grant, when)
        self._auth_configured: tuple[bool, float] | None = None

    # -- connection and circuit breaker ------------------------------------------

    def _connect(self, socket_timeout_s: float) -> redis.Redis:
        # No retries: a retry multiplies the stall; the breaker and spool cover it.
        return redis.Redis.from_url(
            self.url,
            socket_timeout=socket_timeout_s,
            socket_connect_timeout=self.socket_timeout_s,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )

    @property
    def available(self) -> bool:
        """Whether Redis is believed up (no connection failure since the last success)."""
        return self._down_since is None

    def _may_try(self) -> bool:
        with self._breaker_lock:
            now = time.monotonic()
            if now < self._retry_at:
                return False
            if self._down_since is not None:
                # Half-open: this call probes, the others keep skipping meanwhile.
                self._retry_at = now + self.retry_after_s
            return True

    def _succeeded(self) -> None:
        if self._down_since is not None:
            with self._breaker_lock:
                if self._down_since is not None:
                    logger.info(
                        "redis %s is back after %.1f s",
                        self._safe_url(),
                        time.monotonic() - self._down_since,
                    )
                self._down_since = None
                self._retry_at = 0.0

    def _failed(self, error: Exception) -> None:
        with self._breaker_lock:
            now = time.monotonic()
            if self._down_since is None:
                # Once per outage: the breaker keeps the log quiet after that.
                logger.warning(
                    "redis %s unreachable (%s); skipping it for %.1f s at a time",
                    self._safe_url(),
                    error,
                    self.retry_after_s,
                )
                self._down_since = now
            self._retry_at = now + self.retry_after_s

    def _safe_url(self) -> str:
        # Never log a password.
        return self.url.split("@")[-1]

    def _call(self, command: Callable[[redis.Redis], T]) -> T:
        """Run ``command`` through the breaker.

        Raises:
            StoreUnavailable: the breaker is open, or Redis could not be reached.
        """
        if not self._may_try():
            raise StoreUnavailable(f"redis {self._safe_url()} is down")
        try:
            value = command(self._redis)
        except _DOWN_ERRORS as error:
            self._failed(error)
            raise StoreUnavailable(f"redis {self._safe_url()} is down: {error}") from error
        except redis.exceptions.ResponseError:
            self._succeeded()  # Redis answered, if only to refuse the command
            raise
        self._succeeded()
        return value

    def ping(self) -> bool:
        """Send a real PING, whatever the breaker says, and update the breaker.

        Returns:
            Whether Redis answered.
        """
        try:
            self._redis.ping()
        except _DOWN_ERRORS as error:
            self._failed(error)
            return False
        self._succeeded()
        return True

    # -- result cache -------------------------------------------------------------

    @staticmethod
    def cache_key(
        image_sha256: str,
        category: str | None,
        options: Mapping[str, Any],
        model_versions: Mapping[str, str],
    ) -> str:
        """The cache key of one inspection: same image, options and models, same key.

        Args:
            image_sha256: Hash of the image bytes.
            category: Product category asked for (``None`` when routed).
            options: Request options that change the answer.
            model_versions: Stage name to model version; a new model means a new key.

        Returns:
            ``"answer:<sha256>"``; the store puts its own prefix in front.
        """
        identity = {
            "image_sha256": image_sha256,
            "category": category,
            "options": dict(options),
            "model_versions": dict(model_versions),
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return "answer:" + hashlib.sha256(canonical.encode()).hexdigest()

    def _cached(self, key: str, tag: str, entry: Sequence[str | None]) -> dict | None:
        """The result of a cache entry ``(result, tag)`` if it was cached under ``tag``."""
        raw, cached_tag = entry
        if raw is None or (cached_tag or "") != tag:
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            logger.warning("cache entry %s is not JSON; treated as a miss", key)
            return None

    def get_cached(self, key: str, tag: str = "") -> dict | None:
        """The result cached under ``key`` (from :meth:`cache_key`) and ``tag``.

        Args:
            key: The entry's key.
            tag: What else the answer depended on (the registered defect types);
                an entry cached under another tag is a miss.

        Returns:
            The result, or ``None`` on a miss or while Redis is down.
        """
        try:
            entry = self._call(lambda r: r.hmget(f"{self.prefix}:{key}", "result", "tag"))
        except StoreUnavailable:
            return None
        return self._cached(key, tag, entry)

    def lookup(
        self, key: str, categories: Sequence[str], tag: Callable[[Mapping[str, list[dict]]], str]
    ) -> tuple[dict[str, list[dict]], str, dict | None]:
        """Everything an inspection reads before it runs, in one round trip.

        Args:
            key: The cache key (from :meth:`cache_key`).
            categories: The categories whose registered descriptions the answer
                may depend on.
            tag: The cache tag those descriptions make (see :meth:`get_cached`).

        Returns:
            Each category's registered descriptions (as :meth:`descriptions`;
            while Redis is down, the last ones seen), their tag, and the result
            cached under the key and that tag, or ``None`` on a miss or while
            Redis is down.
        """

        def read(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for category in categories:
                pipe.hgetall(f"{self.prefix}:descriptions:{category}")
            pipe.hmget(f"{self.prefix}:{key}", "result", "tag")
            return pipe.execute()

        try:
            *found, entry = self._call(read)
        except StoreUnavailable:
            seen = {c: list(self._descriptions.get(c, [])) for c in categories}
            return seen, tag(seen), None
        described = {}
        for category, raw in zip(categories, found, strict=True):
            self._descriptions[category] = _sorted_descriptions(raw)
            described[category] = list(self._descriptions[category])
        tagged = tag(described)
        return described, tagged, self._cached(key, tagged, entry)

    def put_cached(self, key: str, result: Mapping[str, Any], tag: str = "") -> None:
        """Cache ``result`` under ``key`` and ``tag`` for ``cache_ttl_s``.

        Does nothing while Redis is down or at TTL 0.
        """
        if self.cache_ttl_s <= 0:
            return
        payload = json.dumps(result, separators=(",", ":"))

        def put(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=False)
            self._cache_in(pipe, key, payload, tag)
            pipe.execute()

        with contextlib.suppress(StoreUnavailable):
            self._call(put)

    def _cache_in(self, pipe: redis.client.Pipeline, key: str, payload: str, tag: str) -> None:
        """Queue the commands that cache ``payload`` under ``key`` and ``tag``."""
        name = f"{self.prefix}:{key}"
        pipe.hset(name, mapping={"result": payload, "tag": tag})
        pipe.expire(name, self.cache_ttl_s)

    # -- result stream ------------------------------------------------------------

    def _append_once(self, request_id: str, payload: str) -> str | None:
        """Run the publish script: the new entry id, or ``None`` if already published.

        Raises:
            StoreUnavailable: Redis is down (the result may or may not be in).
        """
        marker = f"{self.prefix}:published:{request_id}"
        return self._call(
            lambda r: self._publish_once(
                keys=[marker, self.stream],
                args=[self.published_ttl_s, self.stream_maxlen, request_id, payload],
                client=r,
            )
        )

    def _append_and_cache(
        self, request_id: str, payload: str, cache_key: str, cache_tag: str
    ) -> None:
        """The publish script and the cache entry in one round trip (a pipeline).

        The script runs by its hash alone: a pipeline given the script object
        would first ask Redis whether it knows the script, a second round trip
        on every answer. A Redis that does not know it (restarted, or its
        scripts flushed) refuses with NOSCRIPT; the script is loaded and both
        commands run again: the cache entry is only set again, and the script
        appends a request id once.

        Raises:
            StoreUnavailable: Redis is down (the result may or may not be in).
        """
        marker = f"{self.prefix}:published:{request_id}"
        args = (self.published_ttl_s, self.stream_maxlen, request_id, payload)

        def both(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=False)
            self._cache_in(pipe, cache_key, payload, cache_tag)
            pipe.evalsha(self._publish_once.sha, 2, marker, self.stream, *args)
            pipe.execute()

        def loaded_then_both(r: redis.Redis) -> None:
            try:
                both(r)
            except redis.exceptions.NoScriptError:
                r.script_load(_PUBLISH_ONCE_LUA)
                both(r)

        self._call(loaded_then_both)

    def publish(
        self, result: Mapping[str, Any], cache_key: str | None = None, cache_tag: str = ""
    ) -> bool:
        """Append ``result`` to the stream, or to the spool on disk if Redis is down.

        Args:
            result: A JSON-able result with a ``request_id``.
            cache_key: also cache it under this key (from :meth:`cache_key`), in
                the same round trip; a result spooled is not cached.
            cache_tag: and under this tag (see :meth:`get_cached`).

        Returns:
            ``True`` if the result is in the stream now (appended, or already
            there), ``False`` if it was spooled for :meth:`replay_spool`.

        Raises:
            ValueError: ``result`` has no ``request_id``.
        """
        request_id = result.get("request_id")
        if not request_id:
            raise ValueError("a published result needs a request_id")
        payload = json.dumps(result, separators=(",", ":"))
        try:
            if cache_key is not None and self.cache_ttl_s > 0:
                self._append_and_cache(str(request_id), payload, cache_key, cache_tag)
            else:
                self._append_once(str(request_id), payload)
        except StoreUnavailable:
            self._spool(payload)
            return False
        return True

    def _spool(self, payload: str) -> None:
        data = (payload + "\n").encode()
        with self._spool_lock:
            while True:
                fd = self._open_spool()
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    # A replay holds this file: write a new one rather than wait on it.
                    self._close_spool()
                    continue
                if os.fstat(fd).st_nlink == 0:
                    # A replay emptied and unlinked it: start a fresh file.
                    self._close_spool()  # closing releases the lock
                    continue
                try:
                    size = os.fstat(fd).st_size
                    if size and os.pread(fd, 1, size - 1) != b"\n":
                        # A write cut short (disk full): end that line so ours stays whole.
                        data = b"\n" + data
                    view = memoryview(data)
                    while view:
                        view = view[os.write(fd, view) :]
                    os.fsync(fd)
                    return
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def _open_spool(self) -> int:
        if self._spool_fd is None:
            self._spool_path = self.spool_dir / f"spool-{uuid.uuid4().hex}.jsonl"
            self._spool_fd = os.open(self._spool_path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        return self._spool_fd

    def _close_spool(self) -> None:
        if self._spool_fd is not None:
            os.close(self._spool_fd)
        self._spool_fd = None
        self._spool_path = None

    def _spool_files(self) -> list[Path]:
        return sorted(self.spool_dir.glob("spool-*.jsonl"))

    def spooled(self) -> int:
        """Results waiting on disk, in every spool file of the folder."""
        total = 0
        for path in self._spool_files():
            try:
                total += sum(1 for line in path.read_bytes().split(b"\n") if line.strip())
            except FileNotFoundError:
                continue  # replayed meanwhile
        return total

    def replay_spool(self) -> int:
        """Move spooled results, from every file in the folder, into the stream.

        A file is claimed under an exclusive lock (a file busy elsewhere is left
        for the next call), its lines are published one by one, and it is
        removed only once every line is in. If Redis fails midway the file stays
        whole; the lines already in are recognised as duplicates next time.

        Returns:
            How many results were appended (duplicates not counted).
        """
        appended = 0
        for path in self._spool_files():
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                if os.fstat(fd).st_nlink == 0:
                    continue  # another router replayed it between our listing and lock
                added, finished = self._replay_file(fd, path)
                appended += added
                if not finished:
                    return appended  # Redis failed midway: the file stays for next time
                path.unlink()
            finally:
                os.close(fd)  # also releases the lock
        return appended

    def _replay_file(self, fd: int, path: Path) -> tuple[int, bool]:
        """Publish every line of one claimed spool file.

        Returns:
            How many results were appended, and whether every line is now in.
        """
        with os.fdopen(os.dup(fd), "rb") as spool:
            lines = spool.read().split(b"\n")
        appended = 0
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                request_id = str(json.loads(line)["request_id"])
            except (ValueError, KeyError, TypeError):
                # Most likely the tail of a write cut short by a crash.
                logger.warning("skipping unreadable line %d of %s: %.80r", number, path, line)
                continue
            try:
                if self._append_once(request_id, line.decode()) is not None:
                    appended += 1
            except StoreUnavailable:
                return appended, False
        return appended, True

    def ensure_group(self, group: str, start: str = "0") -> None:
        """Create consumer group ``group`` on the stream (and the stream); idempotent.

        Raises:
            StoreUnavailable: Redis is down.
        """

        def create(r: redis.Redis) -> None:
            try:
                r.xgroup_create(self.stream, group, id=start, mkstream=True)
            except redis.exceptions.ResponseError as error:
                if "BUSYGROUP" not in str(error):
                    raise

        self._call(create)

    def read_group(
        self, group: str, consumer: str, count: int = 10, block_ms: int | None = None
    ) -> list[tuple[str, dict]]:
        """Read new results for ``consumer`` of ``group``.

        Args:
            group: Consumer group (see :meth:`ensure_group`).
            consumer: This reader's name in the group.
            count: At most this many entries.
            block_ms: Wait up to this long for an entry; ``None`` returns at once.

        Returns:
            ``(entry_id, result)`` pairs, oldest first.

        Raises:
            StoreUnavailable: Redis is down.
        """
        if block_ms is None:
            client = self._redis
        else:
            if block_ms not in self._blocking:
                self._blocking[block_ms] = self._connect(self.socket_timeout_s + block_ms / 1000)
            client = self._blocking[block_ms]
        reply = self._call(
            lambda _: client.xreadgroup(
                group, consumer, {self.stream: ">"}, count=count, block=block_ms
            )
        )
        entries: list[tuple[str, dict]] = []
        for _stream, stream_entries in reply or []:
            for entry_id, fields in stream_entries:
                if fields:  # an entry trimmed away since delivery has no fields
                    entries.append((entry_id, json.loads(fields["result"])))
        return entries

    def ack(self, group: str, entry_ids: Sequence[str]) -> int:
        """Acknowledge entries of ``group``.

        Returns:
            How many were pending and are now acknowledged.

        Raises:
            StoreUnavailable: Redis is down.
        """
        if not entry_ids:
            return 0
        return int(self._call(lambda r: r.xack(self.stream, group, *entry_ids)))

    # -- defect taxonomy and registered descriptions -----------------------------

    def set_taxonomy(self, category: str, types: Sequence[Mapping[str, Any]]) -> None:
        """Record the defect types ``category``'s classifier was trained on.

        Raises:
            StoreUnavailable: Redis is down.
        """
        plain = [dict(t) for t in types]
        payload = json.dumps(plain)
        self._call(lambda r: r.set(f"{self.prefix}:taxonomy:{category}", payload))
        self._taxonomy[category] = plain

    def taxonomy(self, category: str) -> list[dict]:
        """The trained defect types of ``category``; the last seen ones while Redis is down."""
        try:
            raw = self._call(lambda r: r.get(f"{self.prefix}:taxonomy:{category}"))
        except StoreUnavailable:
            return list(self._taxonomy.get(category, []))
        types = json.loads(raw) if raw else []
        self._taxonomy[category] = types
        return list(types)

    def register_description(self, category: str, description: Mapping[str, Any]) -> None:
        """Add or replace (by name) a defect description registered at run time.

        Args:
            category: Product category it applies to.
            description: ``name``, ``description``, ``keywords``, ``contrast``.

        Raises:
            ValueError: ``description`` has no ``name``.
            StoreUnavailable: Redis is down (the caller answers 503).
        """
        name = description.get("name")
        if not name:
            raise ValueError("a defect description needs a name")
        plain = dict(description)
        payload = json.dumps(plain)
        self._call(lambda r: r.hset(f"{self.prefix}:descriptions:{category}", name, payload))
        mirror = [d for d in self._descriptions.get(category, []) if d["name"] != name]
        self._descriptions[category] = sorted([*mirror, plain], key=lambda d: d["name"])

    def descriptions(self, category: str) -> list[dict]:
        """Registered descriptions of ``category``, sorted by name.

        Returns:
            From Redis; while it is down, the last ones this store saw.
        """
        try:
            raw = self._call(lambda r: r.hgetall(f"{self.prefix}:descriptions:{category}"))
        except StoreUnavailable:
            return list(self._descriptions.get(category, []))
        self._descriptions[category] = _sorted_descriptions(raw)
        return list(self._descriptions[category])

    # -- API keys and rate limits -------------------------------------------------

    def _api_key_record(self, key_hash: str) -> str:
        return f"{self.prefix}:apikey:{key_hash}"

    def add_api_key(
        self,
        tenant: str,
        categories: Sequence[str] | None = None,
        rate_per_minute: int | None = None,
        key: str | None = None,
    ) -> str:
        """Create an API key for ``tenant``.

        Args:
            tenant: Who the key belongs to.
            categories: Categories it may inspect; ``None`` means all.
            rate_per_minute: Its rate limit; ``None`` means unlimited.
            key: The key to use; default a new random one.

        Returns:
            The key. Only its sha256 is stored: this is the one time it is seen.

        Raises:
            StoreUnavailable: Redis is down.
        """
        key = key or secrets.token_urlsafe(32)
        key_hash = _key_hash(key)
        record = {
            "tenant": tenant,
            "categories": json.dumps(list(categories) if categories is not None else None),
            "rate_per_minute": "" if rate_per_minute is None else str(rate_per_minute),
            "revoked": "0",
            "created_at": str(time.time()),
        }

        def add(r: redis.Redis) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.hset(self._api_key_record(key_hash), mapping=record)
            pipe.sadd(f"{self.prefix}:apikeys", key_hash)
            pipe.execute()

        self._call(add)
        self._auth_configured = (True, time.monotonic())
        return key

    def revoke_api_key(self, key: str) -> bool:
        """Revoke ``key``; it is kept, marked, so callers get 403 rather than 401.

        Returns:
            Whether the key existed and was live.

        Raises:
            StoreUnavailable: Redis is down.
        """
        key_hash = _key_hash(key)
        record = self._api_key_record(key_hash)

        def revoke(r: redis.Redis) -> bool:
            previous = r.hget(record, "revoked")
            if previous != "0":
                return False
            r.hset(record, "revoked", "1")
            return True

        revoked = self._call(revoke)
        self._verified.pop(key_hash, None)
        return revoked

    def auth_configured(self) -> bool:
        """Whether any API key was ever added; cached for a few seconds.

        Revoked keys count: revoking the last key must not open the API. While
        Redis is down: the last answer, or ``True`` if there is none, so that an
        outage never opens a protected API.
        """
        cached = self._auth_configured
        if cached is not None and time.monotonic() - cached[1] < AUTH_CONFIGURED_CACHE_S:
            return cached[0]
        try:
            configured = bool(self._call(lambda r: r.exists(f"{self.prefix}:apikeys")))
        except StoreUnavailable:
            return True if cached is None else cached[0]
        self._auth_configured = (configured, time.monotonic())
        return configured

    def authenticate(self, key: str | None, category: str | None = None) -> ApiKey:
        """Check an API key, and that it covers ``category``.

        Args:
            key: The key the caller sent (``None`` if none).
            category: The category asked for; ``None`` skips that check.

        Returns:
            What the key grants.

        Raises:
            AuthError: 401 for a missing or unknown key; 403 for a revoked key or
                a category outside the key's categories.
            StoreUnavailable: Redis is down and the key was not verified in the
                last ``VERIFIED_KEY_GRACE_S`` seconds.
        """
        if not key:
            raise AuthError(401, "missing API key")
        key_hash = _key_hash(key)
        try:
            record = self._call(lambda r: r.hgetall(self._api_key_record(key_hash)))
        except StoreUnavailable:
            seen = self._verified.get(key_hash)
            if seen is None or time.monotonic() - seen[1] > VERIFIED_KEY_GRACE_S:
                raise
            grant = seen[0]
        else:
            if not record:
                raise AuthError(401, "unknown API key")
            if record.get("revoked") != "0":
                self._verified.pop(key_hash, None)
                raise AuthError(403, "revoked API key")
            categories = json.loads(record.get("categories") or "null")
            rate = record.get("rate_per_minute")
            grant = ApiKey(
                tenant=record["tenant"],
                categories=tuple(categories) if categories is not None else None,
                rate_per_minute=int(rate) if rate else None,
            )
            self._remember_verified(key_hash, grant)
        if (
            category is not None
            and grant.categories is not None
            and category not in grant.categories
        ):
            raise AuthError(403, f"category {category!r} is not covered by this key")
        return grant

    def _remember_verified(self, key_hash: str, grant: ApiKey) -> None:
        now = time.monotonic()
        if len(self._verified) > 4096:
            # Keep the grace cache small: drop what is past its grace anyway.
            self._verified = {
                h: seen
                for h, seen in self._verified.items()
                if now - seen[1] <= VERIFIED_KEY_GRACE_S
            }
        self._verified[key_hash] = (grant, now)

    def allow(self, key: str, rate_per_minute: int | None) -> tuple[bool, float]:
        """Count one request of ``key`` in the current one-minute window.

        Args:
            key: The API key (hashed before it reaches Redis).
            rate_per_minute: The key's limit; ``None`` means unlimited.

        Returns:
            ``(allowed, retry_after_s)``; ``retry_after_s`` is the time to the next
            window when refused, else 0. Always allowed while Redis is down.
        """
        if rate_per_minute is None:
            return True, 0.0
        now = time.time()
        window = int(now // RATE_WINDOW_S)
        counter = f"{self.prefix}:rate:{_key_hash(key)}:{window}"

        def count(r: redis.Redis) -> int:
            pipe = r.pipeline(transaction=True)
            pipe.incr(counter)
            pipe.expire(counter, RATE_WINDOW_S)
            return int(pipe.execute()[0])

        try:
            used = self._call(count)
        except StoreUnavailable:
            return True, 0.0
        if used <= rate_per_minute:
            return True, 0.0
        retry_after = RATE_WINDOW_S - (now % RATE_WINDOW_S)
        return False, retry_after if retry_after > 0 else float(RATE_WINDOW_S)

    # -- the review queue ---------------------------------------------------------

    def _review_key(self, kind: str, review_id: str = "") -> str:
        return f"{self.prefix}:review:{kind}" + (f":{review_id}" if review_id else "")

    def enqueue_review(
        self, item: Mapping[str, Any], image_png: bytes, max_pending: int = 10_000
    ) -> None:
        """Queue an answer for a person to review, with its image.

        ``item["id"]`` is the answer's request id. Past ``max_pending`` waiting
        items, the oldest waiting ones leave the queue (reviewed ones are kept).

        Raises:
            StoreUnavailable: Redis is down (the answer stands; it is not queued).
        """
        review_id = str(item["id"])
        payload = json.dumps(dict(item))
        image = base64.b64encode(image_png).decode("ascii")

        def queue(r: redis.Redis) -> list[str]:
            pipe = r.pipeline(transaction=True)
            pipe.set(self._review_key("item", review_id), payload)
            pipe.set(self._review_key("image", review_id), image)
            pipe.zadd(self._review_key("pending"), {review_id: time.time()})
            pipe.execute()
            overflow = r.zcard(self._review_key("pending")) - max_pending
            dropped = r.zpopmin(self._review_key("pending"), overflow) if overflow > 0 else []
            for old, _ in dropped:
                r.delete(self._review_key("item", old), self._review_key("image", old))
            return [old for old, _ in dropped]

        self._call(queue)

    def pending_reviews(
        self, limit: int = 50, category: str | None = None, newest: bool = False
    ) -> list[dict]:
        """The waiting items, oldest first or ``newest`` first (of ``category`` only, when given).

        Raises:
            StoreUnavailable: Redis is down.
        """

        def read(r: redis.Redis) -> list[dict]:
            found: list[dict] = []
            start = 0
            while len(found) < limit:
                ids = r.zrange(self._review_key("pending"), start, start + 199, desc=newest)
                if not ids:
                    break
                start += len(ids)
                raw = r.mget([self._review_key("item", i) for i in ids])
                items = [json.loads(v) for v in raw if v]
                found += [i for i in items if category in (None, i.get("category"))]
            return found[:limit]

        return self._call(read)

    def review_queue_length(self) -> int:
        """How many items wait for a review (Redis down: raises StoreUnavailable)."""
        return int(self._call(lambda r: r.zcard(self._review_key("pending"))))

    def review_image(self, review_id: str) -> bytes | None:
        """The image of a queued or reviewed item (None: no such item)."""
        raw = self._call(lambda r: r.get(self._review_key("image", review_id)))
        return base64.b64decode(raw) if raw else None

    def record_review(self, review_id: str, review: Mapping[str, Any]) -> dict:
        """Store a person's review of an item: it leaves the queue, durably recorded.

        A second review of the same item replaces the first (a correction); each is
        also appended to the reviews stream, the audit trail.

        Returns:
            The item with its ``review``.

        Raises:
            KeyError: no such item.
            StoreUnavailable: Redis is down.
        """

        def record(r: redis.Redis) -> dict:
            raw = r.get(self._review_key("item", review_id))
            if raw is None:
                raise KeyError(review_id)
            item = json.loads(raw) | {"review": dict(review)}
            payload = json.dumps(item)
            pipe = r.pipeline(transaction=True)
            pipe.set(self._review_key("item", review_id), payload)
            pipe.zrem(self._review_key("pending"), review_id)
            pipe.zadd(self._review_key("done"), {review_id: time.time()})
            pipe.xadd(self._review_key("log"), {"id": review_id, "item": payload})
            pipe.execute()
            return item

        return self._call(record)

    def reviewed(self, category: str | None = None) -> list[dict]:
        """Every reviewed item with its review, oldest review first."""

        def read(r: redis.Redis) -> list[dict]:
            ids = r.zrange(self._review_key("done"), 0, -1)
            found = []
            for start in range(0, len(ids), 500):
                chunk = ids[start : start + 500]
                raw = r.mget([self._review_key("item", i) for i in chunk])
                found += [json.loads(v) for v in raw if v]
            return [i for i in found if category in (None, i.get("category"))]

        return self._call(read)

    def close(self) -> None:
        """Close the spool file and the Redis connections."""
        with self._spool_lock:
            self._close_spool()
        for client in [self._redis, *self._blocking.values()]:
            client.close()
        self._blocking.clear()


__all__ = ["ApiKey", "AuthError", "RedisStore", "StoreUnavailable"]


def _sorted_descriptions(raw: Mapping[str, str]) -> list[dict]:
    """A category's descriptions hash as a list sorted by name."""
    return sorted((json.loads(v) for v in raw.values()), key=lambda d: d["name"])
