"""What storing item vectors in float16 costs in ranking quality.

    python -m models storage-cost --data DIR [--out artifacts]

Scores the held-out and colour-slice lists of the evaluation with the default checkpoint twice:
item features kept in float32, and rounded to float16 as the feature store holds them.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from models.evaluate import checkpoint_dir, load_checkpoint, prepare
from models.metrics import evaluate_lists


@torch.inference_mode()
def storage_cost(data: Path, out: Path) -> dict[str, dict[str, dict[str, float]]]:
    bench = prepare(data, out, verbose=False)
    ckpt = checkpoint_dir(out, bench.catalogue.fingerprint)
    strategy = json.loads((ckpt / "default.json").read_text())["strategy"]
    model, _ = load_checkpoint(ckpt / f"{strategy}.pt")
    emb = bench.embeddings
    features = model.item_features(
        torch.from_numpy(emb.text), model.reduce_image(torch.from_numpy(emb.image))
    )
    variants = {"float32": features, "float16": features.half().float()}
    result: dict[str, dict[str, dict[str, float]]] = {}
    for split, (queries, lists) in bench.splits.items():
        query = torch.from_numpy(lists.query_embeddings)
        result[split] = {}
        for name, matrix in variants.items():
            scores = []
            for i, q in enumerate(queries):
                rows = torch.from_numpy(lists.rows[i][: len(q.candidates)])
                index = torch.zeros(len(rows), dtype=torch.long)
                s, _, _ = model.score(query[i : i + 1], matrix[rows], index)
                scores.append(s.numpy())
            result[split][name] = evaluate_lists([q.grades for q in queries], scores)
        diff = (variants["float32"] - variants["float16"]).abs().max().item()
        result[split]["max_abs_feature_rounding"] = {"value": float(np.float32(diff))}
    return result
