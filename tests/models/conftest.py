from pathlib import Path

import numpy as np
import pytest

from models.catalogue import load_catalogue

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="session")
def sample_catalogue():
    return load_catalogue(SAMPLE)


@pytest.fixture(scope="session")
def sample_slice_embeddings(sample_catalogue):
    """Real encoder outputs for 240 sample products (the encoders are run, not faked)."""
    from models.embeddings import encode_images, encode_texts

    products = sample_catalogue.products[::13][:240]
    ids = [p.id for p in products]
    text = encode_texts([p.title for p in products])
    image = encode_images(sample_catalogue, ids)
    return products, text, image.astype(np.float32)
