"""Unit tests of the stored feature value format (service/features/format.py)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from service.errors import FeatureFormatError
from service.features.format import HEADER, FeatureLayout, decode_values, encode_matrix

LAYOUT = FeatureLayout(text_dims=6, image_dims=3)


def test_header_round_trip() -> None:
    assert HEADER.size == 8
    assert HEADER.unpack(LAYOUT.header) == (b"FR", 1, 1, 6, 3)
    assert HEADER.unpack(FeatureLayout(300, 1000, "float32").header) == (b"FR", 1, 2, 300, 1000)
    assert FeatureLayout.from_dict(LAYOUT.to_dict()) == LAYOUT
    assert (LAYOUT.dims, LAYOUT.itemsize, LAYOUT.value_bytes) == (9, 2, 8 + 9 * 2)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_encode_decode_round_trip(dtype: str) -> None:
    layout = FeatureLayout(6, 3, dtype)
    matrix = np.random.default_rng(0).standard_normal((5, layout.dims)).astype(np.float32)
    values = encode_matrix(layout, matrix)

    assert len(values) == 5 and all(len(value) == layout.value_bytes for value in values)
    assert all(value.startswith(layout.header) for value in values)
    decoded = decode_values(layout, values, [f"id{i}" for i in range(5)])
    assert decoded.dtype == np.dtype(dtype) and decoded.flags.writeable
    np.testing.assert_array_equal(decoded, matrix.astype(dtype))
    assert decode_values(layout, [], []).shape == (0, layout.dims)


def _with_header(**fields: int | bytes) -> Callable[[bytes], bytes]:
    """Rewrite header fields of a value, keeping its payload."""

    def rewrite(value: bytes) -> bytes:
        names = ("magic", "version", "dtype", "text", "image")
        header = dict(zip(names, HEADER.unpack(value[:8]), strict=True))
        header.update(fields)
        return HEADER.pack(*header.values()) + value[8:]

    return rewrite


@pytest.mark.parametrize(
    ("corrupt", "reason"),
    [
        (_with_header(magic=b"XX"), "bad magic"),
        (_with_header(version=2), "wrong format version"),
        (_with_header(dtype=2), "dtype mismatch"),
        (_with_header(text=5, image=4), "dims mismatch"),
        (lambda value: value[:-2], "wrong length"),
        (lambda value: value + b"\0\0", "wrong length"),
        (lambda value: value[:5], "wrong length"),
        (lambda value: b"", "wrong length"),
    ],
    ids=["magic", "version", "dtype", "dims", "short", "long", "partial-header", "empty"],
)
def test_decode_rejects_bad_values_naming_the_id(
    corrupt: Callable[[bytes], bytes], reason: str
) -> None:
    values = encode_matrix(LAYOUT, np.ones((4, LAYOUT.dims), np.float32))
    values[2] = corrupt(values[2])
    with pytest.raises(FeatureFormatError, match=rf"'id-2'.*{reason}"):
        decode_values(LAYOUT, values, ["id-0", "id-1", "id-2", "id-3"])


def test_invalid_layouts_and_shapes_are_rejected() -> None:
    with pytest.raises(ValueError, match="dtype"):
        FeatureLayout(4, 4, "int8")
    with pytest.raises(ValueError, match="text_dims"):
        FeatureLayout(70_000, 4)
    with pytest.raises(ValueError, match="shape"):
        encode_matrix(LAYOUT, np.zeros((2, LAYOUT.dims + 1)))
