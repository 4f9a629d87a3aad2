"""PyTorch -> ONNX for every graph the service and the publisher run, each checked for parity
against PyTorch on real catalogue inputs. An export whose difference exceeds its tolerance
fails with the figures; the measured differences go into the manifest.
"""

from __future__ import annotations

import copy
import logging
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from torch import nn

from models.encoders import IMAGE_DIMS, IMAGE_SIZE, TEXT_DIMS, ImageEncoder, TextEncoder
from models.photo_head import PhotoHead
from models.ranker import FusedRanker, ItemEncoderHead, OnlineScorer
from service.errors import ExportParityError
from service.manifest import GraphSpec, TensorSpec

OPSET = 18
# Max abs difference allowed against PyTorch. float32 graphs differ only by kernel order
# (measured ~1e-6); the float16 ranker by half-precision rounding of its activations.
FP32_TOLERANCE = 1e-4
CONV_TOLERANCE = 1e-3  # 16 conv blocks, outputs up to ~20 in magnitude: measured ~4e-5
FP16_TOLERANCE = 5e-2
# The int8 query encoder against float32 PyTorch: MiniLM's weights rounded to 8 bits per output
# channel (measured ~3e-2 on unit-length embeddings, cosine >= 0.98). What that costs in
# ranking quality is measured by `python -m models precision-cost`.
INT8_TOLERANCE = 1e-1
INT8_SUFFIX = "_int8"


class QueryEncoderGraph(nn.Module):
    """Token ids -> normalised MiniLM embedding and the ranker's retrieval query vector."""

    def __init__(self, text: TextEncoder, ranker: FusedRanker):
        super().__init__()
        self.text, self.ranker = text, ranker

    def forward(self, input_ids, attention_mask):
        embedding = self.text(input_ids, attention_mask)
        return embedding, self.ranker.retrieval_vector(embedding)


class HalfPrecisionScorer(nn.Module):
    """The scoring graph computed in float16 (for GPUs), with the float32 interface kept."""

    def __init__(self, ranker: FusedRanker):
        super().__init__()
        # A copy: .half() converts parameters in place, and the float32 graphs share `ranker`.
        self.scorer = OnlineScorer(copy.deepcopy(ranker)).half()

    def forward(self, query_embedding, item_features, query_index):
        ranker = self.scorer.ranker
        outputs = ranker.score(query_embedding.half(), item_features.half(), query_index)
        return tuple(o.float() for o in outputs)


@dataclass(frozen=True)
class GraphDef:
    name: str
    module: nn.Module
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]
    tolerance: float
    reference: nn.Module | None = None  # what parity compares against; default: module itself
    int8_variant: bool = False  # also write <name>_int8: weights quantised, for CPU serving


def _spec(name: str, dtype: str, *shape: int | str) -> TensorSpec:
    return TensorSpec(name=name, dtype=dtype, shape=list(shape))


def graph_defs(
    ranker: FusedRanker, text: TextEncoder, image: ImageEncoder, photo: PhotoHead
) -> list[GraphDef]:
    f = ranker.config.text_dims + ranker.config.image_dims
    scorer_io = (
        [
            _spec("query_embedding", "float32", "queries", TEXT_DIMS),
            _spec("item_features", "float16", "candidates", f),
            _spec("query_index", "int64", "candidates"),
        ],
        [
            _spec("score", "float32", "candidates"),
            _spec("text_contribution", "float32", "candidates"),
            _spec("image_contribution", "float32", "candidates"),
        ],
    )
    return [
        GraphDef(
            "query_encoder",
            QueryEncoderGraph(text, ranker),
            [
                _spec("input_ids", "int64", "batch", "tokens"),
                _spec("attention_mask", "int64", "batch", "tokens"),
            ],
            [
                _spec("query_embedding", "float32", "batch", TEXT_DIMS),
                _spec("retrieval_vector", "float32", "batch", f),
            ],
            FP32_TOLERANCE,
            # A cache miss on the request path runs the whole transformer: int8 weights make
            # it ~3x cheaper on CPU (5 -> 1.6 ms a query measured here).
            int8_variant=True,
        ),
        GraphDef("ranker", OnlineScorer(ranker), *scorer_io, FP32_TOLERANCE),
        # Compared with the float32 PyTorch scorer: the tolerance covers half precision itself.
        GraphDef(
            "ranker_fp16",
            HalfPrecisionScorer(ranker),
            *scorer_io,
            FP16_TOLERANCE,
            reference=OnlineScorer(ranker),
        ),
        GraphDef(
            "image_encoder",
            image,
            [_spec("pixels", "float32", "batch", 3, IMAGE_SIZE, IMAGE_SIZE)],
            [_spec("image_embedding", "float32", "batch", IMAGE_DIMS)],
            CONV_TOLERANCE,
        ),
        GraphDef(
            "item_encoder",
            ItemEncoderHead(ranker),
            [
                _spec("text_embedding", "float32", "batch", TEXT_DIMS),
                _spec("image_embedding", "float32", "batch", IMAGE_DIMS),
            ],
            [_spec("item_features", "float32", "batch", f)],
            FP32_TOLERANCE,
        ),
        GraphDef(
            "photo_head",
            photo,
            [_spec("image_embedding", "float32", "batch", IMAGE_DIMS)],
            [_spec("photo_vector", "float32", "batch", photo.config.photo_dims)],
            FP32_TOLERANCE,
        ),
    ]


def export_graph(graph: GraphDef, sample_inputs: dict[str, np.ndarray], path: Path) -> None:
    """Export with every string-named axis dynamic."""
    dims: dict[str, torch.export.Dim] = {}
    dynamic_shapes = {}
    for spec in graph.inputs:
        axes = {}
        for axis, size in enumerate(spec.shape):
            if isinstance(size, str):
                axes[axis] = dims.setdefault(size, torch.export.Dim(size, min=1, max=65536))
        dynamic_shapes[spec.name] = axes
    args = tuple(torch.from_numpy(sample_inputs[spec.name]) for spec in graph.inputs)
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph.module.eval(),
            args,
            str(path),
            input_names=[s.name for s in graph.inputs],
            output_names=[s.name for s in graph.outputs],
            dynamic_shapes=dynamic_shapes,
            opset_version=OPSET,
            external_data=False,
            dynamo=True,
            optimize=True,
            verbose=False,
        )


def quantize_int8(source: Path, target: Path) -> None:
    """Dynamic int8 quantisation (onnxruntime.quantization): weights stored as int8 with one
    scale per output channel, activations quantised on the fly; per-tensor scales measured
    far worse here (cosine 0.93 against float32)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # it logs advice to pre-process on the root logger
    try:
        quantize_dynamic(source, target, weight_type=QuantType.QInt8, per_channel=True)
    finally:
        root.setLevel(level)


def parity(graph: GraphDef, path: Path, inputs: dict[str, np.ndarray]) -> float:
    """Max abs difference between onnxruntime (CPU) and PyTorch on the same inputs."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, inputs)
    with torch.no_grad():
        reference = graph.reference or graph.module
        expected = reference(*(torch.from_numpy(inputs[s.name]) for s in graph.inputs))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    return max(
        float(np.abs(g - e.float().numpy()).max()) for g, e in zip(got, expected, strict=True)
    )


def export_all(
    graphs: list[GraphDef],
    inputs_for: Callable[[str], tuple[dict[str, np.ndarray], dict[str, np.ndarray]]],
    out_dir: Path,
    *,
    log: Callable[[str], None] = print,
) -> dict[str, GraphSpec]:
    """Export each graph with small trace inputs, then check parity on real inputs of another
    size (which also proves the dynamic axes work)."""
    specs: dict[str, GraphSpec] = {}
    for graph in graphs:
        trace_inputs, check_inputs = inputs_for(graph.name)
        path = out_dir / f"{graph.name}.onnx"
        export_graph(graph, trace_inputs, path)
        specs[graph.name] = _checked(graph, graph.name, path, check_inputs, graph.tolerance, log)
        if graph.int8_variant:
            name = graph.name + INT8_SUFFIX
            quantized = out_dir / f"{name}.onnx"
            quantize_int8(path, quantized)
            specs[name] = _checked(graph, name, quantized, check_inputs, INT8_TOLERANCE, log)
    return specs


def _checked(
    graph: GraphDef,
    name: str,
    path: Path,
    inputs: dict[str, np.ndarray],
    tolerance: float,
    log: Callable[[str], None],
) -> GraphSpec:
    """The spec of ``path`` once its parity with ``graph``'s PyTorch module is in tolerance."""
    diff = parity(graph, path, inputs)
    log(f"  {name:19s} parity max|onnx - torch| = {diff:.2e} (limit {tolerance:.0e})")
    if not diff <= tolerance:
        raise ExportParityError(
            f"{path.name}: max abs difference {diff:.3e} against PyTorch "
            f"exceeds the tolerance {tolerance:.1e}"
        )
    return GraphSpec(
        file=path.name,
        inputs=graph.inputs,
        outputs=graph.outputs,
        parity_max_abs_diff=diff,
        parity_tolerance=tolerance,
    )
