"""Fixtures shared across the suite.

`sample_artifacts` trains the default strategy on the bundled sample, exports every graph and
publishes the features to an embedded store, once per test session, into the session's own
temporary directory (so concurrent runs never share model files). Only the frozen-encoder
embeddings are cached between runs (in .cache/embeddings, keyed by catalogue content).
"""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
EMBEDDING_CACHE = REPO / ".cache" / "embeddings"


@pytest.fixture(scope="session")
def sample_artifacts(tmp_path_factory) -> Path:
    from export.pipeline import run

    out = tmp_path_factory.mktemp("artifacts")
    EMBEDDING_CACHE.mkdir(parents=True, exist_ok=True)
    (out / "cache").symlink_to(EMBEDDING_CACHE, target_is_directory=True)
    run(SAMPLE, out, strategy="hybrid", log=lambda message: None)
    return out
