"""The service decodes a photo query as the exporter decoded the item photos: the service's
copy of the preprocessing (it cannot import models/, which needs torch) must agree with
models.encoders.image_to_pixels exactly, or photo vectors would drift from item vectors."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
from PIL import Image

from models.catalogue import images_path
from models.encoders import image_to_pixels
from service.errors import RequestRejected
from service.stages.photo_encoder import photo_pixels
from tests.conftest import SAMPLE


def sample_photos(count: int) -> list[bytes]:
    with zipfile.ZipFile(images_path(SAMPLE)) as archive:
        names = sorted(n for n in archive.namelist() if n.endswith(".jpg"))[:count]
        return [archive.read(name) for name in names]


def test_the_service_preprocesses_a_photo_exactly_as_the_exporter() -> None:
    for data in sample_photos(5):
        expected = image_to_pixels(Image.open(io.BytesIO(data)).convert("RGB"))
        np.testing.assert_array_equal(photo_pixels(data), expected)


def test_a_png_with_transparency_is_accepted_and_a_gif_is_not() -> None:
    out = io.BytesIO()
    Image.new("RGBA", (40, 60), (255, 0, 0, 128)).save(out, format="PNG")
    assert photo_pixels(out.getvalue()).shape == (3, 112, 112)
    gif = io.BytesIO()
    Image.new("RGB", (40, 60)).save(gif, format="GIF")
    with pytest.raises(RequestRejected, match="JPEG or PNG") as refused:
        photo_pixels(gif.getvalue())
    assert refused.value.loc == ["body", "image"]
