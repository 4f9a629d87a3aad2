"""Feature store on a Redis Cluster (redis-py's cluster client), selected by a
``redis+cluster://host:port[,host:port...]`` URL: the listed nodes are seeds, the client learns
the rest of the cluster from them.

Keys (the prefix must not contain braces: they would become the hash tag of every key)::

    {prefix}:current                         the newest published version's name
    {prefix}:published                       hash: version -> last publish time (Unix seconds)
    {prefix}:v:{version}:meta                JSON {"layout", "count", "created", "buckets",
                                             "grace_ms", "written"}
    {prefix}:v:{version}:i:{<tag>}<id>       one item's value (see format.py)

**Spreading items over the cluster.** A hash tag naming the version would put a whole version
on one slot, hence one node. No hash tag at all spreads items over every slot, but then one
request's 1,000 ids hit ~1,000 slots and, since MGET must stay within one slot, need ~1,000
commands (measured here: 9 ms with a hand-made pipeline, 24 ms with redis-py's
``mget_nonatomic``, against 1.4 ms for one MGET on a single Redis). So each item goes to one of
``buckets`` (default 64) buckets, ``crc32(id) % buckets``, and each bucket has a hash tag
chosen so that bucket b lands in the b-th 1/buckets of the slot range: the buckets spread evenly
over the masters (which own contiguous slot ranges), and one fetch is at most one MGET per
bucket. The tags are listed in the version's meta, so readers never recompute them and a
version keeps its buckets whatever a later publisher is configured with. A cluster can spread a
version over at most ``buckets`` masters.

**One round trip per shard owner.** A fetch groups its buckets by the master owning each
bucket's slot (the client's slot map), writes one pipeline of MGETs to every master before
reading any reply, and adds ``GET meta`` of the version to the pipeline of the master that
owns the meta key. A redirection (MOVED/ASK/TRYAGAIN after resharding or failover) refreshes
the slot map and redoes that attempt through redis-py's ``mget_nonatomic``, which follows
redirections, then reads the meta after every item.

**Only whole versions, across slots.** The single-Redis store reads a version's meta in the
same MGET as its items. A cluster has no atomic read across slots, and a meta read sent in
parallel with the item reads proves nothing on its own: the master holding the meta may answer
before a publisher retires the version, while another master serves the item reads after the
items were deleted (rows reported missing). Versions live side by side (readers name the
version their model reads; see base.py), so the question is only whether the version read was
whole and untouched during the read. The argument:

1. *Publisher.* Writes every item of a version, then its meta, whose value carries an id unique
   to this write (uuid4) and the publisher's deletion grace G. Retiring a version deletes its
   meta first, waits the G written in that meta after the delete returned, and only then
   deletes its items. So a version's items are complete whenever its meta exists, and stay
   untouched until at least G after the meta is gone (one publisher at a time, as for every
   backend; a version name never names other content).
2. *Reader.* Holds a meta value M of version v (with grace G) read at some time t0. It notes
   its monotonic clock at r0 (after t0), sends the item MGETs and ``GET meta`` to every master,
   reads every reply, notes r1. If the meta reply is M again, that meta was not deleted between
   t0 and its read at t_p in [r0, r1] (a rewrite would carry a new write id), so deletion of
   v's items starts after t_p >= r0 plus G. Every item read happened before r1; if r1 - r0 < G
   they all happened before any item of v was deleted, and after v was complete (M existed at
   t0 < r0): the rows are v's, whole.
3. If the round trip took G or longer (a stall), the reader reads the meta again after all the
   replies: still M means no deletion had started when the items were read. A meta reply of
   None means v was retired: the fetch raises FeatureVersionMissing. Another value means v was
   retired and written again (same content): the fetch is redone with it as the new M (at most
   3 attempts).

The meta read at the end of one fetch is the t0 of the next, so the steady state is one round
trip per master. Monotonic clocks of reader and publisher only need to tick at about the same
rate (they are never compared). A reader that holds no meta of v yet reads it first.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import lru_cache
from typing import Any
from urllib.parse import unquote, urlsplit

import numpy as np
from redis.backoff import NoBackoff
from redis.cluster import ClusterNode, RedisCluster
from redis.crc import REDIS_CLUSTER_HASH_SLOTS, key_slot
from redis.exceptions import (
    AskError,
    AuthenticationError,
    ClusterDownError,
    RedisClusterException,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.retry import Retry

try:
    import hiredis
except ImportError:  # redis[hiredis] is a dependency; plain redis-py still works
    hiredis = None

from service.errors import (
    FeatureFormatError,
    FeatureStoreFault,
    FeatureStoreUnavailable,
)
from service.features.base import FeatureBatch, PublishesVersions, batch_from_values
from service.features.format import FeatureLayout, encode_matrix
from service.features.redis_store import _glob_escape

SCHEME = "redis+cluster"
DEFAULT_BUCKETS = 64
DEFAULT_GRACE_S = 2.0
_FETCH_ATTEMPTS = 3
_VERSIONS_KEPT = 8  # parsed metas kept per store: the versions a process reads at once
_SCAN_COUNT = 1000
_REDIRECTIONS = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


@dataclass(frozen=True)
class _Version:
    """What a reader needs of one (immutable) version, parsed from one meta value."""

    name: str
    meta: bytes  # the whole meta value: its write id makes it unique per write
    layout: FeatureLayout
    tags: tuple[str, ...]
    slots: tuple[int, ...]  # slot of each bucket
    grace_s: float  # the deletion grace its publisher promised (docstring: 1.)


class RedisClusterFeatureStore(PublishesVersions):
    def __init__(
        self,
        connect: Callable[[], RedisCluster],
        prefix: str = "fusionrank",
        *,
        buckets: int = DEFAULT_BUCKETS,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> None:
        """``connect`` makes the cluster client; it is called on first use (and again after a
        failure), so a store opens while the cluster is down and works once it is up."""
        if "{" in prefix or "}" in prefix:
            raise ValueError(f"prefix {prefix!r}: braces would make it every key's hash tag")
        if not 1 <= buckets <= REDIS_CLUSTER_HASH_SLOTS:
            raise ValueError(f"buckets must be in [1, {REDIS_CLUSTER_HASH_SLOTS}], got {buckets}")
        if grace_s < 0:
            raise ValueError(f"grace_s must be >= 0, got {grace_s}")
        self._connect = connect
        self._client_lock = threading.Lock()
        self._client_: RedisCluster | None = None
        self._prefix = prefix
        self._buckets = buckets
        self._grace_s = grace_s
        self._pointer_key = f"{prefix}:current"
        self._published_key = f"{prefix}:published"
        # version -> what the last meta read of it said (the t0 of its next fetch)
        self._known: dict[str, _Version] = {}
        self._refresh_slots = False

    @classmethod
    def from_url(
        cls,
        url: str,
        prefix: str = "fusionrank",
        timeout_s: float = 1.0,
        *,
        buckets: int = DEFAULT_BUCKETS,
        grace_s: float = DEFAULT_GRACE_S,
    ) -> RedisClusterFeatureStore:
        """``redis+cluster://[user:password@]host:port[,host:port...]`` (seed nodes)."""
        nodes, username, password = parse_cluster_url(url)

        def connect() -> RedisCluster:
            # Values are binary: no decode_responses. One retry (no backoff) for a command,
            # so a dead backend fails within a few timeout_s.
            return RedisCluster(
                startup_nodes=[ClusterNode(host, port) for host, port in nodes],
                username=username,
                password=password,
                socket_timeout=timeout_s,
                socket_connect_timeout=timeout_s,
                retry=Retry(NoBackoff(), 1),
            )

        return cls(connect, prefix, buckets=buckets, grace_s=grace_s)

    # -- reading -----------------------------------------------------------------------

    def current_version(self) -> str | None:
        with _cluster_errors():
            raw = self._client().get(self._pointer_key)
        # Earlier releases wrote "<version> <switch id> <grace ms>": the name comes first.
        return None if raw is None else raw.decode().split(" ", 1)[0]

    def layout(self, version: str | None = None) -> FeatureLayout:
        version = self._named(version)
        with _cluster_errors():
            return self._read_version(version).layout

    def fetch(self, ids: Sequence[str], version: str | None = None) -> FeatureBatch:
        ids = list(ids)
        name = self._named(version)
        with _cluster_errors():
            known = self._known.get(name) or self._read_version(name)
            if not ids:
                return batch_from_values(name, known.layout, ids, [])
            for _ in range(_FETCH_ATTEMPTS):
                values, meta, proven = self._read_items(known, ids)
                if meta == known.meta and not proven:
                    meta = self._client().get(self._meta_key(name))  # stalled: check again
                if meta == known.meta:
                    return batch_from_values(name, known.layout, ids, values)
                known = self._remember(name, meta)  # retired, or retired and written again
        raise FeatureStoreUnavailable(
            f"feature version {name} under {self._prefix!r} kept changing during one fetch"
        )

    def ping(self) -> None:
        with _cluster_errors():
            client = self._client()
            for node in client.get_primaries():
                client.get_redis_connection(node).ping()

    def versions(self) -> list[str]:
        """Walks the whole keyspace of every master: for admin and tests, not requests."""
        with _cluster_errors():
            return sorted({self._version_of(key) for key in self._scan_version_keys()})

    def close(self) -> None:
        with self._client_lock:
            client, self._client_ = self._client_, None
        if client is not None:
            client.close()

    # -- publishing --------------------------------------------------------------------

    def _is_whole(self, version: str) -> bool:
        with _cluster_errors():
            return bool(self._client().exists(self._meta_key(version)))

    def _write_version(
        self,
        ids: Sequence[str],
        matrix: np.ndarray,
        layout: FeatureLayout,
        version: str,
        *,
        batch_size: int = 2000,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        """Write a whole version without making it current; meta is written last."""
        tags = bucket_tags(self._prefix, self._buckets)
        with _cluster_errors():
            client = self._client()
            # Leftovers of a killed publish of this same version must not leak into it.
            self._unlink(self._scan_version_keys(version))
            base = self._item_key_base(version)
            for start in range(0, len(ids), batch_size):
                chunk = ids[start : start + batch_size]
                values = encode_matrix(layout, matrix[start : start + batch_size])
                buckets = _bucket_of(chunk, len(tags))
                mapping = {
                    f"{base}{{{tags[b]}}}{item_id}": value
                    for item_id, b, value in zip(chunk, buckets.tolist(), values, strict=True)
                }
                client.mset_nonatomic(mapping)  # one MSET per bucket, pipelined per master
                if progress is not None:
                    progress(start + len(values))
            meta = {
                "layout": layout.to_dict(),
                "count": len(ids),
                "created": datetime.now(UTC).isoformat(),
                "buckets": list(tags),
                "grace_ms": round(self._grace_s * 1000),
                "written": uuid.uuid4().hex,  # tells this write from a later one (docstring: 1.)
            }
            client.set(self._meta_key(version), json.dumps(meta))

    def _published(self) -> dict[str, float]:
        with _cluster_errors():
            raw = self._client().hgetall(self._published_key)
        return {name.decode(): float(at) for name, at in raw.items()}

    def _record_published(self, version: str, at: float) -> None:
        with _cluster_errors():
            self._client().hset(self._published_key, version, repr(at))

    def _set_pointer(self, version: str) -> None:
        with _cluster_errors():
            self._client().set(self._pointer_key, version)

    def _delete_versions(self, versions: set[str]) -> None:
        """Metas first; then, the longest grace those metas promised later, the items."""
        with _cluster_errors():
            client = self._client()
            grace_s = 0.0
            for version in versions:
                raw = client.get(self._meta_key(version))
                if raw is not None:
                    try:
                        grace_s = max(grace_s, int(json.loads(raw)["grace_ms"]) / 1000)
                    except (ValueError, KeyError, TypeError):
                        grace_s = max(grace_s, self._grace_s)  # unreadable: our own grace
                    client.delete(self._meta_key(version))
            time.sleep(grace_s)  # readers holding those metas may still be reading items
            for version in sorted(versions):
                self._unlink(self._scan_version_keys(version))
            client.hdel(self._published_key, *versions)

    # -- the fetch round trip ----------------------------------------------------------

    def _read_items(
        self, version: _Version, ids: list[str]
    ) -> tuple[list[bytes | None], bytes | None, bool]:
        """(values in ``ids`` order, the version's meta value read, whether that read proves
        the items whole) in one round trip per master. It does when the round trip was shorter
        than the grace of the meta value the fetch relies on (docstring: 2.)."""
        client = self._client()
        if self._refresh_slots:
            self._refresh_slots = False
            client.nodes_manager.initialize()
        buckets = _bucket_of(ids, len(version.tags))
        order = np.argsort(buckets, kind="stable")
        sorted_buckets = buckets[order]
        bounds = np.flatnonzero(np.diff(sorted_buckets)) + 1
        starts = [0, *bounds.tolist()]
        ends = [*bounds.tolist(), len(ids)]
        base = self._item_key_base(version.name)
        tags = version.tags
        keys = [
            f"{base}{{{tags[b]}}}{item_id}"
            for item_id, b in zip(ids, buckets.tolist(), strict=True)
        ]
        order_list = order.tolist()
        # One pipeline per master: its MGETs (one per bucket), in sorted-bucket order.
        plan: dict[str, tuple[ClusterNode, list[tuple[Any, ...]], list[tuple[int, int]]]] = {}
        manager = client.nodes_manager
        for start, end in zip(starts, ends, strict=True):
            bucket = int(sorted_buckets[start])
            node = manager.get_node_from_slot(version.slots[bucket])
            entry = plan.setdefault(node.name, (node, [], []))
            entry[1].append(("MGET", *(keys[order_list[j]] for j in range(start, end))))
            entry[2].append((start, end))
        meta_key = self._meta_key(version.name)
        meta_node = manager.get_node_from_slot(key_slot(meta_key.encode()))
        plan.setdefault(meta_node.name, (meta_node, [], []))[1].append(("GET", meta_key))

        started = time.monotonic()
        pipelines = [(node, commands) for node, commands, _ in plan.values()]
        replies = self._round_trip(client, pipelines)
        elapsed = time.monotonic() - started

        values_sorted: list[bytes | None] = [None] * len(ids)
        meta: bytes | None = None
        redirected = False
        for (_, _, ranges), node_replies in zip(plan.values(), replies, strict=True):
            for reply in node_replies:
                if isinstance(reply, _REDIRECTIONS):
                    redirected = True
                elif isinstance(reply, Exception):
                    raise reply
            if redirected:
                continue
            mget_replies = node_replies[: len(ranges)]
            for (start, end), reply in zip(ranges, mget_replies, strict=True):
                values_sorted[start:end] = reply
            if len(node_replies) > len(ranges):
                meta = node_replies[-1]
        if redirected:
            # The slot map is stale: refresh it and let redis-py follow the redirections,
            # then read the meta after every item.
            manager.initialize()
            values = client.mget_nonatomic(keys)
            return values, client.get(meta_key), True
        values: list[bytes | None] = [None] * len(ids)
        for j, position in enumerate(order_list):
            values[position] = values_sorted[j]
        return values, meta, elapsed < version.grace_s

    def _round_trip(
        self, client: RedisCluster, plan: list[tuple[ClusterNode, list[tuple[Any, ...]]]]
    ) -> list[list[Any]]:
        """Write every master's pipeline, then read every reply: the masters work in
        parallel and each sees one round trip. Error replies are returned, not raised."""
        taken: list[tuple[Any, Any]] = []
        clean = False
        try:
            for node, commands in plan:
                pool = client.get_redis_connection(node).connection_pool
                connection = pool.get_connection()
                taken.append((pool, connection))
                connection.send_packed_command(_pack(connection, commands))
            replies: list[list[Any]] = []
            for (_, connection), (_, commands) in zip(taken, plan, strict=True):
                node_replies: list[Any] = []
                for _ in commands:
                    try:
                        node_replies.append(connection.read_response())
                    except ResponseError as exc:  # the connection stays in step
                        node_replies.append(exc)
                replies.append(node_replies)
            clean = True
            return replies
        except (RedisConnectionError, RedisTimeoutError):
            self._refresh_slots = True  # a master may have failed over
            raise
        finally:
            for pool, connection in taken:
                if not clean:  # replies may be left unread on it
                    connection.disconnect()
                pool.release(connection)

    # -- helpers -----------------------------------------------------------------------

    def _client(self) -> RedisCluster:
        client = self._client_
        if client is None:
            with self._client_lock:
                if self._client_ is None:
                    self._client_ = self._connect()
                client = self._client_
        return client

    @property
    def _where(self) -> str:
        return f"under {self._prefix!r} (cluster)"

    def _read_version(self, version: str) -> _Version:
        return self._remember(version, self._client().get(self._meta_key(version)))

    def _remember(self, version: str, meta: bytes | None) -> _Version:
        """Parse and keep ``version``'s meta value as read (None: the version is gone)."""
        if meta is None:
            self._known.pop(version, None)
            raise self._missing(version)
        known = self._known.get(version)
        if known is not None and known.meta == meta:
            return known
        try:
            parsed = json.loads(meta)
            layout = FeatureLayout.from_dict(parsed["layout"])
            tags = tuple(str(tag) for tag in parsed["buckets"])
            grace_s = int(parsed["grace_ms"]) / 1000
            if not tags:
                raise ValueError("no buckets")
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureFormatError(f"{self._meta_key(version)}: invalid meta: {exc}") from exc
        slots = tuple(key_slot(t.encode()) for t in tags)
        known = _Version(version, meta, layout, tags, slots, grace_s)
        if len(self._known) >= _VERSIONS_KEPT:
            self._known.clear()
        self._known[version] = known
        return known

    def _item_key_base(self, version: str) -> str:
        return f"{self._prefix}:v:{version}:i:"

    def _meta_key(self, version: str) -> str:
        return f"{self._prefix}:v:{version}:meta"

    def _version_of(self, key: bytes) -> str:
        return key.decode()[len(self._prefix) + 3 :].split(":", 1)[0]

    def _scan_version_keys(self, version: str | None = None) -> Iterator[bytes]:
        pattern = f"{_glob_escape(self._prefix)}:v:"
        pattern += f"{_glob_escape(version)}:*" if version else "*"
        return self._client().scan_iter(match=pattern, count=_SCAN_COUNT)

    def _unlink(self, keys: Iterator[bytes]) -> None:
        """UNLINK in batches; the client splits each batch by slot (a bucket is one slot)."""
        client = self._client()
        batch: list[bytes] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _SCAN_COUNT:
                client.unlink(*batch)
                batch.clear()
        if batch:
            client.unlink(*batch)


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """Seed nodes, username and password of ``redis+cluster://[u:p@]h:port[,h:port...]``."""
    parts = urlsplit(url)
    if parts.scheme != SCHEME:
        raise ValueError(f"{url!r}: expected a {SCHEME}:// URL")
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    nodes = []
    for hostport in hosts.split(","):
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"{url!r}: seed {hostport!r} is not host:port")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, unquote(username) or None, unquote(password) or None


@lru_cache(maxsize=16)
def bucket_tags(prefix: str, buckets: int) -> tuple[str, ...]:
    """A hash tag per bucket, bucket b's slot in the b-th 1/buckets of the slot range (about
    ``buckets`` tries each), so that buckets spread evenly over masters owning slot ranges."""
    tags = []
    for bucket in range(buckets):
        low = bucket * REDIS_CLUSTER_HASH_SLOTS // buckets
        high = (bucket + 1) * REDIS_CLUSTER_HASH_SLOTS // buckets
        attempt = 0
        while True:
            tag = f"{prefix}#{bucket}.{attempt}"
            if low <= key_slot(tag.encode()) < high:
                tags.append(tag)
                break
            attempt += 1
    return tuple(tags)


def _pack(connection: Any, commands: list[tuple[Any, ...]]) -> list[bytes]:
    """The commands in RESP; hiredis packs str arguments in C, redis-py's packer spends ~2 us
    per argument in Python (a third of a 1,000-id fetch)."""
    if hiredis is None:
        return connection.pack_commands(commands)
    return [b"".join(hiredis.pack_command(command) for command in commands)]


def _bucket_of(ids: Sequence[str], buckets: int) -> np.ndarray:
    crcs = np.fromiter((zlib.crc32(i.encode()) for i in ids), dtype=np.uint32, count=len(ids))
    return (crcs % buckets).astype(np.intp)


@contextmanager
def _cluster_errors() -> Iterator[None]:
    """Cluster errors as the store's: unreachable, timed out or down is transient
    (FeatureStoreUnavailable); an error reply or refused credentials are faults
    (FeatureStoreFault), as on a single Redis."""
    try:
        yield
    except AuthenticationError as exc:  # a ConnectionError subclass, but permanent
        raise FeatureStoreFault(f"redis cluster refused the credentials: {exc}") from exc
    except (RedisConnectionError, RedisTimeoutError, ClusterDownError) as exc:
        raise FeatureStoreUnavailable(f"redis cluster feature store unavailable: {exc}") from exc
    except ResponseError as exc:
        raise FeatureStoreFault(f"redis cluster feature store answered an error: {exc}") from exc
    except RedisClusterException as exc:  # e.g. no seed node answers, a slot is not covered
        raise FeatureStoreUnavailable(f"redis cluster feature store unavailable: {exc}") from exc
