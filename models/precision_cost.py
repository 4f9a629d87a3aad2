"""What the service's cheaper number formats cost in ranking quality.

    python -m models precision-cost --data DIR [--out artifacts]

Scores the held-out and colour-slice lists of the evaluation with the default checkpoint:

- item features kept in float32, and rounded to float16 as the feature store holds them;
- query embeddings from PyTorch (what the evaluation uses), from the exported float32
  query encoder and from its int8 variant (what the service runs on CPU), each with float16
  features. The exported graphs are those of ``<out>/models/CURRENT``, which must come from
  the same checkpoint.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from models.encoders import load_tokenizer
from models.evaluate import checkpoint_dir, load_checkpoint, prepare
from models.metrics import evaluate_lists

QUERY_ENCODERS = ("query_encoder", "query_encoder_int8")


@torch.inference_mode()
def precision_cost(data: Path, out: Path) -> dict[str, dict[str, dict[str, float]]]:
    bench = prepare(data, out, verbose=False)
    ckpt = checkpoint_dir(out, bench.catalogue.fingerprint)
    default = ckpt / "default.json"  # written by the evaluation; the exporter's default
    strategy = json.loads(default.read_text())["strategy"] if default.is_file() else "hybrid"
    checkpoint = ckpt / f"{strategy}.pt"
    model, _ = load_checkpoint(checkpoint)
    emb = bench.embeddings
    features = model.item_features(
        torch.from_numpy(emb.text), model.reduce_image(torch.from_numpy(emb.image))
    )
    stored = features.half().float()
    encoders = _exported_encoders(out, hashlib.sha256(checkpoint.read_bytes()).hexdigest())
    tokenizer = load_tokenizer()
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split, (queries, lists) in bench.splits.items():
        torch_queries = torch.from_numpy(lists.query_embeddings)
        variants = {
            "float32 features": (features, torch_queries),
            "float16 features": (stored, torch_queries),
        }
        for name, session in encoders.items():
            embedded = _encode(session, tokenizer, [q.text for q in queries])
            variants[f"float16 features, {name}.onnx"] = (stored, torch.from_numpy(embedded))
            cosine = np.sum(embedded * lists.query_embeddings, axis=1) / (
                np.linalg.norm(embedded, axis=1) * np.linalg.norm(lists.query_embeddings, axis=1)
            )
            result.setdefault(split, {})[f"{name} min cosine vs PyTorch"] = {
                "value": float(cosine.min())
            }
        result.setdefault(split, {})
        for name, (matrix, query) in variants.items():
            scores = []
            for i, q in enumerate(queries):
                rows = torch.from_numpy(lists.rows[i][: len(q.candidates)])
                index = torch.zeros(len(rows), dtype=torch.long)
                s, _, _ = model.score(query[i : i + 1], matrix[rows], index)
                scores.append(s.numpy())
            result[split][name] = evaluate_lists([q.grades for q in queries], scores)
        diff = (features - stored).abs().max().item()
        result[split]["max_abs_feature_rounding"] = {"value": float(np.float32(diff))}
    return result


def _exported_encoders(out: Path, checkpoint_sha256: str) -> dict[str, ort.InferenceSession]:
    """The query encoder graphs of the CURRENT export, if it was made from this checkpoint."""
    current = out / "models" / "CURRENT"
    if not current.is_file():
        print(f"no {current}: exported query encoders not measured (run python -m export)")
        return {}
    version_dir = out / "models" / current.read_text().strip()
    manifest = json.loads((version_dir / "manifest.json").read_text())
    if manifest["source_checkpoint_sha256"] != checkpoint_sha256:
        print(f"{version_dir.name} was exported from another checkpoint: not measured")
        return {}
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return {
        name: ort.InferenceSession(
            str(version_dir / manifest["graphs"][name]["file"]),
            options,
            providers=["CPUExecutionProvider"],
        )
        for name in QUERY_ENCODERS
        if name in manifest["graphs"]
    }


def _encode(session: ort.InferenceSession, tokenizer, texts: list[str]) -> np.ndarray:
    """One query at a time, unpadded, as the service encodes them."""
    rows = []
    for text in texts:
        ids = np.asarray([tokenizer.encode(text).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        rows.append(session.run(["query_embedding"], feeds)[0][0])
    return np.stack(rows).astype(np.float32)
