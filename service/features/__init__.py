"""Per-item feature store: versions of compact text + image feature vectors, one fetch per request.

Use :func:`open_feature_store` to get a store: Redis Cluster for a ``redis+cluster://`` URL,
Redis for another URL, otherwise a local directory. All implement :class:`FeatureStore`; see
``base.py`` for the publish/read semantics.
"""

from pathlib import Path

from service.features.base import (
    DEFAULT_RETENTION,
    FeatureBatch,
    FeatureStore,
    PublishReport,
    Retention,
)
from service.features.cluster_store import RedisClusterFeatureStore
from service.features.embedded import EmbeddedFeatureStore
from service.features.format import FeatureLayout, decode_values, encode_matrix
from service.features.redis_store import RedisFeatureStore

__all__ = [
    "DEFAULT_RETENTION",
    "Retention",
    "EmbeddedFeatureStore",
    "FeatureBatch",
    "FeatureLayout",
    "FeatureStore",
    "PublishReport",
    "RedisClusterFeatureStore",
    "RedisFeatureStore",
    "decode_values",
    "encode_matrix",
    "open_feature_store",
]


def open_feature_store(
    redis_url: str | None,
    embedded_root: Path,
    prefix: str = "fusionrank",
    timeout_s: float = 1.0,
) -> FeatureStore:
    """A Redis Cluster store for a ``redis+cluster://host:port[,host:port...]`` URL, a Redis
    store for another URL, else an embedded store in ``embedded_root``."""
    if redis_url and redis_url.startswith("redis+cluster://"):
        return RedisClusterFeatureStore.from_url(redis_url, prefix=prefix, timeout_s=timeout_s)
    if redis_url:
        return RedisFeatureStore.from_url(redis_url, prefix=prefix, timeout_s=timeout_s)
    return EmbeddedFeatureStore(embedded_root)
