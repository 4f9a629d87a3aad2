"""Text baselines the fused ranker must beat: BM25 over titles and zero-shot MiniLM cosine."""

from __future__ import annotations

from collections.abc import Sequence

import bm25s
import numpy as np

from models.queries import Query


def bm25_scores(queries: Sequence[Query], titles: dict[str, str]) -> list[np.ndarray]:
    """BM25 (bm25s defaults, English stop words) with corpus statistics from the whole
    evaluation pool, then each query's candidates scored."""
    ids = list(titles)
    position = {pid: i for i, pid in enumerate(ids)}
    retriever = bm25s.BM25()
    retriever.index(
        bm25s.tokenize([titles[i] for i in ids], stopwords="en", show_progress=False),
        show_progress=False,
    )
    out = []
    for q in queries:
        tokens = bm25s.tokenize([q.text], stopwords="en", return_ids=False, show_progress=False)[0]
        all_scores = retriever.get_scores(tokens)
        out.append(np.asarray(all_scores)[[position[c] for c in q.candidates]])
    return out


def cosine_scores(
    query_embeddings: np.ndarray, queries: Sequence[Query], text: np.ndarray, row_of: dict[str, int]
) -> list[np.ndarray]:
    """Zero-shot MiniLM: cosine of the query and title embeddings (both L2-normalised)."""
    return [
        text[[row_of[c] for c in q.candidates]] @ query_embeddings[i] for i, q in enumerate(queries)
    ]
