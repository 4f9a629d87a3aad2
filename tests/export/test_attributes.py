"""The attribute columns python -m export writes beside the index: row i describes the i-th
indexed id, with the catalogue's own values (the service's filters rely on that order)."""

import json

import numpy as np
import pytest

from export.attributes import ATTRIBUTES_DIR, COLUMNS, VOCAB_FILE, YEAR_FILE, write_attributes
from models.catalogue import load_catalogue
from service.manifest import load_manifest, resolve_version_dir
from tests.conftest import SAMPLE


@pytest.mark.slow
def test_columns_follow_the_index_rows_with_the_catalogues_values(sample_artifacts, tmp_path):
    sample_version_dir = resolve_version_dir(sample_artifacts / "models")
    directory = sample_version_dir / ATTRIBUTES_DIR
    ids = json.loads(
        (sample_version_dir / load_manifest(sample_version_dir).index.ids_file).read_text()
    )
    vocab = json.loads((directory / VOCAB_FILE).read_text())
    products = {p.id: p for p in load_catalogue(SAMPLE)}
    assert set(vocab) == set(COLUMNS)
    for name, field in COLUMNS.items():
        codes = np.load(directory / f"{name}.npy")
        assert codes.dtype == np.uint16 and codes.shape == (len(ids),)
        assert [vocab[name][c] for c in codes.tolist()] == [
            getattr(products[i], field) for i in ids
        ]
    years = np.load(directory / YEAR_FILE)
    assert years.tolist() == [products[i].year or 0 for i in ids]
    assert (years > 0).mean() > 0.9  # the sample has years

    # Written once: a second call keeps what is there.
    before = (directory / VOCAB_FILE).stat().st_mtime_ns
    assert write_attributes(load_catalogue(SAMPLE), ids, sample_version_dir) == directory
    assert (directory / VOCAB_FILE).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="not in the catalogue"):
        write_attributes(load_catalogue(SAMPLE), [*ids[:3], "no-such-id"], tmp_path)
