"""A deliberately naive server for the same model, the baseline ``make bench`` measures against.

    FUSIONRANK_ARTIFACTS_DIR=artifacts FUSIONRANK_REDIS_URL=redis://127.0.0.1:6379/0 \\
    FUSIONRANK_REDIS_PREFIX=fusionrank-bench FUSIONRANK_PORT=8100 python -m loadtest.naive_server

Same ONNX graphs (the query encoder the service runs, fp32 ranker), tokenizer, FAISS index,
Redis keys and onnxruntime session options as the service (one intra-op thread, full graph
optimisation), and the same answers, written the obvious way:

- a plain FastAPI route (``def``: runs on the thread pool), the body parsed by FastAPI into a
  pydantic model and the answer returned as a dict (FastAPI's jsonable_encoder path);
- the query encoded on every request (no cache);
- one Redis ``GET`` per candidate (a round trip each), each value decoded on its own;
- one onnxruntime run per request (no batcher, no shape buckets).

It serves POST /rank (given candidate_ids, or retrieval of retrieve_k from the index),
GET /readyz and GET /healthz: enough for the load generator. Never for production.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import redis
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel
from tokenizers import Tokenizer

from service.features.format import HEADER_SIZE
from service.manifest import load_manifest, resolve_version_dir


class NaiveRequest(BaseModel):
    query: str
    candidate_ids: list[str] | None = None
    top_k: int = 10
    retrieve_k: int = 200


def _session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def create_app() -> FastAPI:
    """The app, configured from the service's FUSIONRANK_* variables."""
    artifacts = Path(os.environ.get("FUSIONRANK_ARTIFACTS_DIR", "artifacts"))
    redis_url = os.environ.get("FUSIONRANK_REDIS_URL") or "redis://127.0.0.1:6379/0"
    prefix = os.environ.get("FUSIONRANK_REDIS_PREFIX", "fusionrank")
    threads = int(os.environ.get("FUSIONRANK_INTRA_OP_THREADS", "1"))

    version_dir = resolve_version_dir(
        artifacts / "models", os.environ.get("FUSIONRANK_MODEL_VERSION") or None
    )
    manifest = load_manifest(version_dir)
    tokenizer = Tokenizer.from_file(str(version_dir / manifest.tokenizer_file))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=manifest.max_tokens)
    # The query encoder the service runs on CPU (service.stages.query_encoder), so the two
    # answer alike and differ only in how they batch and fetch.
    int8 = os.environ.get("FUSIONRANK_QUERY_ENCODER_INT8", "true").lower() not in ("0", "false")
    graph = "query_encoder_int8" if int8 and "query_encoder_int8" in manifest.graphs else ""
    encoder = _session(manifest.path(version_dir, graph or "query_encoder"), threads)
    ranker = _session(manifest.path(version_dir, "ranker"), threads)
    faiss.omp_set_num_threads(threads)
    index = faiss.read_index(str(version_dir / manifest.index.file))
    index_ids = json.loads((version_dir / manifest.index.ids_file).read_bytes())
    client = redis.Redis.from_url(redis_url)
    version = manifest.features_version
    dims = manifest.layout.dims

    app = FastAPI(title="fusionrank naive baseline")

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> dict:
        current = client.get(f"{prefix}:current")
        if current is None or current.decode() != version:
            raise HTTPException(503, f"redis {prefix!r} serves {current!r}, not {version}")
        return {
            "ready": True,
            "detail": "ready (naive baseline)",
            "model_version": manifest.version,
            "execution_provider": "CPUExecutionProvider",
            "features_version": version,
        }

    @app.post("/rank")
    def rank(request: NaiveRequest) -> dict:
        ids = np.array([tokenizer.encode(request.query).ids], dtype=np.int64)
        embedding, retrieval = encoder.run(
            ["query_embedding", "retrieval_vector"],
            {"input_ids": ids, "attention_mask": np.ones_like(ids)},
        )
        if request.candidate_ids is None:
            _, rows = index.search(retrieval, min(request.retrieve_k, index.ntotal))
            candidates = [index_ids[row] for row in rows[0] if row >= 0]
        else:
            candidates = request.candidate_ids
        found, missing, vectors = [], [], []
        for item_id in candidates:
            value = client.get(f"{prefix}:v:{version}:i:{item_id}")
            if value is None:
                missing.append(item_id)
                continue
            found.append(item_id)
            vectors.append(np.frombuffer(value[HEADER_SIZE:], dtype="<f2"))
        if not found:
            return {"items": [], "model_version": manifest.version, "missing_ids": missing}
        features = np.stack(vectors).reshape(len(found), dims)
        score, _, _ = ranker.run(
            ["score", "text_contribution", "image_contribution"],
            {
                "query_embedding": embedding,
                "item_features": features,
                "query_index": np.zeros(len(found), dtype=np.int64),
            },
        )
        order = np.argsort(-score, kind="stable")[: request.top_k]
        return {
            "items": [{"id": found[i], "score": float(score[i])} for i in order],
            "model_version": manifest.version,
            "missing_ids": missing,
        }

    return app


def main() -> None:
    import uvicorn

    uvicorn.run(
        "loadtest.naive_server:create_app",
        factory=True,
        host=os.environ.get("FUSIONRANK_HOST", "127.0.0.1"),
        port=int(os.environ.get("FUSIONRANK_PORT", "8100")),
        workers=int(os.environ.get("FUSIONRANK_WORKERS", "1")),
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_level=os.environ.get("FUSIONRANK_LOG_LEVEL", "warning"),
    )


if __name__ == "__main__":
    main()
