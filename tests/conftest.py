"""Fixtures shared across the suite.

`sample_artifacts`: the hybrid model trained on the bundled sample, exported and published to
an embedded store, built by `python -m export` once per change of the code that makes it and
kept under .cache/test-artifacts/ (concurrent sessions wait on a lock for one build). The
frozen-encoder embeddings are cached in .cache/embeddings, keyed by catalogue content.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
ARTIFACTS_CACHE = REPO / ".cache" / "test-artifacts"
EMBEDDINGS_CACHE = REPO / ".cache" / "embeddings"
EXPORT_TIMEOUT_S = 3600


def _artifacts_key() -> str:
    """Changes whenever the exporter, the models or the sample change."""
    digest = hashlib.sha256()
    for folder in (
        "export",
        "models",
        "service/features",
        "service/manifest.py",
        "service/items.py",
    ):
        for path in (
            sorted((REPO / folder).rglob("*.py")) if (REPO / folder).is_dir() else [REPO / folder]
        ):
            digest.update(str(path.relative_to(REPO)).encode())
            digest.update(path.read_bytes())
    for path in sorted(SAMPLE.iterdir()):
        stat = path.stat()
        digest.update(f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:16]


@pytest.fixture(scope="session")
def sample_artifacts() -> Path:
    """Artifacts exported from the sample by ``python -m export`` (hybrid strategy): models/
    with CURRENT, and the features in the embedded store at features/. Built once per change
    of the exporter, models or sample and kept under .cache/test-artifacts/ (minutes on two
    cores the first time); concurrent sessions wait for one another's build."""
    if not (REPO / "export" / "__main__.py").is_file():
        pytest.skip("the exporter (export/__main__.py) is not in this checkout")
    out = ARTIFACTS_CACHE / _artifacts_key()
    ARTIFACTS_CACHE.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS_CACHE / f"{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (out / "models" / "CURRENT").is_file():
            _export_sample(out)
    return out


def _export_sample(out: Path) -> None:
    out.mkdir(exist_ok=True)
    cache = out / "cache"  # frozen-encoder embeddings: shared, keyed by catalogue content
    if not cache.exists():
        EMBEDDINGS_CACHE.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(EMBEDDINGS_CACHE, target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    command = [sys.executable, "-m", "export", "--data", str(SAMPLE), "--out", str(out)]
    command += ["--strategy", "hybrid"]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=EXPORT_TIMEOUT_S
    )
    if done.returncode != 0 or not (out / "models" / "CURRENT").is_file():
        pytest.fail(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )
