"""Feature store on Redis.

Keys::

    {prefix}:current                 the newest published version's name
    {prefix}:published               hash: version -> when it was last published (Unix seconds)
    {prefix}:v:{version}:meta        JSON {"layout": ..., "count": ..., "created": ...}
    {prefix}:v:{version}:i:{id}      one item's value (see format.py)

A fetch is one round trip: one ``MGET`` of the version's meta and the items (one command, so
atomic). Meta is written after every item and deleted before any, so meta in the reply means
the values came from the whole version; no meta means the version is not (or no longer) there.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np
import redis
from redis.exceptions import AuthenticationError, ResponseError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import (
    FeatureFormatError,
    FeatureStoreFault,
    FeatureStoreUnavailable,
)
from service.features.base import FeatureBatch, PublishesVersions, batch_from_values
from service.features.format import FeatureLayout, encode_matrix

_SCAN_COUNT = 1000
_LAYOUTS_KEPT = 8  # parsed metas kept per store: the versions a process reads at once


class RedisFeatureStore(PublishesVersions):
    def __init__(self, client: redis.Redis, prefix: str = "fusionrank") -> None:
        self._client = client
        self._prefix = prefix
        self._pointer_key = f"{prefix}:current"
        self._published_key = f"{prefix}:published"
        # version -> (its meta value, the layout parsed from it): parsed once per version.
        self._layouts: dict[str, tuple[bytes, FeatureLayout]] = {}

    @classmethod
    def from_url(
        cls, url: str, prefix: str = "fusionrank", timeout_s: float = 1.0
    ) -> RedisFeatureStore:
        # Values are binary: no decode_responses. The client's default for from_url is no
        # retry, so a dead backend fails within timeout_s.
        client = redis.Redis.from_url(
            url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s
        )
        return cls(client, prefix)

    # -- reading -----------------------------------------------------------------------

    def current_version(self) -> str | None:
        with _store_errors():
            raw = self._client.get(self._pointer_key)
        return None if raw is None else raw.decode()

    def layout(self, version: str | None = None) -> FeatureLayout:
        version = self._named(version)
        with _store_errors():
            raw = self._client.get(self._meta_key(version))
        return self._layout_of(version, raw)

    def fetch(self, ids: Sequence[str], version: str | None = None) -> FeatureBatch:
        ids = list(ids)
        version = self._named(version)
        # One MGET of the meta and the items: a single command is atomic, so the meta read
        # is the one the values were read under (a MULTI/EXEC costs more on both ends:
        # measured ~0.2 ms of client CPU for 1,000 ids).
        key_prefix = self._item_key(version, "")
        with _store_errors():
            meta, *values = self._client.execute_command(
                "MGET", self._meta_key(version), *(key_prefix + item_id for item_id in ids)
            )
        return batch_from_values(version, self._layout_of(version, meta), ids, values)

    def ping(self) -> None:
        with _store_errors():
            self._client.ping()

    def versions(self) -> list[str]:
        """Walks the whole keyspace: for admin and tests, not the request path."""
        with _store_errors():
            return sorted({self._version_of(key) for key in self._scan_version_keys()})

    def close(self) -> None:
        self._client.close()

    # -- publishing --------------------------------------------------------------------

    def _is_whole(self, version: str) -> bool:
        with _store_errors():
            return bool(self._client.exists(self._meta_key(version)))

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
        with _store_errors():
            # Leftovers of a killed publish of this same version must not leak into it.
            self._unlink(self._scan_version_keys(version))
            for start in range(0, len(ids), batch_size):
                values = encode_matrix(layout, matrix[start : start + batch_size])
                pipe = self._client.pipeline(transaction=False)
                for item_id, value in zip(ids[start : start + batch_size], values, strict=True):
                    pipe.set(self._item_key(version, item_id), value)
                pipe.execute()
                if progress is not None:
                    progress(start + len(values))
            meta = {
                "layout": layout.to_dict(),
                "count": len(ids),
                "created": datetime.now(UTC).isoformat(),
            }
            self._client.set(self._meta_key(version), json.dumps(meta))

    def _published(self) -> dict[str, float]:
        with _store_errors():
            raw = self._client.hgetall(self._published_key)
        return {name.decode(): float(at) for name, at in raw.items()}

    def _record_published(self, version: str, at: float) -> None:
        with _store_errors():
            self._client.hset(self._published_key, version, repr(at))

    def _set_pointer(self, version: str) -> None:
        with _store_errors():
            self._client.set(self._pointer_key, version)

    def _delete_versions(self, versions: set[str]) -> None:
        with _store_errors():
            # Every meta first (one command): from then on readers see those versions gone,
            # never partly deleted.
            self._client.delete(*(self._meta_key(v) for v in versions))
            for version in sorted(versions):
                self._unlink(self._scan_version_keys(version))
            self._client.hdel(self._published_key, *versions)

    # -- helpers -----------------------------------------------------------------------

    @property
    def _where(self) -> str:
        return f"under {self._prefix!r}"

    def _layout_of(self, version: str, meta: bytes | None) -> FeatureLayout:
        """The layout in ``version``'s meta value as read (None: the version is not whole)."""
        if meta is None:
            raise self._missing(version)

        seen = self._layouts.get(version)
        if seen is not None and seen[0] == meta:
            return seen[1]
        try:
            layout = FeatureLayout.from_dict(json.loads(meta)["layout"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureFormatError(f"{self._meta_key(version)}: invalid meta: {exc}") from exc
        if len(self._layouts) >= _LAYOUTS_KEPT:
            self._layouts.clear()
        self._layouts[version] = (meta, layout)
        return layout

    def _item_key(self, version: str, item_id: str) -> str:
        return f"{self._prefix}:v:{version}:i:{item_id}"

    def _meta_key(self, version: str) -> str:
        return f"{self._prefix}:v:{version}:meta"

    def _version_of(self, key: bytes) -> str:
        # Version names contain no ":" (check_publish_args), so it ends at the next one.
        return key.decode()[len(self._prefix) + 3 :].split(":", 1)[0]

    def _scan_version_keys(self, version: str | None = None) -> Iterator[bytes]:
        pattern = f"{_glob_escape(self._prefix)}:v:"
        pattern += f"{_glob_escape(version)}:*" if version else "*"
        return self._client.scan_iter(match=pattern, count=_SCAN_COUNT)

    def _unlink(self, keys: Iterator[bytes]) -> None:
        batch: list[bytes] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _SCAN_COUNT:
                self._client.unlink(*batch)
                batch.clear()
        if batch:
            self._client.unlink(*batch)


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so SCAN MATCH takes ``text`` literally."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@contextmanager
def _store_errors() -> Iterator[None]:
    """Redis errors as the store's: a connection that fails or times out is transient
    (FeatureStoreUnavailable); an error reply (NOPERM, WRONGTYPE, OOM) or refused credentials
    are faults retrying does not mend (FeatureStoreFault)."""
    try:
        yield
    except AuthenticationError as exc:  # a ConnectionError subclass, but permanent
        raise FeatureStoreFault(f"redis feature store refused the credentials: {exc}") from exc
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise FeatureStoreUnavailable(f"redis feature store unavailable: {exc}") from exc
    except ResponseError as exc:
        raise FeatureStoreFault(f"redis feature store answered an error: {exc}") from exc
