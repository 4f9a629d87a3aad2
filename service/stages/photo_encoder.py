"""Photo queries: a shopper's JPEG or PNG -> the image part of an item vector, through the
export's own graphs (image_encoder, then item_encoder's image tower), so a photo lands in the
space the index and the stored item vectors live in.

in:  the photo's bytes
out: float32 [text_dims + image_dims], the text part zero (a photo says nothing of a title)

Decoding is defensive: only JPEG and PNG; the header's size is checked before any pixel is
decoded (a 20000 x 20000 PNG is refused, not inflated); truncated data, a photo under
MIN_SIDE pixels a side or over MAX_PIXELS are refused with RequestRejected naming ``image``.
``encode`` blocks (decoding, two onnxruntime runs): call it off the event loop.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from service.errors import RequestRejected
from service.manifest import Manifest
from service.stages.onnx_session import open_session

IMAGE_SIZE = 112  # the export's image_encoder input: photos padded to a white square
TEXT_DIMS = 384  # item_encoder's text_embedding input (MiniLM)
MIN_SIDE = 16
MAX_PIXELS = 4096 * 4096
FORMATS = {"JPEG", "PNG"}
LOC = ["body", "image"]


class PhotoEncoder:
    def __init__(self, image_session, item_session, text_dims: int) -> None:  # noqa: ANN001
        self._image = image_session
        self._item = item_session
        self._text_dims = text_dims
        self._image_dims = int(image_session.get_outputs()[0].shape[1])

    @classmethod
    def load(
        cls, version_dir: Path, manifest: Manifest, *, device: str, threads: int
    ) -> PhotoEncoder:
        common = {"device": device, "threads": threads}
        image = open_session(
            manifest.path(version_dir, "image_encoder"),
            inputs=["pixels"],
            outputs=["image_embedding"],
            **common,
        )
        item = open_session(
            manifest.path(version_dir, "item_encoder"),
            inputs=["text_embedding", "image_embedding"],
            outputs=["item_features"],
            **common,
        )
        return cls(image, item, manifest.layout.text_dims)

    def encode(self, data: bytes) -> np.ndarray:
        pixels = photo_pixels(data)[None]
        (embedding,) = self._image.run(["image_embedding"], {"pixels": pixels})
        (features,) = self._item.run(
            ["item_features"],
            {
                "text_embedding": np.zeros((1, TEXT_DIMS), dtype=np.float32),
                "image_embedding": embedding.astype(np.float32),
            },
        )
        vector = features[0].astype(np.float32)
        vector[: self._text_dims] = 0.0  # the tower's answer to "no title": not the photo's
        return vector


def photo_pixels(data: bytes) -> np.ndarray:
    """(3, IMAGE_SIZE, IMAGE_SIZE) float32 of a JPEG/PNG, as the export encoded item photos:
    padded to a white square, resized, (x - 127) / 128. RequestRejected when unusable.

    A copy of models.encoders.image_to_pixels (the online path never imports models/, which
    needs torch); tests/service/test_photo_encoder.py holds the two to identical output."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            photo = Image.open(io.BytesIO(data))  # reads the header only
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise RequestRejected(LOC, "image: not a readable JPEG or PNG photo") from None
    except OSError as exc:
        raise RequestRejected(LOC, f"image: the data is damaged ({exc})") from None
    with photo:
        if photo.format not in FORMATS:
            raise RequestRejected(LOC, f"image: a {photo.format} image; send a JPEG or PNG")
        width, height = photo.size
        if width * height > MAX_PIXELS:
            raise RequestRejected(
                LOC, f"image: {width} x {height} pixels, over the {MAX_PIXELS:,} accepted"
            )
        if min(width, height) < MIN_SIDE:
            raise RequestRejected(
                LOC, f"image: {width} x {height} pixels; at least {MIN_SIDE} a side"
            )
        try:
            photo.load()
            rgb = photo.convert("RGB")
        except (OSError, ValueError) as exc:  # truncated or corrupt data
            raise RequestRejected(LOC, f"image: the data is damaged ({exc})") from None
    side = max(rgb.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(rgb, ((side - rgb.size[0]) // 2, (side - rgb.size[1]) // 2))
    square = square.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    array = np.asarray(square, dtype=np.float32)
    return ((array - 127.0) / 128.0).transpose(2, 0, 1)
