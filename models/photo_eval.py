"""Search by photo, evaluated the way the service answers it: a held-out product's own photo
is the query; every other held-out product is a candidate, except those sharing its photo
(the query's duplicate-photo group, itself included); candidates are ranked by the cosine of
their photo-head vectors to the photo's (models.photo_head: how the service retrieves and ranks
a photo without text). The fused ranker's own image vectors are ranked the same way, for
comparison.

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
from models.photo_head import PhotoHead, photo_vectors
from models.ranker import FusedRanker

PHOTO_QUERIES = 500
SEED = 7


def _unit(rows: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)


def photo_query_metrics(
    photo_head: PhotoHead,
    model: FusedRanker,
    embeddings: ItemEmbeddings,
    row_of: dict[str, int],
    products: list[Product],
    *,
    queries: int = PHOTO_QUERIES,
    seed: int = SEED,
) -> dict[str, object]:
    """NDCG@10 / MAP / MRR of the photo head's vectors, of the ranker's image vectors (when it
    has an image tower) and of the raw features."""
    rows = np.array([row_of[p.id] for p in products])
    raw = embeddings.image[rows].astype(np.float32)
    head = photo_vectors(photo_head, raw)
    fused = None
    if model.image_tower is not None:
        with torch.inference_mode():
            fused = model.image_tower(model.reduce_image(torch.from_numpy(raw))).numpy()
        fused = _unit(fused)
    raw = _unit(raw)
    types = np.array([p.article_type for p in products])
    colours = np.array([p.colour for p in products])
    groups = np.array([p.group for p in products])
    picks = np.random.default_rng(seed).choice(len(products), min(queries, len(products)), False)
    rankings = {"photo_head": head, "model_image_vectors": fused, "raw_efficientnet": raw}
    vectors = {name: v for name, v in rankings.items() if v is not None}
    grades: list[np.ndarray] = []
    scores: dict[str, list[np.ndarray]] = {name: [] for name in vectors}
    for q in picks.tolist():
        candidates = groups != groups[q]
        same_type = types[candidates] == types[q]
        grades.append(np.where(same_type, np.where(colours[candidates] == colours[q], 3, 2), 0))
        for name, v in vectors.items():
            scores[name].append(v[candidates] @ v[q])
    return {
        "queries": len(picks),
        "candidates_per_query": int(np.mean([len(g) for g in grades])),
        **{name: evaluate_lists(grades, lists) for name, lists in scores.items()},
    }
