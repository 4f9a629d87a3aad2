"""Query text -> MiniLM query embedding and retrieval vector, with an LRU cache.

in:  query: str
out: EncodedQuery(embedding float32 [384], retrieval_vector float32 [text_dims + image_dims])

Tokenisation never pads (the bundled tokenizer.json pads to 128 tokens, 7x the work of a short
query) and truncates to the manifest's max_tokens. On CPU the int8 graph is used when the export
has one and settings allow it: ~3x cheaper per cache miss, at the ranking cost that
``python -m models precision-cost`` measures. ``lookup`` is the cheap cache probe the
event loop may call; ``encode`` runs the model and belongs on a worker thread.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

from service.errors import ArtifactError
from service.manifest import Manifest
from service.stages.onnx_session import open_session, wants_cuda

GRAPH = "query_encoder"
GRAPH_INT8 = "query_encoder_int8"
INPUTS = ("input_ids", "attention_mask")
OUTPUTS = ("query_embedding", "retrieval_vector")


@dataclass(frozen=True)
class EncodedQuery:
    embedding: np.ndarray  # float32 [384], read-only
    retrieval_vector: np.ndarray  # float32 [text_dims + image_dims], read-only


class LRUCache:
    """A thread-safe least-recently-used map; capacity 0 keeps nothing."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._items: OrderedDict[str, EncodedQuery] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> EncodedQuery | None:
        with self._lock:
            value = self._items.get(key)
            if value is not None:
                self._items.move_to_end(key)
            return value

    def put(self, key: str, value: EncodedQuery) -> None:
        if self._capacity == 0:
            return
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._capacity:
                self._items.popitem(last=False)


class QueryEncoder:
    def __init__(
        self, session: ort.InferenceSession, tokenizer: Tokenizer, cache_size: int, graph: str
    ) -> None:
        self.graph = graph
        self._session = session
        self._tokenizer = tokenizer
        self._cache = LRUCache(cache_size)
        self._token_type_ids = "token_type_ids" in {i.name for i in session.get_inputs()}

    @classmethod
    def load(
        cls,
        version_dir: Path,
        manifest: Manifest,
        *,
        device: str,
        threads: int,
        cache_size: int,
        int8: bool = True,
    ) -> QueryEncoder:
        if GRAPH not in manifest.graphs:
            raise ArtifactError(f"{version_dir}: manifest has no {GRAPH!r} graph")
        # int8 kernels are a CPU speed-up; on CUDA the float32 graph is the fast one.
        use_int8 = int8 and GRAPH_INT8 in manifest.graphs and not wants_cuda(device)
        graph = GRAPH_INT8 if use_int8 else GRAPH
        session = open_session(
            manifest.path(version_dir, graph),
            device=device,
            threads=threads,
            inputs=INPUTS,
            outputs=OUTPUTS,
        )
        path = version_dir / manifest.tokenizer_file
        try:
            tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises bare Exceptions for missing/bad files
            raise ArtifactError(f"{path}: cannot load the tokenizer: {exc}") from exc
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=manifest.max_tokens)
        return cls(session, tokenizer, cache_size, graph)

    def lookup(self, query: str) -> EncodedQuery | None:
        """The cached encoding of ``query``, if it is recent; cheap enough for the event loop."""
        return self._cache.get(query)

    def encode(self, query: str) -> EncodedQuery:
        """Encode ``query`` (blocking: several ms on a cache miss) and cache the result."""
        cached = self._cache.get(query)
        if cached is not None:
            return cached
        ids = np.asarray([self._tokenizer.encode(query).ids], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        if self._token_type_ids:
            feeds["token_type_ids"] = np.zeros_like(ids)
        embedding, retrieval = self._session.run(list(OUTPUTS), feeds)
        encoded = EncodedQuery(_frozen(embedding[0]), _frozen(retrieval[0]))
        self._cache.put(query, encoded)
        return encoded


def _frozen(row: np.ndarray) -> np.ndarray:
    row = np.ascontiguousarray(row, dtype=np.float32)
    row.flags.writeable = False
    return row
