"""Feature store on a Redis Cluster (redis-py's cluster client), selected by a
``redis+cluster://host:port[,host:port...]`` URL: the listed nodes are seeds, the client learns
the rest of the cluster from them.

Keys (the prefix must not contain braces: they would become the hash tag of every key)::

    {prefix}:current                         pointer: "<version> <switch id> <grace ms>"
    {prefix}:v:{version}:meta                JSON {"layout", "count", "created", "buckets"}
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
reading any reply, and adds ``GET pointer`` to the pipeline of the master that owns the
pointer. A redirection (MOVED/ASK/TRYAGAIN after resharding or failover) refreshes the slot map
and redoes that attempt through redis-py's ``mget_nonatomic``, which follows redirections.

**Only whole versions, across slots.** The single-Redis store re-reads the pointer in the same
MULTI/EXEC as its MGET. A cluster has no transaction across slots, and a pointer read sent in
parallel with the item reads proves nothing on its own: the master holding the pointer may
answer "v1" before the publisher switches to v2 and starts deleting v1, while another master
serves the item reads after that deletion (v1 rows reported missing). The argument here:

1. *Publisher.* Writes every key of the new version, then meta, then switches the pointer with
   one SET whose value carries a switch id unique to this switch (uuid4) and the publisher's
   deletion grace; then waits the grace G written in the pointer value it replaced (the one
   readers of the old version rely on) after the SET returned, and only then deletes the other
   versions (nothing to wait for when no pointer existed: no reader can hold one). A version's
   keys are therefore complete before any pointer names it, and stay untouched until at least G
   after the pointer stops naming it, G being the grace in that pointer value (one publisher at
   a time, as for every backend; a version name never names other content).
2. *Reader.* Holds a pointer value P (version v, grace G) read at some time t0. It notes its
   monotonic clock at r0 (after t0), sends the item MGETs and the pointer GET to every master,
   reads every reply, notes r1. If the pointer reply is P again, no switch happened between t0
   and the pointer read at t_p in [r0, r1] (a switch writes a new switch id), so the next switch
   away from v happens after t_p >= r0 and deletion of v after that plus G. Every item read
   happened before r1; if r1 - r0 < G, they all happened before any deletion of v could start,
   and after v was complete (v was named at t0 < r0): the rows are v's, whole.
3. If the round trip took G or longer (a stall), the reader re-reads the pointer after all the
   replies: still P means no switch up to that read, so no deletion of v had started during the
   item reads. If the pointer reply is not P, the fetch is redone against the new value (at most
   3 attempts, as the single-Redis store).

The pointer read at the end of one fetch is the t0 of the next, so the steady state is one
round trip per master. Monotonic clocks of reader and publisher only need to tick at about the
same rate (they are never compared). A reader that saw no pointer yet reads it first.
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

from service.errors import FeatureFormatError, FeatureStoreUnavailable, NoPublishedVersion
from service.features.base import FeatureBatch, PublishesVersions
from service.features.format import FeatureLayout, encode_matrix
from service.features.redis_store import _batch, _glob_escape

SCHEME = "redis+cluster"
DEFAULT_BUCKETS = 64
DEFAULT_GRACE_S = 2.0
_FETCH_ATTEMPTS = 3
_SCAN_COUNT = 1000
_REDIRECTIONS = (AskError, TryAgainError, ClusterDownError)  # MovedError is an AskError


@dataclass(frozen=True)
class _Pointer:
    raw: bytes  # the whole value: the switch id makes it unique per switch
    version: str
    grace_s: float

    @classmethod
    def parse(cls, raw: bytes) -> _Pointer:
        try:
            version, _switch, grace_ms = raw.decode().split(" ")
            return cls(raw, version, int(grace_ms) / 1000)
        except ValueError as exc:
            raise FeatureFormatError(f"invalid feature pointer value {raw!r}") from exc


@dataclass(frozen=True)
class _Version:
    """What a reader needs of one (immutable) version: its layout and bucket tags."""

    name: str
    layout: FeatureLayout
    tags: tuple[str, ...]
    slots: tuple[int, ...]  # slot of each bucket


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
        self._pointer: _Pointer | None = None  # the last pointer value seen (t0 of a fetch)
        self._seen: _Version | None = None  # versions are immutable: cached for good
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
        with _unavailable_on_cluster_error():
            pointer = self._read_pointer()
        return None if pointer is None else pointer.version

    def layout(self) -> FeatureLayout:
        version = self.current_version()
        if version is None:
            raise NoPublishedVersion(f"nothing published under {self._prefix!r}")
        with _unavailable_on_cluster_error():
            return self._version_info(version).layout

    def fetch(self, ids: Sequence[str]) -> FeatureBatch:
        ids = list(ids)
        with _unavailable_on_cluster_error():
            pointer = self._pointer if ids else None
            if pointer is None:
                pointer = self._read_pointer()
            for _ in range(_FETCH_ATTEMPTS):
                if pointer is None:
                    raise NoPublishedVersion(f"nothing published under {self._prefix!r}")
                version = self._version_info(pointer.version)
                if not ids:
                    return _batch(version.name, version.layout, ids, [])
                values, seen, read_after = self._read_items(version, ids, pointer.grace_s)
                if seen == pointer.raw and not read_after:
                    seen = self._read_pointer_raw()  # the round trip stalled: check again
                if seen == pointer.raw:
                    self._pointer = pointer
                    return _batch(version.name, version.layout, ids, values)
                pointer = None if seen is None else _Pointer.parse(seen)
                self._pointer = pointer
        raise FeatureStoreUnavailable(
            f"feature version under {self._prefix!r} kept changing during one fetch"
        )

    def ping(self) -> None:
        with _unavailable_on_cluster_error():
            client = self._client()
            for node in client.get_primaries():
                client.get_redis_connection(node).ping()

    def versions(self) -> list[str]:
        """Walks the whole keyspace of every master: for admin and tests, not requests."""
        with _unavailable_on_cluster_error():
            return sorted({self._version_of(key) for key in self._scan_version_keys()})

    def close(self) -> None:
        with self._client_lock:
            client, self._client_ = self._client_, None
        if client is not None:
            client.close()

    # -- publishing --------------------------------------------------------------------

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
        with _unavailable_on_cluster_error():
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
            }
            client.set(self._meta_key(version), json.dumps(meta))

    def _switch_to(self, version: str) -> list[str]:
        with _unavailable_on_cluster_error():
            replaced = self._read_pointer()
            value = f"{version} {uuid.uuid4().hex} {round(self._grace_s * 1000)}"
            self._client().set(self._pointer_key, value)
            if replaced is not None:  # readers holding it trust its grace (docstring: 1.)
                time.sleep(replaced.grace_s)
            return self._delete_versions(keep=version)

    def _delete_versions(self, keep: str) -> list[str]:
        removed: set[str] = set()

        def doomed() -> Iterator[bytes]:
            for key in self._scan_version_keys():
                version = self._version_of(key)
                if version != keep:
                    removed.add(version)
                    yield key

        self._unlink(doomed())
        return sorted(removed)

    # -- the fetch round trip ----------------------------------------------------------

    def _read_items(
        self, version: _Version, ids: list[str], grace_s: float
    ) -> tuple[list[bytes | None], bytes | None, bool]:
        """(values in ``ids`` order, the pointer value read, whether that read proves the
        items whole) in one round trip per master. It does when the round trip was shorter
        than ``grace_s``, the grace of the pointer value the fetch relies on (docstring: 2.)."""
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
        pointer_node = manager.get_node_from_slot(key_slot(self._pointer_key.encode()))
        plan.setdefault(pointer_node.name, (pointer_node, [], []))[1].append(
            ("GET", self._pointer_key)
        )

        started = time.monotonic()
        pipelines = [(node, commands) for node, commands, _ in plan.values()]
        replies = self._round_trip(client, pipelines)
        elapsed = time.monotonic() - started

        values_sorted: list[bytes | None] = [None] * len(ids)
        pointer_raw: bytes | None = None
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
                pointer_raw = node_replies[-1]
        if redirected:
            # The slot map is stale: refresh it and let redis-py follow the redirections,
            # then read the pointer after every item.
            manager.initialize()
            values = client.mget_nonatomic(keys)
            return values, client.get(self._pointer_key), True
        values: list[bytes | None] = [None] * len(ids)
        for j, position in enumerate(order_list):
            values[position] = values_sorted[j]
        return values, pointer_raw, elapsed < grace_s

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

    def _read_pointer_raw(self) -> bytes | None:
        return self._client().get(self._pointer_key)

    def _read_pointer(self) -> _Pointer | None:
        raw = self._read_pointer_raw()
        return None if raw is None else _Pointer.parse(raw)

    def _version_info(self, version: str) -> _Version:
        seen = self._seen
        if seen is not None and seen.name == version:
            return seen
        raw = self._client().get(self._meta_key(version))
        if raw is None:
            raise FeatureFormatError(f"{self._meta_key(version)}: meta of version is missing")
        try:
            meta = json.loads(raw)
            layout = FeatureLayout.from_dict(meta["layout"])
            tags = tuple(str(tag) for tag in meta["buckets"])
            if not tags:
                raise ValueError("no buckets")
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureFormatError(f"{self._meta_key(version)}: invalid meta: {exc}") from exc
        info = _Version(version, layout, tags, tuple(key_slot(t.encode()) for t in tags))
        self._seen = info
        return info

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
def _unavailable_on_cluster_error() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError, ClusterDownError) as exc:
        raise FeatureStoreUnavailable(f"redis cluster feature store unavailable: {exc}") from exc
    except RedisClusterException as exc:  # e.g. no seed node answers, a slot is not covered
        raise FeatureStoreUnavailable(f"redis cluster feature store unavailable: {exc}") from exc
