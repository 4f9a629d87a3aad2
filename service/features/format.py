"""Binary format of one stored feature value, and the layout that describes it.

A value is an 8-byte header followed by the item's feature vector (text part, then image part)
as little-endian floats::

    struct "<2sBBHH": magic b"FR" | format version | dtype code | text_dims | image_dims

The header lets a reader reject a value written by another exporter version or layout instead
of silently ranking with garbage. Every value of a version has the same header, so a batch is
checked with one vectorised comparison of 8-byte words.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from service.errors import FeatureFormatError

MAGIC = b"FR"
FORMAT_VERSION = 1
HEADER = struct.Struct("<2sBBHH")
HEADER_SIZE = HEADER.size  # 8: read back as one little-endian uint64 per value
DTYPE_CODES = {"float16": 1, "float32": 2}
_MAX_DIMS = 0xFFFF  # text_dims and image_dims are stored as uint16


@dataclass(frozen=True)
class FeatureLayout:
    """Shape and dtype of one item's feature vector: text part then image part."""

    text_dims: int
    image_dims: int
    dtype: str = "float16"

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_CODES)}, got {self.dtype!r}")
        for name in ("text_dims", "image_dims"):
            value = getattr(self, name)
            if not 0 <= value <= _MAX_DIMS:
                raise ValueError(f"{name} must be in [0, {_MAX_DIMS}], got {value}")
        if self.dims == 0:
            raise ValueError("a layout needs at least one dimension")

    @property
    def dims(self) -> int:
        return self.text_dims + self.image_dims

    @property
    def numpy_dtype(self) -> np.dtype:
        """The little-endian numpy dtype of the payload."""
        return np.dtype(self.dtype).newbyteorder("<")

    @property
    def itemsize(self) -> int:
        return self.numpy_dtype.itemsize

    @property
    def value_bytes(self) -> int:
        """Size of one stored value: header plus payload."""
        return HEADER_SIZE + self.dims * self.itemsize

    @property
    def header(self) -> bytes:
        return HEADER.pack(
            MAGIC, FORMAT_VERSION, DTYPE_CODES[self.dtype], self.text_dims, self.image_dims
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FeatureLayout:
        return cls(
            text_dims=int(data["text_dims"]),
            image_dims=int(data["image_dims"]),
            dtype=str(data.get("dtype", "float16")),
        )


def encode_matrix(layout: FeatureLayout, matrix: np.ndarray) -> list[bytes]:
    """Encode each row of ``matrix`` (n, dims) as one stored value (header + payload)."""
    if matrix.ndim != 2 or matrix.shape[1] != layout.dims:
        raise ValueError(f"matrix shape {matrix.shape} does not match {layout.dims} dims")
    n = matrix.shape[0]
    out = np.empty((n, layout.value_bytes), dtype=np.uint8)
    out[:, :HEADER_SIZE] = np.frombuffer(layout.header, dtype=np.uint8)
    payload = np.ascontiguousarray(matrix, dtype=layout.numpy_dtype)
    out[:, HEADER_SIZE:] = payload.view(np.uint8).reshape(n, -1)
    blob = out.tobytes()
    size = layout.value_bytes
    return [blob[i * size : (i + 1) * size] for i in range(n)]


def decode_values(layout: FeatureLayout, values: Sequence[bytes], ids: Sequence[str]) -> np.ndarray:
    """Decode stored values into one (n, dims) array in the layout dtype.

    ``ids[i]`` names ``values[i]`` in error messages. Raises FeatureFormatError for the first
    value whose header or length is wrong.
    """
    if len(values) != len(ids):
        raise ValueError(f"{len(values)} values but {len(ids)} ids")
    matrix, readable = decode_readable(layout, values)
    if not readable.all():
        position = int(np.flatnonzero(~readable)[0])
        raise FeatureFormatError(
            f"feature value of id {ids[position]!r}: {diagnose(layout, values[position])}"
        )
    return matrix


def decode_readable(
    layout: FeatureLayout, values: Sequence[bytes]
) -> tuple[np.ndarray, np.ndarray]:
    """(the readable values decoded as one (n_readable, dims) array, a bool mask over
    ``values`` of those readable): a value with a wrong length or header is left out, so one
    damaged item costs that item, not the whole batch."""
    size = layout.value_bytes
    if set(map(len, values)) - {size}:
        readable = np.fromiter((len(v) == size for v in values), dtype=bool, count=len(values))
        kept = [v for v, ok in zip(values, readable.tolist(), strict=True) if ok]
    else:  # the usual case: nothing to filter
        readable, kept = np.ones(len(values), dtype=bool), values
    # All kept lengths are right, so the joined values are an array of (header, payload)
    # records and every header is checked in one vectorised comparison.
    records = np.frombuffer(b"".join(kept), dtype=_record_dtype(layout))
    good_header = records["header"] == np.frombuffer(layout.header, dtype="<u8")[0]
    if not good_header.all():
        readable[np.flatnonzero(readable)[~good_header]] = False
        records = records[good_header]
    return np.ascontiguousarray(records["payload"]), readable  # a copy: writable, no headers


@lru_cache(maxsize=8)
def _record_dtype(layout: FeatureLayout) -> np.dtype:
    return np.dtype([("header", "<u8"), ("payload", layout.numpy_dtype, (layout.dims,))])


def diagnose(layout: FeatureLayout, value: bytes) -> str:
    """Say what is wrong with a value that failed the fast check."""
    if len(value) < HEADER_SIZE:
        return f"wrong length: {len(value)} bytes, expected {layout.value_bytes}"
    magic, version, dtype_code, text_dims, image_dims = HEADER.unpack_from(value)
    if magic != MAGIC:
        return f"bad magic {magic!r}, expected {MAGIC!r}"
    if version != FORMAT_VERSION:
        return f"wrong format version {version}, expected {FORMAT_VERSION}"
    if dtype_code != DTYPE_CODES[layout.dtype]:
        return f"dtype mismatch: code {dtype_code}, expected {DTYPE_CODES[layout.dtype]}"
    if (text_dims, image_dims) != (layout.text_dims, layout.image_dims):
        return (
            f"dims mismatch: text+image = {text_dims}+{image_dims}, "
            f"expected {layout.text_dims}+{layout.image_dims}"
        )
    return f"wrong length: {len(value)} bytes, expected {layout.value_bytes}"
