"""Per-item feature store: versions of compact text + image feature vectors, one fetch per request.

Use :func:`open_feature_store` to get a store: Redis when a URL is configured, otherwise a local
directory. Both implement :class:`FeatureStore`; see ``base.py`` for the publish/read semantics.
"""

from pathlib import Path

from service.features.base import FeatureBatch, FeatureStore, PublishReport
from service.features.embedded import EmbeddedFeatureStore
from service.features.format import FeatureLayout, decode_values, encode_matrix
from service.features.redis_store import RedisFeatureStore

__all__ = [
    "EmbeddedFeatureStore",
    "FeatureBatch",
    "FeatureLayout",
    "FeatureStore",
    "PublishReport",
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
    """A Redis store when ``redis_url`` is given, else an embedded store in ``embedded_root``."""
    if redis_url:
        return RedisFeatureStore.from_url(redis_url, prefix=prefix, timeout_s=timeout_s)
    return EmbeddedFeatureStore(embedded_root)
