"""Listwise training of the fused ranker over generated candidate lists.

Loss: softmax cross-entropy between the model's scores over a candidate list and the target
distribution proportional to 2^grade - 1 (ListNet with exponential gains), for the ranking head
and, with a smaller weight, for the retrieval head.

Colour augmentation: with probability `strip_colour_p` a candidate's title embedding is
replaced by the embedding of its title with colour words removed. About one product in nine
has such a title in the catalogue; without the augmentation the ranker learns to read colour
from the title and fails exactly on those products.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from models.queries import Query
from models.ranker import FusedRanker, RankerConfig


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 6
    batch_queries: int = 64
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    retrieval_weight: float = 0.5
    strip_colour_p: float = 0.3
    seed: int = 0


@dataclass
class ListBatchData:
    """Candidate lists as index arrays into the item embedding matrices."""

    query_embeddings: np.ndarray  # (Q, 384)
    rows: np.ndarray  # (Q, L) item rows, padded with 0
    grades: np.ndarray  # (Q, L) grades, -1 for padding

    @classmethod
    def build(cls, queries: Sequence[Query], query_embeddings: np.ndarray, row_of: dict[str, int]):
        width = max(len(q.candidates) for q in queries)
        rows = np.zeros((len(queries), width), dtype=np.int64)
        grades = np.full((len(queries), width), -1, dtype=np.int64)
        for i, q in enumerate(queries):
            rows[i, : len(q.candidates)] = [row_of[c] for c in q.candidates]
            grades[i, : len(q.grades)] = q.grades
        return cls(query_embeddings.astype(np.float32), rows, grades)


def listwise_loss(scores: torch.Tensor, grades: torch.Tensor) -> torch.Tensor:
    valid = grades >= 0
    gains = torch.where(valid, 2.0 ** grades.clamp(min=0).float() - 1.0, torch.zeros_like(scores))
    target = gains / gains.sum(-1, keepdim=True).clamp(min=1e-9)
    log_p = torch.log_softmax(scores.masked_fill(~valid, -1e9), dim=-1)
    return -(target * log_p).sum(-1).mean()


def train_ranker(
    config: RankerConfig,
    data: ListBatchData,
    text: np.ndarray,
    image: np.ndarray,
    text_stripped: np.ndarray | None = None,
    train: TrainConfig = TrainConfig(),
    *,
    progress: str = "",
) -> tuple[FusedRanker, list[float]]:
    """Returns the trained model and the mean loss of each epoch."""
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    model = FusedRanker(config)
    model.fit_image_reduction(torch.from_numpy(image))
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=train.learning_rate, weight_decay=train.weight_decay
    )
    steps_per_epoch = max(1, len(data.rows) // train.batch_queries)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=train.learning_rate, total_steps=steps_per_epoch * train.epochs
    )
    text_t = torch.from_numpy(text)
    with torch.no_grad():
        image_t = model.reduce_image(torch.from_numpy(image))
    stripped_t = torch.from_numpy(text_stripped) if text_stripped is not None else None
    queries_t = torch.from_numpy(data.query_embeddings)
    losses: list[float] = []
    started = time.perf_counter()
    bar = tqdm(total=steps_per_epoch * train.epochs, desc=progress or "train", disable=not progress)
    model.train()
    for _ in range(train.epochs):
        order = rng.permutation(len(data.rows))
        epoch_loss = 0.0
        for step in range(steps_per_epoch):
            batch = order[step * train.batch_queries : (step + 1) * train.batch_queries]
            rows = torch.from_numpy(data.rows[batch])
            grades = torch.from_numpy(data.grades[batch])
            item_text = text_t[rows]
            if stripped_t is not None and train.strip_colour_p > 0:
                swap = torch.from_numpy(rng.random(rows.shape) < train.strip_colour_p)
                item_text = torch.where(swap.unsqueeze(-1), stripped_t[rows], item_text)
            scores, retrieval = model.forward_lists(queries_t[batch], item_text, image_t[rows])
            loss = listwise_loss(scores, grades) + train.retrieval_weight * listwise_loss(
                retrieval, grades
            )
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
            scheduler.step()
            epoch_loss += loss.item()
            bar.update()
        losses.append(epoch_loss / steps_per_epoch)
        bar.set_postfix(loss=f"{losses[-1]:.4f}")
    bar.close()
    model.eval()
    model.train_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    return model, losses


@torch.inference_mode()
def score_lists(
    model: FusedRanker, data: ListBatchData, text: np.ndarray, image: np.ndarray
) -> list[np.ndarray]:
    """Model scores for every candidate list (padding dropped)."""
    out = []
    text_t, image_t = torch.from_numpy(text), model.reduce_image(torch.from_numpy(image))
    queries_t = torch.from_numpy(data.query_embeddings)
    for start in range(0, len(data.rows), 256):
        rows = torch.from_numpy(data.rows[start : start + 256])
        scores, _ = model.forward_lists(queries_t[start : start + 256], text_t[rows], image_t[rows])
        for s, g in zip(scores.numpy(), data.grades[start : start + 256], strict=True):
            out.append(s[g >= 0])
    return out
