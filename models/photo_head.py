"""Photo similarity: a small head over the frozen image features, trained with the catalogue's
own labels, so that photos of the same kind of product in the same colour lie close together.

Why a head of its own: the ranker's image tower is trained for text queries against fused item
vectors; measured on held-out photos, its image vectors rank photo-to-photo no better than the
raw EfficientNet features (`make eval`'s "Search by photo" table). The catalogue labels every
photo with its articleType, baseColour, usage and gender; none of that needs a query.

Model: frozen image features [IMAGE_DIMS] -> standardised -> Linear -> GELU -> Linear ->
L2-normalised photo vector [PHOTO_DIMS]. Training: one cosine classifier per label
(normalised-softmax proxies with a fixed temperature, a standard metric-learning loss), on the
train split's products only. The proxies are thrown away after training: what is exported is
the vector, and photos are compared by the inner product of vectors (cosine).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from models.catalogue import Product
from models.encoders import IMAGE_DIMS

PHOTO_DIMS = 128
# Product field -> its loss weight. Colour and type decide what a shopper calls "the same";
# usage and gender only shape the space.
LABELS = {"article_type": 1.0, "colour": 1.0, "usage": 0.25, "gender": 0.25}
MIN_LABEL_COUNT = 5  # rarer values share one "other" class (too few photos to learn from)


@dataclass(frozen=True)
class PhotoHeadConfig:
    input_dims: int = IMAGE_DIMS
    hidden_dims: int = 512
    photo_dims: int = PHOTO_DIMS
    dropout: float = 0.2
    # values of each label, in class order (the last class of each is "other")
    classes: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PhotoHeadConfig:
        return cls(**data)


@dataclass(frozen=True)
class PhotoTrainConfig:
    epochs: int = 12
    batch: int = 512
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    temperature: float = 0.05
    seed: int = 0


class PhotoHead(nn.Module):
    def __init__(self, config: PhotoHeadConfig) -> None:
        super().__init__()
        self.config = config
        # Standardisation of the raw features (set from the training photos): the final pooled
        # and the early-block parts differ in scale by an order of magnitude.
        self.register_buffer("mean", torch.zeros(config.input_dims))
        self.register_buffer("scale", torch.ones(config.input_dims))
        self.net = nn.Sequential(
            nn.Linear(config.input_dims, config.hidden_dims),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dims, config.photo_dims),
        )
        self.proxies = nn.ParameterDict(
            {
                name: nn.Parameter(torch.randn(len(values), config.photo_dims) * 0.1)
                for name, values in config.classes.items()
            }
        )

    def forward(self, image_embedding: torch.Tensor) -> torch.Tensor:
        """image_embedding [N, IMAGE_DIMS] -> photo vector [N, photo_dims], unit length."""
        x = (image_embedding - self.mean) / self.scale
        return nn.functional.normalize(self.net(x), dim=-1)

    def logits(self, vectors: torch.Tensor, label: str, temperature: float) -> torch.Tensor:
        proxies = nn.functional.normalize(self.proxies[label], dim=-1)
        return vectors @ proxies.T / temperature


def label_classes(products: Sequence[Product]) -> dict[str, list[str]]:
    """Each label's values seen at least MIN_LABEL_COUNT times in ``products``, plus "other"."""
    classes = {}
    for name in LABELS:
        counts: dict[str, int] = {}
        for p in products:
            value = getattr(p, name)
            counts[value] = counts.get(value, 0) + 1
        kept = sorted(v for v, n in counts.items() if n >= MIN_LABEL_COUNT and v)
        classes[name] = [*kept, "other"]
    return classes


def label_targets(products: Sequence[Product], classes: dict[str, list[str]]) -> dict:
    targets = {}
    for name, values in classes.items():
        position = {v: i for i, v in enumerate(values)}
        other = len(values) - 1
        targets[name] = torch.tensor(
            [position.get(getattr(p, name), other) for p in products], dtype=torch.long
        )
    return targets


def train_photo_head(
    products: Sequence[Product],
    image_embeddings: np.ndarray,
    config: PhotoTrainConfig = PhotoTrainConfig(),
    *,
    progress: str = "",
) -> tuple[PhotoHead, list[float], float]:
    """A head trained on ``products`` (train split only) and their raw image embeddings
    (row i is products[i]'s photo). Returns the model (eval mode), the loss per epoch and the
    training seconds."""
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    classes = label_classes(products)
    model = PhotoHead(PhotoHeadConfig(classes=classes))
    features = torch.from_numpy(np.ascontiguousarray(image_embeddings, dtype=np.float32))
    model.mean.copy_(features.mean(0))
    model.scale.copy_(features.std(0).clamp(min=1e-4))
    targets = label_targets(products, classes)
    optimiser = torch.optim.AdamW(
        model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay
    )
    steps = config.epochs * -(-len(products) // config.batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimiser, max_lr=config.learning_rate, total_steps=steps
    )
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    model.train()
    for _ in tqdm(range(config.epochs), desc=progress or "photo head", disable=not progress):
        order = torch.randperm(len(products), generator=generator)
        total, batches = 0.0, 0
        for start in range(0, len(order), config.batch):
            rows = order[start : start + config.batch]
            vectors = model(features[rows])
            loss = sum(
                weight
                * nn.functional.cross_entropy(
                    model.logits(vectors, name, config.temperature), targets[name][rows]
                )
                for name, weight in LABELS.items()
            )
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            total, batches = total + loss.item(), batches + 1
        losses.append(total / batches)
    model.eval()
    return model, losses, time.perf_counter() - started


@torch.inference_mode()
def photo_vectors(model: PhotoHead, image_embeddings: np.ndarray) -> np.ndarray:
    """Unit photo vectors (float32) of every row of raw image embeddings."""
    out = np.zeros((len(image_embeddings), model.config.photo_dims), dtype=np.float32)
    for start in range(0, len(image_embeddings), 8192):
        chunk = torch.from_numpy(
            np.ascontiguousarray(image_embeddings[start : start + 8192], dtype=np.float32)
        )
        out[start : start + len(chunk)] = model(chunk).numpy()
    return out


def save_photo_head(path, model: PhotoHead, metrics: dict, fingerprint: str) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("proxies.")}
    torch.save(
        {
            "config": model.config.to_dict(),
            "state_dict": state,
            "metrics": metrics,
            "catalogue": fingerprint,
        },
        path,
    )


def load_photo_head(path) -> tuple[PhotoHead, dict]:  # noqa: ANN001
    payload = torch.load(path, map_location="cpu", weights_only=True)
    config = PhotoHeadConfig.from_dict(payload["config"])
    model = PhotoHead(PhotoHeadConfig(**{**config.to_dict(), "classes": {}}))
    model.load_state_dict(payload["state_dict"])
    model.eval()
    return model, payload
