"""Fixtures shared across the suite.

`evaluated_sample`: what the README's `python -m models eval --data data/sample --out DIR`
leaves in DIR (every strategy's checkpoint, eval/report.*), run as a user runs it.
`sample_artifacts`: the same DIR after `python -m export --strategy hybrid`: the hybrid model
exported and published to an embedded store. Both are built once per change of the code that
makes them and kept under .cache/test-artifacts/ (concurrent sessions wait on a lock for one
build). The frozen-encoder embeddings are cached in .cache/embeddings, keyed by catalogue
content.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"
ARTIFACTS_CACHE = REPO / ".cache" / "test-artifacts"
EMBEDDINGS_CACHE = REPO / ".cache" / "embeddings"
BUILD_TIMEOUT_S = 3600


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


EVAL_STDOUT = "eval-stdout.txt"  # what `python -m models eval` printed, for the CLI test


@contextmanager
def _built_once(out: Path) -> Iterator[None]:
    """Hold the build lock of ``out`` (another session may be building it)."""
    ARTIFACTS_CACHE.mkdir(parents=True, exist_ok=True)
    with (ARTIFACTS_CACHE / f"{out.name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        out.mkdir(exist_ok=True)
        cache = out / "cache"  # frozen-encoder embeddings: shared, keyed by catalogue content
        if not cache.exists():
            EMBEDDINGS_CACHE.mkdir(parents=True, exist_ok=True)
            cache.symlink_to(EMBEDDINGS_CACHE, target_is_directory=True)
        yield


@pytest.fixture(scope="session")
def evaluated_sample() -> Path:
    """The artifacts directory after ``python -m models eval --data data/sample --out DIR``
    (minutes on two cores the first time: every strategy is trained); its stdout is kept in
    DIR/eval-stdout.txt."""
    out = ARTIFACTS_CACHE / _artifacts_key()
    with _built_once(out):
        if not (out / EVAL_STDOUT).is_file():
            done = _run(["models", "eval", "--data", "data/sample", "--out", str(out)])
            (out / EVAL_STDOUT).write_text(done.stdout)
    return out


@pytest.fixture(scope="session")
def sample_artifacts(evaluated_sample: Path) -> Path:
    """Artifacts exported from the sample by ``python -m export`` (hybrid strategy, from the
    evaluation's checkpoint): models/ with CURRENT, and the features in the embedded store
    at features/."""
    if not (REPO / "export" / "__main__.py").is_file():
        pytest.skip("the exporter (export/__main__.py) is not in this checkout")
    out = evaluated_sample
    with _built_once(out):
        if not (out / "models" / "CURRENT").is_file():
            _run(["export", "--data", str(SAMPLE), "--out", str(out), "--strategy", "hybrid"])
    return out


def _run(args: list[str]) -> subprocess.CompletedProcess[str]:
    """``python -m ARGS`` from the repo root, as a user runs it (no FUSIONRANK_* settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    command = [sys.executable, "-m", *args]
    done = subprocess.run(
        command, cwd=REPO, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT_S
    )
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )
    return done
