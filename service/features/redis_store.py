"""Feature store on Redis.

Keys::

    {prefix}:current                 the current version's name
    {prefix}:v:{version}:meta        JSON {"layout": ..., "count": ..., "created": ...}
    {prefix}:v:{version}:i:{id}      one item's value (see format.py)

A fetch is one round trip in the steady state: one ``MGET`` of the pointer followed by the
items of the version the store last saw (one command, so atomic). If the pointer still names
that version, the values came from it while it was current, hence whole (a publisher deletes
a version only after moving the pointer away). Otherwise the fetch is redone against the new
version.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime

import numpy as np
import redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.errors import FeatureFormatError, FeatureStoreUnavailable, NoPublishedVersion
from service.features.base import FeatureBatch, PublishesVersions
from service.features.format import FeatureLayout, decode_values, encode_matrix

_FETCH_ATTEMPTS = 3  # each retry means a publish switched the pointer mid-fetch
_SCAN_COUNT = 1000


class RedisFeatureStore(PublishesVersions):
    def __init__(self, client: redis.Redis, prefix: str = "fusionrank") -> None:
        self._client = client
        self._prefix = prefix
        self._pointer_key = f"{prefix}:current"
        # Versions are immutable, so the layout of the last seen version is cached for good.
        self._seen: tuple[str, FeatureLayout] | None = None

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
        with _unavailable_on_connection_error():
            raw = self._client.get(self._pointer_key)
        return None if raw is None else raw.decode()

    def layout(self) -> FeatureLayout:
        version = self.current_version()
        if version is None:
            raise NoPublishedVersion(f"nothing published under {self._prefix!r}")
        return self._layout_of(version)

    def fetch(self, ids: Sequence[str]) -> FeatureBatch:
        ids = list(ids)
        # Guess the last seen version; an empty request has no MGET to check the guess with.
        version = self._seen[0] if self._seen and ids else self.current_version()
        with _unavailable_on_connection_error():
            for _ in range(_FETCH_ATTEMPTS):
                if version is None:
                    raise NoPublishedVersion(f"nothing published under {self._prefix!r}")
                layout = self._layout_of(version)
                if not ids:
                    return _batch(version, layout, ids, [])
                # One MGET of the pointer and the items: a single command is atomic, so the
                # pointer read is the one the values were read under (a MULTI/EXEC costs more
                # on both ends: measured ~0.2 ms of client CPU for 1,000 ids).
                key_prefix = self._item_key(version, "")
                keys = [key_prefix + item_id for item_id in ids]
                pointer, *values = self._client.execute_command("MGET", self._pointer_key, *keys)
                if pointer is not None and pointer.decode() == version:
                    return _batch(version, layout, ids, values)
                version = None if pointer is None else pointer.decode()
        raise FeatureStoreUnavailable(
            f"feature version under {self._prefix!r} kept changing during one fetch"
        )

    def ping(self) -> None:
        with _unavailable_on_connection_error():
            self._client.ping()

    def versions(self) -> list[str]:
        """Walks the whole keyspace: for admin and tests, not the request path."""
        with _unavailable_on_connection_error():
            return sorted({self._version_of(key) for key in self._scan_version_keys()})

    def close(self) -> None:
        self._client.close()

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
        with _unavailable_on_connection_error():
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

    def _switch_to(self, version: str) -> list[str]:
        with _unavailable_on_connection_error():
            self._client.set(self._pointer_key, version)
            return self._delete_versions(keep=version)

    def _delete_versions(self, keep: str) -> list[str]:
        """Unlink every version but ``keep``; return the names removed."""
        removed: set[str] = set()

        def doomed() -> Iterator[bytes]:
            for key in self._scan_version_keys():
                version = self._version_of(key)
                if version != keep:
                    removed.add(version)
                    yield key

        self._unlink(doomed())
        return sorted(removed)

    # -- helpers -----------------------------------------------------------------------

    def _layout_of(self, version: str) -> FeatureLayout:
        seen = self._seen
        if seen is not None and seen[0] == version:
            return seen[1]
        with _unavailable_on_connection_error():
            raw = self._client.get(self._meta_key(version))
        if raw is None:
            raise FeatureFormatError(f"{self._meta_key(version)}: meta of version is missing")
        try:
            layout = FeatureLayout.from_dict(json.loads(raw)["layout"])
        except (ValueError, KeyError, TypeError) as exc:
            raise FeatureFormatError(f"{self._meta_key(version)}: invalid meta: {exc}") from exc
        self._seen = (version, layout)
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


def _batch(
    version: str, layout: FeatureLayout, ids: list[str], values: list[bytes | None]
) -> FeatureBatch:
    if None not in values:  # the usual case: every id known, no lists to filter
        matrix = decode_values(layout, values, ids)  # type: ignore[arg-type]
        return FeatureBatch(version, layout, matrix, np.arange(len(ids), dtype=np.int64), [])
    found = [pos for pos, value in enumerate(values) if value is not None]
    missing = [ids[pos] for pos, value in enumerate(values) if value is None]
    matrix = decode_values(layout, [values[pos] for pos in found], [ids[pos] for pos in found])
    return FeatureBatch(version, layout, matrix, np.asarray(found, dtype=np.int64), missing)


def _glob_escape(text: str) -> str:
    """Escape Redis glob metacharacters so SCAN MATCH takes ``text`` literally."""
    return "".join("\\" + ch if ch in "*?[]\\" else ch for ch in text)


@contextmanager
def _unavailable_on_connection_error() -> Iterator[None]:
    try:
        yield
    except (RedisConnectionError, RedisTimeoutError) as exc:
        raise FeatureStoreUnavailable(f"redis feature store unavailable: {exc}") from exc
