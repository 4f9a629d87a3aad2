"""A publisher process SIGKILLed halfway through writing a feature version, on both stores:
readers (other processes) stay on the previous version throughout, and the next publish
removes the partial one (and, keeping only the current version here, the previous one). The
store contract tests cover the same with an exception raised mid-publish; this one kills a
real process at an arbitrary point."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from service.features import FeatureLayout, FeatureStore, RedisFeatureStore
from tests.service.processes import REPO

LAYOUT = FeatureLayout(text_dims=64, image_dims=64)
ITEMS = 6000
BATCH = 250

# Publishes ITEMS items filled with VALUE as VERSION, printing the items written after each
# batch and pausing a little, so that the parent can kill it halfway.
PUBLISHER = """
import sys, time
import numpy as np
from service.features import FeatureLayout, Retention, open_feature_store
redis_url, root, prefix, version, value, start = sys.argv[1:7]
store = open_feature_store(redis_url or None, root, prefix=prefix)
layout = FeatureLayout(text_dims=64, image_dims=64)
ids = ["item-%d" % n for n in range(int(start), int(start) + ITEMS)]
matrix = np.full((len(ids), layout.dims), float(value), np.float16)
def progress(written):
    print(written, flush=True)
    time.sleep(0.02)
report = store.publish(
    ids, matrix, layout, version, batch_size=BATCH, progress=progress,
    retention=Retention(keep=1, grace_s=0),
)
print("removed", ",".join(report.removed_versions), flush=True)
""".replace("ITEMS", str(ITEMS)).replace("BATCH", str(BATCH))


def publisher(store_args: list[str], version: str, value: float, start: int = 0) -> list[str]:
    return [sys.executable, "-c", PUBLISHER, *store_args, version, str(value), str(start)]


@pytest.fixture(params=["redis", "embedded"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[list[str], Callable[[], FeatureStore]]]:
    """(publisher arguments: redis url, embedded root, prefix), and a reader factory."""
    from service.features import EmbeddedFeatureStore

    opened: list[FeatureStore] = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        args = [url, str(tmp_path), prefix]

        def reader() -> FeatureStore:
            opened.append(RedisFeatureStore.from_url(url, prefix=prefix))
            return opened[-1]
    else:
        root = tmp_path / "features"
        args = ["", str(root), "unused"]

        def reader() -> FeatureStore:
            opened.append(EmbeddedFeatureStore(root))
            return opened[-1]

    yield args, reader
    for store in opened:
        store.close()


def test_killed_publisher_leaves_readers_on_the_previous_version(
    backend: tuple[list[str], Callable[[], FeatureStore]],
) -> None:
    args, open_reader = backend
    first = subprocess.run(
        publisher(args, "v1", 1.0), cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert first.returncode == 0, first.stderr
    reader = open_reader()
    ids = [f"item-{n}" for n in range(0, ITEMS, 7)]

    # Readers keep fetching while the publisher of v2 writes and is killed.
    seen: Counter[str] = Counter()
    wrong: list[str] = []
    stop = threading.Event()

    def read() -> None:
        while not stop.is_set():
            batch = reader.fetch(ids)
            seen[batch.version] += 1
            if batch.missing or not (batch.matrix == 1.0).all():
                wrong.append(f"{batch.version}: {len(batch.missing)} missing")

    thread = threading.Thread(target=read)
    thread.start()
    killed = subprocess.Popen(
        publisher(args, "v2", 2.0), cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    try:
        assert killed.stdout is not None
        written = [int(killed.stdout.readline()) for _ in range(4)]  # 4 batches, of 24
        killed.send_signal(signal.SIGKILL)
        killed.wait(timeout=30)
        time.sleep(0.2)
    finally:
        stop.set()
        thread.join(timeout=30)
        if killed.poll() is None:
            killed.kill()
            killed.wait()

    assert written[-1] < ITEMS  # killed halfway
    assert not wrong, wrong[:3]
    assert set(seen) == {"v1"} and seen["v1"] > 0
    fresh = open_reader()  # a reader started after the kill
    assert fresh.current_version() == "v1"
    assert fresh.versions() == ["v1", "v2"]  # v2 is partial: stored, never current
    batch = fresh.fetch(ids)
    assert batch.version == "v1" and not batch.missing and (batch.matrix == 1.0).all()

    # The next publish (v3, other ids: leftovers of v2 would show) removes both: v2 was never
    # published, and the publisher keeps only the current version.
    nxt = subprocess.run(
        publisher(args, "v3", 3.0, start=ITEMS), cwd=REPO, capture_output=True, text=True
    )
    assert nxt.returncode == 0, nxt.stderr
    assert nxt.stdout.strip().splitlines()[-1] == "removed v1,v2"
    assert fresh.versions() == ["v3"]
    assert fresh.fetch(ids).found.size == 0
    later = fresh.fetch([f"item-{ITEMS}", f"item-{2 * ITEMS - 1}"])
    assert later.version == "v3" and (later.matrix == 3.0).all()
    print(
        f"\nFAULT publisher_killed: killed after {written[-1]} of {ITEMS} items; reads {dict(seen)}"
    )
