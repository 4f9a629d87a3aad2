"""The model manifest: the contract between the offline exporter (writes it) and the service
(reads it). One directory per model version:

    artifacts/models/<version>/
        manifest.json          this file's schema
        query_encoder.onnx     input_ids, attention_mask (int64 [batch, tokens])
                               -> query_embedding (float32 [batch, 384], L2-normalised MiniLM)
                               -> retrieval_vector (float32 [batch, text_dims + image_dims])
        query_encoder_int8.onnx  the same with int8 weights (for CPUs; optional)
        ranker.onnx            query_embedding (float32 [queries, 384]),
                               item_features (float16 [candidates, text_dims + image_dims]),
                               query_index (int64 [candidates]: row of query_embedding)
                               -> score, text_contribution, image_contribution
                                  (float32 [candidates])
        ranker_fp16.onnx       the same, computed in float16 (for GPUs)
        image_encoder.onnx     pixels (float32 [batch, 3, 112, 112]) -> image_embedding
        item_encoder.onnx      text_embedding, image_embedding -> item_features
        photo_head.onnx        image_embedding -> photo_vector (float32 [batch, 128], unit
                               length: photos of the same type and colour lie close)
        tokenizer.json         the MiniLM tokenizer
        index.faiss            FAISS inner-product index over item_features (as float32), or
        index.NNN-of-MMM.faiss its shards (a sharded export: IndexSpec.shards)
        index_ids.json         FAISS row -> product id
        photo_index.faiss      exact inner-product index over the items' photo vectors, rows
                               in index_ids.json's order (search by photo)
        attributes/            the indexed items' attributes (export.attributes)

The version is a hash of the exported content, so two exports of the same weights agree.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict

from service.errors import ArtifactError
from service.features.format import FeatureLayout

MANIFEST_FILE = "manifest.json"
CURRENT_FILE = "CURRENT"  # in artifacts/models/: the version `make serve` starts with


class TensorSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str
    dtype: str
    shape: list[int | str]


class GraphSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    parity_max_abs_diff: float | None = None
    parity_tolerance: float | None = None


class IndexSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    file: str
    """The index; not on disk when ``shards`` lists files."""
    ids_file: str
    factory: str
    metric: str
    dims: int
    items: int
    recall_at_100: float | None = None
    build_seconds: float | None = None
    shards: list[str] = []
    """A sharded index: shard i holds the next block of rows of ids_file; searched as one
    (faiss.IndexShards, results merged by score)."""


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    version: str
    strategy: str
    created: str
    opset: int
    source_checkpoint_sha256: str
    catalogue_fingerprint: str
    feature_layout: dict[str, Any]
    features_version: str
    tokenizer_file: str
    max_tokens: int
    graphs: dict[str, GraphSpec]
    index: IndexSpec
    photo_index: IndexSpec
    metrics: dict[str, Any]

    @property
    def layout(self) -> FeatureLayout:
        return FeatureLayout.from_dict(self.feature_layout)

    def path(self, root: Path, name: str) -> Path:
        return root / self.graphs[name].file


def load_manifest(version_dir: Path) -> Manifest:
    path = Path(version_dir) / MANIFEST_FILE
    try:
        return Manifest.model_validate_json(path.read_bytes())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no model manifest (run `make artifacts` first)") from exc
    except ValueError as exc:
        raise ArtifactError(f"{path}: invalid manifest: {exc}") from exc


def resolve_version_dir(models_dir: Path, version: str | None = None) -> Path:
    """The directory of `version`, or of the version named in models_dir/CURRENT."""
    models_dir = Path(models_dir)
    if version is None:
        try:
            version = (models_dir / CURRENT_FILE).read_text().strip()
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{models_dir / CURRENT_FILE}: no current model (run `make artifacts`)"
            ) from exc
    path = models_dir / version
    if not (path / MANIFEST_FILE).is_file():
        raise ArtifactError(f"{path}: no such model version")
    return path


def write_manifest(version_dir: Path, manifest: Manifest) -> None:
    (Path(version_dir) / MANIFEST_FILE).write_text(json.dumps(manifest.model_dump(), indent=2))
