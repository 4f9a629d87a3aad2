"""The product catalogue: `products.csv` plus photos in `images_60x80.zip` (and optionally
`images_hires.zip`), in the layout of the Myntra fashion data set (see data/sample/README.md).
A sample cut from it (models.sample, the repo's data/sample) keeps its photos in
`sample_photos_60x80.zip`, so that the small archive is never mistaken for the full one.

Loading validates the structure up front and fails with a `CatalogueError` that names the file
and the row, so a malformed catalogue never gets as far as training.
"""

from __future__ import annotations

import csv
import hashlib
import io
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from service.errors import CatalogueError

PRODUCTS_FILE = "products.csv"
IMAGES_FILE = "images_60x80.zip"
SAMPLE_IMAGES_FILE = "sample_photos_60x80.zip"
HIRES_FILE = "images_hires.zip"

REQUIRED_COLUMNS = (
    "id",
    "gender",
    "masterCategory",
    "subCategory",
    "articleType",
    "baseColour",
    "usage",
    "productDisplayName",
)


# The catalogue's attribute columns (also the API's names for them) -> the Product field.
ATTRIBUTE_FIELDS = {
    "gender": "gender",
    "masterCategory": "master_category",
    "subCategory": "sub_category",
    "articleType": "article_type",
    "baseColour": "colour",
    "season": "season",
    "usage": "usage",
}


@dataclass(frozen=True, slots=True)
class Product:
    id: str
    title: str
    gender: str
    master_category: str
    sub_category: str
    article_type: str
    colour: str
    usage: str
    season: str
    image_dup_group: str
    year: int | None = None

    @property
    def group(self) -> str:
        """Split key: products sharing a byte-identical photo stay on one side of a split."""
        return self.image_dup_group or self.id


class Catalogue:
    """Products in file order, with lazy access to their photos."""

    def __init__(
        self,
        root: Path,
        products: list[Product],
        image_names: frozenset[str],
        images_path: Path,
    ):
        self.root = root
        self.images_path = images_path
        self.products = products
        self._image_names = image_names
        self._zip: zipfile.ZipFile | None = None
        self.by_id = {p.id: i for i, p in enumerate(products)}

    def __len__(self) -> int:
        return len(self.products)

    def __iter__(self) -> Iterator[Product]:
        return iter(self.products)

    def has_image(self, product_id: str) -> bool:
        return f"{product_id}.jpg" in self._image_names

    def image_bytes(self, product_id: str) -> bytes:
        """The product's 60x80 JPEG. Raises CatalogueError when it is absent."""
        name = f"{product_id}.jpg"
        if name not in self._image_names:
            raise CatalogueError(f"{self.images_path}: no image {name} for product {product_id}")
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.images_path)
        return self._zip.read(name)

    def load_image(self, product_id: str):  # -> PIL.Image.Image (Pillow is an offline dependency)
        """Decode the photo as RGB; a corrupt JPEG raises CatalogueError naming file and entry."""
        from PIL import Image, UnidentifiedImageError

        data = self.image_bytes(product_id)
        try:
            image = Image.open(io.BytesIO(data))
            return image.convert("RGB")
        except (UnidentifiedImageError, OSError) as exc:
            raise CatalogueError(
                f"{self.images_path}: entry {product_id}.jpg (product {product_id}) "
                f"is not a readable image: {exc}"
            ) from exc

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of products.csv and the image archive: the key of every cache built
        from this catalogue, so a changed catalogue never reuses stale embeddings."""
        digest = hashlib.sha256()
        for path in (self.root / PRODUCTS_FILE, self.images_path):
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
        return digest.hexdigest()[:16]

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None


def images_path(root: Path) -> Path:
    """The photo archive of catalogue ``root``: the full layout's name, else a sample's; the
    full name when neither exists (what a missing-file error should name)."""
    for name in (IMAGES_FILE, SAMPLE_IMAGES_FILE):
        if (root / name).is_file():
            return root / name
    return root / IMAGES_FILE


def load_catalogue(root: str | Path, *, require_images: bool = True) -> Catalogue:
    """Read and validate a catalogue directory.

    Products without a photo are dropped when `require_images` is set (the ranker needs both
    modalities); every row is checked for an id and a title.
    """
    root = Path(root)
    products_path = root / PRODUCTS_FILE
    archive_path = images_path(root)
    if not products_path.is_file():
        raise CatalogueError(f"{products_path}: file not found (expected a catalogue directory)")
    if not archive_path.is_file():
        raise CatalogueError(f"{archive_path}: file not found")
    try:
        with zipfile.ZipFile(archive_path) as archive:
            image_names = frozenset(archive.namelist())
    except zipfile.BadZipFile as exc:
        raise CatalogueError(f"{archive_path}: not a zip archive ({exc})") from exc

    products: list[Product] = []
    seen: set[str] = set()
    with open(products_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise CatalogueError(
                f"{products_path}: header lacks required column(s) {', '.join(missing)}"
            )
        for line, row in enumerate(reader, start=2):  # line 1 is the header
            pid = (row["id"] or "").strip()
            title = (row["productDisplayName"] or "").strip()
            if not pid or not title:
                field = "id" if not pid else "productDisplayName"
                raise CatalogueError(f"{products_path}: row {line} has an empty {field}")
            if pid in seen:
                raise CatalogueError(f"{products_path}: row {line} repeats id {pid}")
            seen.add(pid)
            if require_images and f"{pid}.jpg" not in image_names:
                continue
            products.append(
                Product(
                    id=pid,
                    title=title,
                    gender=row["gender"].strip(),
                    master_category=row["masterCategory"].strip(),
                    sub_category=row["subCategory"].strip(),
                    article_type=row["articleType"].strip(),
                    colour=row["baseColour"].strip(),
                    usage=row["usage"].strip(),
                    season=(row.get("season") or "").strip(),
                    image_dup_group=(row.get("image_dup_group") or "").strip(),
                    year=_year(row.get("year"), products_path, line),
                )
            )
    if not products:
        raise CatalogueError(f"{products_path}: no products with images")
    return Catalogue(root, products, image_names, archive_path)


def _year(raw: str | None, path: Path, line: int) -> int | None:
    """The optional year column: empty is unknown; anything else must be a whole year."""
    text = (raw or "").strip()
    if not text:
        return None
    try:
        year = float(text)
    except ValueError:
        raise CatalogueError(f"{path}: row {line} has year {text!r}, not a number") from None
    if not year.is_integer() or not 1900 <= year <= 2100:
        raise CatalogueError(f"{path}: row {line} has year {text!r}, not a year")
    return int(year)
