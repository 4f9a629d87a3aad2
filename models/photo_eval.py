"""Search by photo, evaluated the way the service answers it: a held-out product's own photo
is the query; every other held-out product is a candidate, except those sharing its photo
(the query's duplicate-photo group, itself included); candidates are ranked by the cosine of
their image vectors to the photo's (the service's scoring of a photo without text).

Grades come from the catalogue's attributes (there are no logged queries for this catalogue):
3 = same articleType and baseColour, 2 = same articleType, 0 otherwise. The baseline ranks the
same candidates by the cosine of the raw EfficientNet-Lite0 features the model starts from.
"""

from __future__ import annotations

import numpy as np
import torch

from models.catalogue import Product
from models.embeddings import ItemEmbeddings
from models.metrics import evaluate_lists
from models.ranker import FusedRanker

PHOTO_QUERIES = 500
SEED = 7


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)


def photo_query_metrics(
    model: FusedRanker,
    embeddings: ItemEmbeddings,
    row_of: dict[str, int],
    products: list[Product],
    *,
    queries: int = PHOTO_QUERIES,
    seed: int = SEED,
) -> dict[str, object] | None:
    """NDCG@10 / MAP / MRR of the model's image vectors and of the raw features, or None for a
    model without an image tower."""
    if model.image_tower is None:
        return None
    rows = np.array([row_of[p.id] for p in products])
    raw = embeddings.image[rows].astype(np.float32)
    with torch.inference_mode():
        fused = model.image_tower(model.reduce_image(torch.from_numpy(raw))).numpy()
    fused, raw = _unit(fused), _unit(raw)
    types = np.array([p.article_type for p in products])
    colours = np.array([p.colour for p in products])
    groups = np.array([p.group for p in products])
    picks = np.random.default_rng(seed).choice(len(products), min(queries, len(products)), False)
    grades, by_model, by_raw = [], [], []
    for q in picks.tolist():
        candidates = groups != groups[q]
        same_type = types[candidates] == types[q]
        grades.append(np.where(same_type, np.where(colours[candidates] == colours[q], 3, 2), 0))
        by_model.append(fused[candidates] @ fused[q])
        by_raw.append(raw[candidates] @ raw[q])
    return {
        "queries": len(picks),
        "candidates_per_query": int(np.mean([len(g) for g in grades])),
        "model_image_vectors": evaluate_lists(grades, by_model),
        "raw_efficientnet": evaluate_lists(grades, by_raw),
    }
