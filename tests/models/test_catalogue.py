import csv
import shutil
import zipfile
from pathlib import Path

import pytest

from models.catalogue import IMAGES_FILE, PRODUCTS_FILE, images_path, load_catalogue
from service.errors import CatalogueError

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def small_catalogue(tmp_path: Path, rows: int = 5) -> tuple[Path, list[dict]]:
    with open(SAMPLE / PRODUCTS_FILE, newline="") as f:
        reader = csv.DictReader(f)
        fields, kept = reader.fieldnames, [next(reader) for _ in range(rows)]
    with open(tmp_path / PRODUCTS_FILE, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    with (
        zipfile.ZipFile(images_path(SAMPLE)) as src,
        zipfile.ZipFile(tmp_path / IMAGES_FILE, "w") as dst,
    ):
        for row in kept:
            dst.writestr(f"{row['id']}.jpg", src.read(f"{row['id']}.jpg"))
    return tmp_path, kept


def test_bundled_sample_loads_with_photos():
    catalogue = load_catalogue(SAMPLE)
    assert 2500 <= len(catalogue) <= 3500
    first = catalogue.products[0]
    assert catalogue.load_image(first.id).size[1] > 0
    assert len({p.article_type for p in catalogue}) > 100  # stratified: rare types kept


def test_missing_column_names_file_and_column(tmp_path):
    root, _ = small_catalogue(tmp_path)
    text = (root / PRODUCTS_FILE).read_text().replace("articleType", "kind", 1)
    (root / PRODUCTS_FILE).write_text(text)
    with pytest.raises(CatalogueError, match=r"products\.csv.*articleType"):
        load_catalogue(root)


def test_empty_title_names_row(tmp_path):
    root, kept = small_catalogue(tmp_path)
    lines = (root / PRODUCTS_FILE).read_text().splitlines()
    lines[3] = lines[3].replace(kept[2]["productDisplayName"], "")
    (root / PRODUCTS_FILE).write_text("\n".join(lines) + "\n")
    with pytest.raises(
        CatalogueError, match=r"products\.csv: row 4 has an empty productDisplayName"
    ):
        load_catalogue(root)


def test_duplicate_id_names_row(tmp_path):
    root, _ = small_catalogue(tmp_path)
    lines = (root / PRODUCTS_FILE).read_text().splitlines()
    (root / PRODUCTS_FILE).write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(CatalogueError, match=r"row 7 repeats id"):
        load_catalogue(root)


def test_unreadable_image_names_archive_and_entry(tmp_path):
    root, kept = small_catalogue(tmp_path)
    bad = kept[1]["id"]
    with zipfile.ZipFile(root / IMAGES_FILE) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    entries[f"{bad}.jpg"] = b"not a jpeg"
    with zipfile.ZipFile(root / IMAGES_FILE, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    catalogue = load_catalogue(root)
    with pytest.raises(
        CatalogueError, match=rf"images_60x80\.zip: entry {bad}\.jpg .*not a readable image"
    ):
        catalogue.load_image(bad)


def test_missing_files_are_named(tmp_path):
    with pytest.raises(CatalogueError, match="products.csv: file not found"):
        load_catalogue(tmp_path)
    shutil.copy(SAMPLE / PRODUCTS_FILE, tmp_path / PRODUCTS_FILE)
    with pytest.raises(CatalogueError, match="images_60x80.zip: file not found"):
        load_catalogue(tmp_path)
    (tmp_path / IMAGES_FILE).write_bytes(b"garbage")
    with pytest.raises(CatalogueError, match="not a zip archive"):
        load_catalogue(tmp_path)


def test_fingerprint_changes_with_content(tmp_path):
    root, _ = small_catalogue(tmp_path)
    before = load_catalogue(root).fingerprint
    with open(root / PRODUCTS_FILE, "a") as f:
        f.write("\n")
    assert load_catalogue(root).fingerprint != before
