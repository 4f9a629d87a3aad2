"""Item display data for the service's search page: titles, attributes and photos.

Written once per catalogue content, next to the models, as

    <out>/items/<catalogue fingerprint>/
        items.json    {"catalogue_fingerprint": ..., "items": {id: {"title", "attributes"}}}
        images.zip    <id>.jpg for every item (the catalogue's 60x80 JPEGs, stored uncompressed)

The service finds it through the manifest's ``catalogue_fingerprint`` (service.items). Both
files are built in a temporary directory renamed into place when complete, and an existing
directory is kept as is, so rerunning the export costs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import zipfile
from pathlib import Path

from models.catalogue import Catalogue
from service.items import IMAGES_FILE, ITEMS_FILE, items_dir


def write_items(catalogue: Catalogue, out: Path, log=print) -> Path:
    """The item directory of ``catalogue`` under ``out``, written when absent."""
    target = items_dir(out, catalogue.fingerprint)
    if (target / ITEMS_FILE).is_file() and (target / IMAGES_FILE).is_file():
        return target
    tmp = target.parent / f".tmp-{target.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    items = {}
    # JPEGs do not compress: stored members are read back without inflating.
    with zipfile.ZipFile(tmp / IMAGES_FILE, "w", zipfile.ZIP_STORED) as images:
        for product in catalogue:
            images.writestr(f"{product.id}.jpg", catalogue.image_bytes(product.id))
            items[product.id] = {
                "title": product.title,
                "attributes": {
                    "gender": product.gender,
                    "masterCategory": product.master_category,
                    "subCategory": product.sub_category,
                    "articleType": product.article_type,
                    "baseColour": product.colour,
                    "usage": product.usage,
                    "season": product.season,
                },
            }
    body = {"catalogue_fingerprint": catalogue.fingerprint, "items": items}
    (tmp / ITEMS_FILE).write_text(json.dumps(body, ensure_ascii=False, separators=(",", ":")))
    shutil.rmtree(target, ignore_errors=True)  # an incomplete one from an older run
    try:
        tmp.rename(target)
    except OSError:  # a concurrent export renamed its own copy into place first
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / ITEMS_FILE).is_file():
            raise
    log(f"wrote titles and photos of {len(items)} items to {target}")
    return target
