"""FAISS searches with the configured OpenMP threads on whichever thread calls it: OpenMP's
thread count is per thread, and the service searches on worker threads other than the one that
loaded the index (with one OpenMP thread per core those spin on the other cores)."""

from __future__ import annotations

import threading

import faiss
import numpy as np

from service.stages.retrieval import Retriever


def test_search_uses_the_configured_threads_on_any_thread() -> None:
    vectors = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    index = faiss.IndexFlatIP(8)
    index.add(vectors)
    retriever = Retriever(index, [f"item-{i}" for i in range(64)], threads=1)
    seen: list[object] = []

    def search_on_a_new_thread() -> None:
        seen.append(retriever.search(vectors[3], 5))
        seen.append(faiss.omp_get_max_threads())

    thread = threading.Thread(target=search_on_a_new_thread)
    thread.start()
    thread.join()
    assert len(seen[0]) == 5
    assert seen[1] == 1
