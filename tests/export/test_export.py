import json

import numpy as np
import pytest
import torch

from export.graphs import graph_defs, parity
from export.pipeline import ParityInputs, features_version, item_features, run
from models.catalogue import load_catalogue
from models.embeddings import item_embeddings
from models.encoders import ImageEncoder, TextEncoder
from models.evaluate import checkpoint_dir, load_checkpoint
from service.features import EmbeddedFeatureStore
from service.manifest import load_manifest, resolve_version_dir
from tests.conftest import SAMPLE

GRAPHS = ["query_encoder", "ranker", "ranker_fp16", "image_encoder", "item_encoder"]


@pytest.fixture(scope="module")
def exported(sample_artifacts):
    version_dir = resolve_version_dir(sample_artifacts / "models")
    manifest = load_manifest(version_dir)
    catalogue = load_catalogue(SAMPLE)
    model, _ = load_checkpoint(
        checkpoint_dir(sample_artifacts, catalogue.fingerprint) / "hybrid.pt"
    )
    embeddings = item_embeddings(catalogue, sample_artifacts / "cache", verbose=False)
    return version_dir, manifest, model, catalogue, embeddings


@pytest.mark.parametrize("name", GRAPHS)
def test_each_graph_matches_pytorch_on_real_inputs(exported, name):
    version_dir, manifest, model, catalogue, embeddings = exported
    text_encoder = TextEncoder()
    features = item_features(model, embeddings)
    queries = [p.title.lower() for p in catalogue.products[:20]]
    inputs = ParityInputs(catalogue, embeddings, features, queries, text_encoder)
    graph = {g.name: g for g in graph_defs(model, text_encoder, ImageEncoder())}[name]
    _, check = inputs.for_graph(name)
    diff = parity(graph, version_dir / manifest.graphs[name].file, check)
    assert diff <= graph.tolerance
    assert manifest.graphs[name].parity_max_abs_diff <= manifest.graphs[name].parity_tolerance


def test_manifest_describes_the_published_features(exported, sample_artifacts):
    version_dir, manifest, model, catalogue, embeddings = exported
    raw = json.loads((version_dir / "manifest.json").read_text())
    for key in (
        "version",
        "strategy",
        "opset",
        "source_checkpoint_sha256",
        "feature_layout",
        "graphs",
        "index",
        "metrics",
        "created",
    ):
        assert key in raw
    assert manifest.layout.dims == 128 and manifest.layout.dtype == "float16"
    store = EmbeddedFeatureStore(sample_artifacts / "features")
    assert store.current_version() == manifest.features_version
    ids = embeddings.ids[:50]
    batch = store.fetch(ids)
    expected = item_features(model, embeddings)[:50]
    np.testing.assert_array_equal(batch.matrix, expected)
    assert (
        features_version(embeddings.ids, item_features(model, embeddings))
        == manifest.features_version
    )


def test_index_finds_items_by_their_own_vectors(exported):
    import faiss

    version_dir, manifest, *_ = exported
    index = faiss.read_index(str(version_dir / manifest.index.file))
    ids = json.loads((version_dir / manifest.index.ids_file).read_text())
    assert index.ntotal == len(ids) == manifest.index.items
    assert manifest.index.recall_at_100 == pytest.approx(1.0)  # Flat below 200k items


def test_rerun_is_idempotent_and_version_is_content_derived(sample_artifacts, exported):
    version_dir, manifest, model, catalogue, _ = exported
    report = run(SAMPLE, sample_artifacts, strategy="hybrid", log=lambda m: None)
    assert report.reused and report.published_items == 0
    assert report.version == manifest.version
    # Same weights -> same version; changed weights -> another version.
    from export.pipeline import model_version

    assert model_version(model, catalogue) == manifest.version
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_version(model, catalogue) != manifest.version
