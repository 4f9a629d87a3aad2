import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch

from export.graphs import INT8_SUFFIX, INT8_TOLERANCE, graph_defs, parity
from export.pipeline import ParityInputs, features_version, item_features, run
from models.catalogue import load_catalogue
from models.embeddings import item_embeddings
from models.encoders import ImageEncoder, TextEncoder
from models.evaluate import PHOTO_HEAD_FILE, checkpoint_dir, load_checkpoint
from models.photo_head import load_photo_head, photo_vectors
from service.features import EmbeddedFeatureStore
from service.manifest import load_manifest, resolve_version_dir
from tests.conftest import SAMPLE

GRAPHS = [
    "query_encoder",
    "query_encoder_int8",
    "ranker",
    "ranker_fp16",
    "image_encoder",
    "item_encoder",
    "photo_head",
]


@pytest.fixture(scope="module")
def exported(sample_artifacts):
    version_dir = resolve_version_dir(sample_artifacts / "models")
    manifest = load_manifest(version_dir)
    catalogue = load_catalogue(SAMPLE)
    checkpoints = checkpoint_dir(sample_artifacts, catalogue.fingerprint)
    model, _ = load_checkpoint(checkpoints / "hybrid.pt")
    embeddings = item_embeddings(catalogue, sample_artifacts / "cache", verbose=False)
    return version_dir, manifest, model, catalogue, embeddings


@pytest.fixture(scope="module")
def photo_head(sample_artifacts):
    fingerprint = load_catalogue(SAMPLE).fingerprint
    return load_photo_head(checkpoint_dir(sample_artifacts, fingerprint) / PHOTO_HEAD_FILE)[0]


@pytest.mark.parametrize("name", GRAPHS)
def test_each_graph_matches_pytorch_on_real_inputs(exported, photo_head, name):
    version_dir, manifest, model, catalogue, embeddings = exported
    text_encoder = TextEncoder()
    features = item_features(model, embeddings)
    queries = [p.title.lower() for p in catalogue.products[:20]]
    inputs = ParityInputs(catalogue, embeddings, features, queries, text_encoder)
    source = name.removesuffix(INT8_SUFFIX)  # an int8 graph is checked against its source
    graphs = graph_defs(model, text_encoder, ImageEncoder(), photo_head)
    graph = {g.name: g for g in graphs}[source]
    _, check = inputs.for_graph(source)
    diff = parity(graph, version_dir / manifest.graphs[name].file, check)
    tolerance = INT8_TOLERANCE if name != source else graph.tolerance
    assert diff <= tolerance
    assert manifest.graphs[name].parity_tolerance == tolerance
    assert manifest.graphs[name].parity_max_abs_diff <= tolerance


def test_the_int8_query_encoder_keeps_the_query_direction(exported):
    version_dir, manifest, model, catalogue, embeddings = exported
    text_encoder = TextEncoder()
    queries = [p.title.lower() for p in catalogue.products[:40]]
    features = item_features(model, embeddings)
    inputs = ParityInputs(catalogue, embeddings, features, queries, text_encoder)
    _, check = inputs.for_graph("query_encoder")
    embedded = {}
    for name in ("query_encoder", "query_encoder_int8"):
        session = ort.InferenceSession(
            str(version_dir / manifest.graphs[name].file), providers=["CPUExecutionProvider"]
        )
        embedded[name] = session.run(["query_embedding"], check)[0]
    full, int8 = embedded["query_encoder"], embedded["query_encoder_int8"]
    cosine = np.sum(full * int8, 1) / np.linalg.norm(full, axis=1) / np.linalg.norm(int8, axis=1)
    assert cosine.min() > 0.97, cosine
    assert not np.array_equal(full, int8)  # it is a different graph


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


def test_photo_index_holds_the_photo_heads_vectors_in_the_item_index_rows(exported, photo_head):
    import faiss

    version_dir, manifest, _, _, embeddings = exported
    spec = manifest.photo_index
    assert spec.ids_file == manifest.index.ids_file and spec.items == manifest.index.items
    index = faiss.read_index(str(version_dir / spec.file))
    ids = json.loads((version_dir / spec.ids_file).read_text())
    rows = embeddings.rows(ids)
    expected = photo_vectors(photo_head, embeddings.image[rows])
    np.testing.assert_allclose(index.reconstruct_n(0, index.ntotal), expected, atol=1e-6)
    assert index.d == spec.dims == photo_head.config.photo_dims


def test_rerun_is_idempotent_and_version_is_content_derived(sample_artifacts, exported, photo_head):
    version_dir, manifest, model, catalogue, _ = exported
    report = run(SAMPLE, sample_artifacts, strategy="hybrid", log=lambda m: None)
    assert report.reused and report.published_items == 0
    assert report.version == manifest.version
    # Same weights -> same version; changed weights -> another version.
    from export.pipeline import model_version

    assert model_version(model, photo_head, catalogue) == manifest.version
    changed_head = copy.deepcopy(photo_head)
    with torch.no_grad():
        next(changed_head.parameters()).add_(1e-3)
    assert model_version(model, changed_head, catalogue) != manifest.version
    with torch.no_grad():
        next(model.parameters()).add_(1e-3)
    assert model_version(model, photo_head, catalogue) != manifest.version
