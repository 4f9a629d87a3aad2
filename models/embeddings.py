"""Item embeddings from the frozen encoders, computed once per catalogue and cached on disk.

The cache file name carries the catalogue's content hash and the encoder settings, so
retraining reuses it and a changed catalogue or encoder never reads a stale one.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from models.catalogue import Catalogue
from models.encoders import (
    IMAGE_DIMS,
    IMAGE_SIZE,
    ImageEncoder,
    TextEncoder,
    image_to_pixels,
    load_tokenizer,
    tokenize,
)

ENCODER_TAG = f"minilm-l6-v2_effnetlite0-{IMAGE_SIZE}px-early2-4"
BATCH = 64


@dataclass
class ItemEmbeddings:
    ids: list[str]
    text: np.ndarray  # (N, 384) float32, L2-normalised title embeddings
    image: np.ndarray  # (N, IMAGE_DIMS) float32

    def rows(self, ids: list[str]) -> np.ndarray:
        index = {pid: i for i, pid in enumerate(self.ids)}
        return np.array([index[pid] for pid in ids], dtype=np.int64)


def encode_texts(
    texts: list[str], encoder: TextEncoder | None = None, *, progress: str = ""
) -> np.ndarray:
    encoder = encoder or TextEncoder()
    tokenizer = load_tokenizer()
    # Sorting by length keeps longest-padding batches tight.
    order = np.argsort([len(t) for t in texts], kind="stable")
    out = np.zeros((len(texts), 384), dtype=np.float32)
    batches = range(0, len(texts), BATCH)
    with torch.inference_mode():
        for start in tqdm(batches, desc=progress or "text", disable=not progress, unit="batch"):
            rows = order[start : start + BATCH]
            ids, mask = tokenize(tokenizer, [texts[i] for i in rows])
            out[rows] = encoder(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    return out


def encode_images(catalogue: Catalogue, ids: list[str], *, progress: str = "") -> np.ndarray:
    encoder = ImageEncoder()
    out = np.zeros((len(ids), IMAGE_DIMS), dtype=np.float32)
    batches = range(0, len(ids), BATCH)
    with torch.inference_mode():
        for start in tqdm(batches, desc=progress or "images", disable=not progress, unit="batch"):
            chunk = ids[start : start + BATCH]
            pixels = np.stack([image_to_pixels(catalogue.load_image(pid)) for pid in chunk])
            out[start : start + len(chunk)] = encoder(torch.from_numpy(pixels)).numpy()
    return out


def item_embeddings(
    catalogue: Catalogue, cache_dir: Path, *, verbose: bool = True
) -> ItemEmbeddings:
    """Embeddings of every product of the catalogue, from the cache when present."""
    torch.set_num_threads(max(1, torch.get_num_threads()))
    path = Path(cache_dir) / f"embeddings-{catalogue.fingerprint}-{ENCODER_TAG}.npz"
    ids = [p.id for p in catalogue]
    if path.is_file():
        with np.load(path) as cached:
            if list(cached["ids"]) == ids:
                return ItemEmbeddings(ids, cached["text"], cached["image"].astype(np.float32))
    started = time.perf_counter()
    text = encode_texts(
        [p.title for p in catalogue], progress="title embeddings" if verbose else ""
    )
    image = encode_images(catalogue, ids, progress="image embeddings" if verbose else "")
    path.parent.mkdir(parents=True, exist_ok=True)
    # A temporary name of this process's own: concurrent runs never rename each other's
    # half-written file into place.
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.tmp.npz")
    np.savez(tmp, ids=np.array(ids), text=text, image=image.astype(np.float16))
    tmp.replace(path)
    if verbose:
        print(f"embedded {len(ids)} items in {time.perf_counter() - started:.0f}s -> {path}")
    return ItemEmbeddings(ids, text, image.astype(np.float16).astype(np.float32))


def stripped_title_embeddings(
    catalogue: Catalogue, embeddings: ItemEmbeddings, cache_dir: Path, *, verbose: bool = True
) -> np.ndarray:
    """Embeddings of the titles with their colour words removed (the training augmentation in
    models.train). Titles that name no colour reuse their original embedding."""
    from models.vocabulary import strip_colour_words

    path = Path(cache_dir) / f"stripped-titles-{catalogue.fingerprint}-{ENCODER_TAG}.npy"
    if path.is_file():
        cached = np.load(path)
        if cached.shape == embeddings.text.shape:
            return cached
    out = embeddings.text.copy()
    stripped = [strip_colour_words(p.title) for p in catalogue]
    changed = [i for i, p in enumerate(catalogue) if stripped[i] != p.title]
    if changed:
        out[changed] = encode_texts(
            [stripped[i] or "product" for i in changed],
            progress="colour-free titles" if verbose else "",
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}-{os.getpid()}.tmp.npy")
    np.save(tmp, out)
    tmp.replace(path)
    return out
