"""FAISS memory and build time per million items of our vectors (a benchmark, not a test).

    python -m loadtest.index_scale [--artifacts artifacts] [--sizes 200000,1000000]
                                   [--hnsw-sizes 100000,200000] [--threads 1] [--shards 4]

The vectors are the exported item vectors (128-d float32, index of the current model version),
resampled with Gaussian jitter (sigma = 0.05 x the per-dimension std) and renormalised like the
originals, to the sizes asked for. Per index and size it reports: the build seconds (train + add),
the serialized size, the growth of the process's resident memory while building, and one-query
search latency (p50 over 200 queries, k = 200). HNSW32 builds are slow on a couple of cores, so
by default it is measured at 100k and 200k and extrapolated to 1M: memory linearly, build time
as n log n (a HNSW insert costs ~log n). Results are printed and written as JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import faiss
import numpy as np

from service.manifest import load_manifest, resolve_version_dir
from service.stages.retrieval import combine_shards

MILLION = 1_000_000


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def real_vectors(artifacts: Path) -> np.ndarray:
    version_dir = resolve_version_dir(artifacts / "models")
    spec = load_manifest(version_dir).index
    parts = [faiss.read_index(str(version_dir / name)) for name in spec.shards or [spec.file]]
    return np.concatenate([part.reconstruct_n(0, part.ntotal) for part in parts])


def synthesise(real: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, real.shape[1]), dtype=np.float32)
    scale = 0.05 * real.std(axis=0)
    norms = np.linalg.norm(real, axis=1)
    for start in range(0, n, 100_000):
        rows = rng.integers(0, len(real), min(100_000, n - start))
        block = real[rows] + rng.normal(0, 1, (len(rows), real.shape[1])) * scale
        block *= (norms[rows] / np.linalg.norm(block, axis=1))[:, None]  # same norms as the real
        out[start : start + len(rows)] = block
    return out


def measure(factory: str, vectors: np.ndarray, queries: np.ndarray, shards: int = 1) -> dict:
    before = rss_bytes()
    started = time.perf_counter()
    parts = []
    for block in np.array_split(vectors, shards):
        index = faiss.index_factory(vectors.shape[1], factory, faiss.METRIC_INNER_PRODUCT)
        if not index.is_trained:
            index.train(block)
        index.add(block)
        parts.append(index)
    build_s = time.perf_counter() - started
    grown = rss_bytes() - before
    index = parts[0] if shards == 1 else combine_shards(parts)
    for part in parts:
        if "HNSW" in factory:
            faiss.ParameterSpace().set_index_parameter(part, "efSearch", 256)
    latencies = []
    for query in queries:
        t = time.perf_counter()
        index.search(query[None, :], 200)
        latencies.append(time.perf_counter() - t)
    serialized = sum(faiss.serialize_index(part).nbytes for part in parts)
    del index, parts
    n = len(vectors)
    return {
        "factory": factory,
        "shards": shards,
        "items": n,
        "build_s": round(build_s, 2),
        "serialized_mb": round(serialized / 2**20, 1),
        "rss_growth_mb": round(grown / 2**20, 1),
        "bytes_per_item": round(serialized / n, 1),
        "search_p50_ms": round(float(np.median(latencies)) * 1e3, 3),
        "mb_per_million": round(serialized / n * MILLION / 2**20, 1),
        "build_s_per_million_linear": round(build_s / n * MILLION, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--sizes", default="200000,1000000", help="Flat sizes")
    parser.add_argument("--hnsw-sizes", default="100000,200000")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--shards", type=int, default=4, help="also build Flat in N shards")
    parser.add_argument("--out", type=Path, default=Path("artifacts/eval/index_scale.json"))
    args = parser.parse_args()
    faiss.omp_set_num_threads(args.threads)

    real = real_vectors(args.artifacts)
    print(f"real vectors: {real.shape} {real.dtype}; threads {args.threads}")
    queries = synthesise(real, 200, seed=1)
    rows = []
    runs = [("Flat", int(n), 1) for n in args.sizes.split(",")]
    runs += [("Flat", int(args.sizes.split(",")[-1]), args.shards)] if args.shards > 1 else []
    runs += [("HNSW32,Flat", int(n), 1) for n in args.hnsw_sizes.split(",")]
    for factory, n, shards in runs:
        vectors = synthesise(real, n)
        row = measure(factory, vectors, queries, shards)
        del vectors
        rows.append(row)
        print(json.dumps(row))

    hnsw = [row for row in rows if row["factory"].startswith("HNSW")]
    if hnsw and hnsw[-1]["items"] < MILLION:
        last = hnsw[-1]
        n = last["items"]
        growth = (MILLION * math.log(MILLION)) / (n * math.log(n))
        extrapolated = {
            "factory": last["factory"],
            "items": MILLION,
            "extrapolated_from": n,
            "build_s": round(last["build_s"] * growth, 1),
            "serialized_mb": round(last["serialized_mb"] * MILLION / n, 1),
        }
        rows.append(extrapolated)
        print("extrapolated:", json.dumps(extrapolated))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": args.threads, "runs": rows}, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
