"""Opening onnxruntime sessions: threads, optimisation level and execution provider.

in:  an .onnx path, the device setting (auto | cpu | cuda), intra-op threads
out: an ``onnxruntime.InferenceSession`` whose input/output names were checked

CUDA is used when settings allow it and ``CUDAExecutionProvider`` is available (onnxruntime-gpu
installed), and only counts once ``session.get_providers()`` confirms it: onnxruntime falls back
to CPU silently when CUDA cannot start.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

import onnxruntime as ort

from service.errors import ArtifactError, DeviceUnavailable

CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"

log = logging.getLogger(__name__)


def wants_cuda(device: str) -> bool:
    """Whether to ask for CUDA: allowed by ``device`` and offered by this onnxruntime build."""
    if device == "cpu":
        return False
    available = CUDA in ort.get_available_providers()
    if device == "cuda" and not available:
        raise DeviceUnavailable(
            "FUSIONRANK_DEVICE=cuda but this onnxruntime has no CUDAExecutionProvider "
            "(install the gpu extra: pip install .[gpu])"
        )
    return available


def open_session(
    path: Path,
    *,
    device: str,
    threads: int,
    inputs: Iterable[str],
    outputs: Iterable[str],
) -> ort.InferenceSession:
    """A session of ``path`` that has at least the named inputs and outputs."""
    if not path.is_file():
        raise ArtifactError(f"{path}: no such model file")
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only; the CUDA fallback is checked below
    cuda = wants_cuda(device)
    providers = [CUDA, CPU] if cuda else [CPU]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own pybind classes for bad files
        raise ArtifactError(f"{path}: onnxruntime cannot load it: {exc}") from exc
    if cuda and session.get_providers()[0] != CUDA:
        if device == "cuda":
            raise DeviceUnavailable(f"{path}: CUDA was asked for but onnxruntime fell back to CPU")
        log.warning("%s: CUDA is offered but did not start; running on CPU", path.name)
    _check_names(path, "input", {i.name for i in session.get_inputs()}, inputs)
    _check_names(path, "output", {o.name for o in session.get_outputs()}, outputs)
    return session


def provider_of(session: ort.InferenceSession) -> str:
    """The execution provider that runs the session's nodes first: CUDA or CPU."""
    return session.get_providers()[0]


def _check_names(path: Path, kind: str, have: set[str], need: Iterable[str]) -> None:
    missing = sorted(set(need) - have)
    if missing:
        raise ArtifactError(f"{path}: graph lacks {kind}s {missing} (has {sorted(have)})")
