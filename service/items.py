"""Item display data (titles, attributes, photos) the exporter writes beside the models, for
the search page and ``GET /items/{id}``; see export.items for how it is made.

    <artifacts>/items/<catalogue fingerprint>/items.json, images.zip

The served model's manifest names its catalogue (``catalogue_fingerprint``), which names the
directory: no manifest field is needed, so artifacts exported before it existed stay valid.
"""

from __future__ import annotations

import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from service.errors import ArtifactError

ITEMS_DIR = "items"
ITEMS_FILE = "items.json"
IMAGES_FILE = "images.zip"


def items_dir(artifacts_dir: Path, catalogue_fingerprint: str) -> Path:
    return Path(artifacts_dir) / ITEMS_DIR / catalogue_fingerprint


@dataclass(frozen=True, slots=True)
class Photo:
    data: bytes
    etag: str  # quoted, from the member's CRC-32 and size: changes when the photo does


class ItemCatalogue:
    """Titles and attributes in memory; photos read from the stored zip on demand."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        items_path, images_path = self.directory / ITEMS_FILE, self.directory / IMAGES_FILE
        try:
            body = orjson.loads(items_path.read_bytes())
            self.fingerprint: str = body["catalogue_fingerprint"]
            self._items: dict[str, dict[str, Any]] = body["items"]
        except FileNotFoundError as exc:
            raise ArtifactError(
                f"{items_path}: no item data for the served catalogue (run `make artifacts`)"
            ) from exc
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise ArtifactError(f"{items_path}: invalid item data: {exc!r}") from exc
        try:
            self._zip = zipfile.ZipFile(images_path)
        except (OSError, zipfile.BadZipFile) as exc:
            raise ArtifactError(f"{images_path}: cannot open the item photos: {exc}") from exc
        self._lock = threading.Lock()

    @classmethod
    def open(cls, artifacts_dir: Path, catalogue_fingerprint: str) -> ItemCatalogue:
        return cls(items_dir(artifacts_dir, catalogue_fingerprint))

    def __len__(self) -> int:
        return len(self._items)

    def item(self, item_id: str) -> dict[str, Any] | None:
        """``{"title", "attributes"}`` of the item, or None for an unknown id."""
        return self._items.get(item_id)

    def photo(self, item_id: str) -> Photo | None:
        """The item's JPEG, or None when the id has none."""
        if item_id not in self._items:
            return None
        try:
            info = self._zip.getinfo(f"{item_id}.jpg")
        except KeyError:
            return None
        with self._lock:
            data = self._zip.read(info)
        return Photo(data, f'"{info.CRC:08x}-{info.file_size:x}"')

    def close(self) -> None:
        with self._lock:
            self._zip.close()
