"""Photo queries: a shopper's JPEG or PNG -> its photo vector, through the export's own graphs
(image_encoder, then photo_head), so a photo lands in the space the photo index lives in
(models.photo_head: photos of the same type and colour lie close).

in:  the photo's bytes
out: float32 [photo_dims], unit length

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
MIN_SIDE = 16
MAX_PIXELS = 4096 * 4096
FORMATS = {"JPEG", "PNG"}
LOC = ["body", "image"]


class PhotoEncoder:
    def __init__(self, image_session, head_session) -> None:  # noqa: ANN001
        self._image = image_session
        self._head = head_session
        self.dims = int(head_session.get_outputs()[0].shape[1])

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
        head = open_session(
            manifest.path(version_dir, "photo_head"),
            inputs=["image_embedding"],
            outputs=["photo_vector"],
            **common,
        )
        return cls(image, head)

    def encode(self, data: bytes) -> np.ndarray:
        pixels = photo_pixels(data)[None]
        (embedding,) = self._image.run(["image_embedding"], {"pixels": pixels})
        (vector,) = self._head.run(["photo_vector"], {"image_embedding": embedding})
        return vector[0].astype(np.float32)


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
