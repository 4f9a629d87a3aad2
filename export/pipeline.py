"""train -> export -> publish, idempotently.

1. The checkpoint of the chosen strategy (default: the one the evaluation chose) is taken from
   `<out>/checkpoints/<catalogue fingerprint>/`; when it is missing, that one strategy is
   trained now.
2. The model version is a hash of the checkpoint's weights, the catalogue and this exporter's
   format, so two exports of the same weights agree. A version directory that already has a
   manifest is reused as is; otherwise every graph is exported into a temporary directory,
   checked for parity, and renamed into place only when complete.
3. Item features (float16) are computed for the whole catalogue and published to the feature
   store (Redis when a URL is given, else the embedded store in `<out>/features`). The store's
   version is a hash of the features, and publishing an unchanged version is a no-op.
4. The photo head (models.photo_head) is taken from the same checkpoints directory, or trained
   now on the train split; it is exported beside the ranker, and the items' photo vectors are
   indexed in `photo_index.faiss` (search by photo). Its weights are part of the version hash.
5. The indexed items' attributes are written beside the index (export.attributes), for the
   service's filters, boosts and diversity.
6. `<out>/models/CURRENT` names the version to serve.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from export.attributes import write_attributes
from export.graphs import OPSET, export_all, graph_defs
from export.index import build_index, build_photo_index
from export.items import write_items
from models.catalogue import Catalogue
from models.embeddings import ItemEmbeddings, encode_texts, item_embeddings
from models.encoders import (
    MAX_TEXT_TOKENS,
    ImageEncoder,
    TextEncoder,
    image_to_pixels,
    load_tokenizer,
    text_model_path,
    tokenize,
)
from models.evaluate import (
    PHOTO_HEAD_FILE,
    checkpoint_dir,
    load_checkpoint,
    prepare,
    save_checkpoint,
    train_method,
    train_photo_model,
)
from models.photo_head import PhotoHead, load_photo_head, photo_vectors, save_photo_head
from models.queries import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, QueryGenerator
from models.ranker import FusedRanker
from service.features import (
    DEFAULT_RETENTION,
    FeatureLayout,
    FeatureStore,
    Retention,
    open_feature_store,
)
from service.manifest import CURRENT_FILE, Manifest, write_manifest

# 2: query share of the first layers computed once per query; 3: int8 query encoder beside
# the float32 one; 4: the photo head and the photo index
EXPORT_FORMAT = 4


@dataclass
class ExportReport:
    version: str
    version_dir: Path
    reused: bool
    features_version: str
    published_items: int
    publish_seconds: float
    manifest: Manifest


def _checkpoint(
    out: Path, catalogue: Catalogue, strategy: str | None, log
) -> tuple[Path, FusedRanker, dict]:
    checkpoints = checkpoint_dir(out, catalogue.fingerprint)
    source = "--strategy"
    if strategy is None:
        default = checkpoints / "default.json"
        if default.is_file():
            strategy = json.loads(default.read_text())["strategy"]
            source = "the evaluation's choice"
        else:
            strategy, source = "hybrid", "no evaluation in this artifacts directory"
    path = checkpoints / f"{strategy}.pt"
    if path.is_file():
        log(f"using checkpoint {path} ({strategy}: {source})")
        model, payload = load_checkpoint(path)
        return path, model, payload
    log(f"no checkpoint {path}: training {strategy} now")
    bench = prepare(catalogue.root, out, verbose=True)
    model, metrics, _ = train_method(bench, strategy)
    save_checkpoint(path, model, metrics, catalogue.fingerprint)
    model, payload = load_checkpoint(path)
    return path, model, payload


def _photo_head(out: Path, catalogue: Catalogue, embeddings: ItemEmbeddings, log) -> PhotoHead:
    path = checkpoint_dir(out, catalogue.fingerprint) / PHOTO_HEAD_FILE
    if path.is_file():
        log(f"using photo head {path}")
        return load_photo_head(path)[0]
    log(f"no photo head {path}: training it now (train split)")
    model, facts = train_photo_model(catalogue.products, embeddings)
    save_photo_head(path, model, {"training": facts}, catalogue.fingerprint)
    return load_photo_head(path)[0]


def model_version(model: FusedRanker, photo: PhotoHead, catalogue: Catalogue) -> str:
    digest = hashlib.sha256(f"{EXPORT_FORMAT}|{catalogue.fingerprint}|".encode())
    digest.update(json.dumps(model.config.to_dict(), sort_keys=True).encode())
    weights = [("ranker", model.state_dict()), ("photo_head", photo.state_dict())]
    for prefix, state in weights:
        for name, tensor in sorted(state.items()):
            digest.update(f"{prefix}.{name}".encode())
            digest.update(tensor.detach().cpu().numpy().tobytes())
    return f"{model.config.strategy}-{digest.hexdigest()[:12]}"


@torch.no_grad()
def item_features(model: FusedRanker, embeddings: ItemEmbeddings) -> np.ndarray:
    """Stored features for every item, float16, in embeddings.ids order."""
    out = []
    for start in range(0, len(embeddings.ids), 4096):
        text = torch.from_numpy(embeddings.text[start : start + 4096])
        image = model.reduce_image(torch.from_numpy(embeddings.image[start : start + 4096]))
        out.append(model.item_features(text, image).numpy())
    return np.concatenate(out).astype(np.float16)


def features_version(ids: list[str], features: np.ndarray) -> str:
    digest = hashlib.sha256("\n".join(ids).encode())
    digest.update(features.tobytes())
    return f"f-{digest.hexdigest()[:16]}"


def _probe_queries(catalogue: Catalogue, count: int = 300) -> list[str]:
    """Real-looking queries over the whole catalogue (for index recall and parity checks)."""
    generated = QueryGenerator(catalogue.products, seed=11).generate(
        count, TRAIN_TEMPLATES + HELDOUT_TEMPLATES, 2
    )
    return [q.text for q in generated]


class ParityInputs:
    """Real catalogue inputs for each graph: a small batch to trace the export with and a
    larger one, of other sizes, to check parity on (which also exercises the dynamic axes)."""

    def __init__(self, catalogue, embeddings, features, queries, text_encoder):
        self.catalogue, self.embeddings, self.features = catalogue, embeddings, features
        self.queries = queries
        self.tokenizer = load_tokenizer()
        self.rows = np.linspace(0, len(embeddings.ids) - 1, 300).astype(int)
        self.query_emb = encode_texts(queries[:8], text_encoder)

    def for_graph(self, name: str) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        rows = self.rows
        if name == "query_encoder":
            ids, mask = tokenize(self.tokenizer, self.queries[:2])
            check_ids, check_mask = tokenize(self.tokenizer, self.queries[2:9])
            return (
                {"input_ids": ids, "attention_mask": mask},
                {"input_ids": check_ids, "attention_mask": check_mask},
            )
        if name in ("ranker", "ranker_fp16"):
            trace = {
                "query_embedding": self.query_emb[:2],
                "item_features": self.features[rows[:7]],
                "query_index": np.array([0, 1, 0, 1, 0, 1, 1], dtype=np.int64),
            }
            check = {
                "query_embedding": self.query_emb[:3],
                "item_features": self.features[rows],
                "query_index": np.arange(len(rows), dtype=np.int64) % 3,
            }
            return trace, check
        if name == "image_encoder":
            ids = [self.embeddings.ids[i] for i in rows[:10]]
            pixels = np.stack([image_to_pixels(self.catalogue.load_image(i)) for i in ids])
            return {"pixels": pixels[:2]}, {"pixels": pixels[2:]}
        if name == "item_encoder":
            text, image = self.embeddings.text[rows], self.embeddings.image[rows]
            return (
                {"text_embedding": text[:2], "image_embedding": image[:2]},
                {"text_embedding": text, "image_embedding": image},
            )
        if name == "photo_head":
            image = self.embeddings.image[rows]
            return {"image_embedding": image[:2]}, {"image_embedding": image}
        raise KeyError(name)


def _export_version(
    model: FusedRanker,
    photo: PhotoHead,
    checkpoint: Path,
    payload: dict,
    catalogue: Catalogue,
    embeddings: ItemEmbeddings,
    features: np.ndarray,
    feature_version: str,
    version: str,
    target: Path,
    index_factory: str,
    log,
    index_shards: int = 1,
) -> Manifest:
    tmp = target.parent / f".tmp-{version}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    text_encoder, image_encoder = TextEncoder(), ImageEncoder()
    queries = _probe_queries(catalogue)
    inputs = ParityInputs(catalogue, embeddings, features, queries, text_encoder)
    log(f"exporting {version} to ONNX (opset {OPSET}) with parity checks:")
    graphs = export_all(
        graph_defs(model, text_encoder, image_encoder, photo), inputs.for_graph, tmp, log=log
    )
    shutil.copy(Path(text_model_path()) / "tokenizer.json", tmp / "tokenizer.json")

    with torch.no_grad():
        retrieval = model.retrieval_vector(
            torch.from_numpy(encode_texts(queries, text_encoder))
        ).numpy()
    built = build_index(
        embeddings.ids, features.astype(np.float32), retrieval, tmp, index_factory, index_shards
    )
    log(
        f"  index {built.spec.factory}: {built.spec.items} items, recall@100 vs exact "
        f"{built.spec.recall_at_100:.4f}, built in {built.spec.build_seconds:.2f}s"
    )
    photo_index = build_photo_index(photo_vectors(photo, embeddings.image), tmp)
    log(f"  photo index: {photo_index.items} items, {photo_index.dims} dims (exact)")
    layout = FeatureLayout(model.config.text_dims, model.config.image_dims, "float16")
    manifest = Manifest(
        version=version,
        strategy=model.config.strategy,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        opset=OPSET,
        source_checkpoint_sha256=hashlib.sha256(checkpoint.read_bytes()).hexdigest(),
        catalogue_fingerprint=catalogue.fingerprint,
        feature_layout=layout.to_dict(),
        features_version=feature_version,
        tokenizer_file="tokenizer.json",
        max_tokens=MAX_TEXT_TOKENS,
        graphs=graphs,
        index=built.spec,
        photo_index=photo_index,
        metrics=payload.get("metrics", {}),
    )
    write_manifest(tmp, manifest)
    tmp.rename(target)
    return manifest


def run(
    data: Path,
    out: Path,
    *,
    strategy: str | None = None,
    redis_url: str | None = None,
    redis_prefix: str = "fusionrank",
    index_factory: str = "auto",
    index_shards: int = 1,
    store: FeatureStore | None = None,
    retention: Retention = DEFAULT_RETENTION,
    log=print,
) -> ExportReport:
    from models.catalogue import load_catalogue
    from service.manifest import load_manifest

    catalogue = load_catalogue(data)
    embeddings = item_embeddings(catalogue, out / "cache")
    checkpoint, model, payload = _checkpoint(out, catalogue, strategy, log)
    photo = _photo_head(out, catalogue, embeddings, log)
    version = model_version(model, photo, catalogue)
    features = item_features(model, embeddings)
    feature_version = features_version(embeddings.ids, features)
    target = out / "models" / version
    reused = (target / "manifest.json").is_file()
    if reused:
        manifest = load_manifest(target)
        log(f"model {version} already exported: reusing {target}")
    else:
        manifest = _export_version(
            model,
            photo,
            checkpoint,
            payload,
            catalogue,
            embeddings,
            features,
            feature_version,
            version,
            target,
            index_factory,
            log,
            index_shards,
        )

    index_ids = json.loads((target / manifest.index.ids_file).read_bytes())
    write_attributes(catalogue, index_ids, target, log)  # reused versions get them too

    store = store or open_feature_store(redis_url, out / "features", prefix=redis_prefix)
    report = store.publish(
        embeddings.ids, features, manifest.layout, feature_version, retention=retention
    )
    if report.items:
        rate = report.items / max(report.seconds, 1e-9)
        log(
            f"published {report.items} items ({manifest.layout.value_bytes} B each) as "
            f"{feature_version} in {report.seconds:.1f}s ({rate:.0f} items/s)"
        )
    else:
        log(f"features {feature_version} already stored whole: nothing written")
    if report.removed_versions:
        log(f"retired feature versions {', '.join(report.removed_versions)} ({retention})")
    write_items(catalogue, out, log)  # titles and photos for the search page
    (out / "models" / CURRENT_FILE).write_text(version + "\n")
    return ExportReport(
        version, target, reused, feature_version, report.items, report.seconds, manifest
    )
