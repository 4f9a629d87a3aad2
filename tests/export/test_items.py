"""export.items: the titles and photos written for the search page, and their place in the
artifacts the pipeline builds."""

import json
import zipfile

import pytest

from export.items import write_items
from models.catalogue import load_catalogue
from service.items import IMAGES_FILE, ITEMS_FILE, ItemCatalogue, items_dir
from service.manifest import load_manifest, resolve_version_dir
from tests.conftest import SAMPLE


def test_items_hold_every_product_and_its_photo_once(tmp_path):
    catalogue = load_catalogue(SAMPLE)
    logged = []
    target = write_items(catalogue, tmp_path, log=logged.append)
    assert target == items_dir(tmp_path, catalogue.fingerprint)
    body = json.loads((target / ITEMS_FILE).read_text())
    assert body["catalogue_fingerprint"] == catalogue.fingerprint
    assert list(body["items"]) == [p.id for p in catalogue]
    first = catalogue.products[0]
    assert body["items"][first.id]["title"] == first.title
    assert body["items"][first.id]["attributes"]["baseColour"] == first.colour
    with zipfile.ZipFile(target / IMAGES_FILE) as images:
        assert len(images.namelist()) == len(catalogue)
        for product in catalogue.products[::500]:
            assert images.read(f"{product.id}.jpg") == catalogue.image_bytes(product.id)
    assert len(logged) == 1

    stamps = [(target / name).stat().st_mtime_ns for name in (ITEMS_FILE, IMAGES_FILE)]
    assert write_items(catalogue, tmp_path, log=logged.append) == target
    assert [(target / name).stat().st_mtime_ns for name in (ITEMS_FILE, IMAGES_FILE)] == stamps
    assert len(logged) == 1, "an existing item directory is reused without a word"
    assert [p.name for p in target.parent.iterdir()] == [target.name], "no temporary left"


@pytest.mark.slow
def test_the_pipeline_writes_items_for_the_served_catalogue(sample_artifacts):
    manifest = load_manifest(resolve_version_dir(sample_artifacts / "models"))
    items = ItemCatalogue.open(sample_artifacts, manifest.catalogue_fingerprint)
    try:
        assert len(items) == len(load_catalogue(SAMPLE))
        assert items.photo(next(iter(load_catalogue(SAMPLE))).id) is not None
    finally:
        items.close()
