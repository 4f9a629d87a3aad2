"""Item attributes for the service's filters and boosts, as columns beside the index.

Written into each model version directory, once, as

    <version>/attributes/vocab.json    {attribute: [values...]}: code c is values[c]; 0 is ""
    <version>/attributes/<attr>.npy    uint16 codes, row i = the i-th indexed id
    <version>/attributes/year.npy      int16 years, 0 where the catalogue has none

Rows follow the index ids (the same order FAISS returns), so a filter is one boolean mask over
the index and the service memory-maps the columns at start-up (service.stages.attributes).
Built in a temporary directory renamed into place when complete; an existing one is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from models.catalogue import ATTRIBUTE_FIELDS, Catalogue, Product

ATTRIBUTES_DIR = "attributes"
VOCAB_FILE = "vocab.json"
YEAR_FILE = "year.npy"
COLUMNS = ATTRIBUTE_FIELDS  # one column per attribute, by the API's name


def write_attributes(catalogue: Catalogue, ids: list[str], version_dir: Path, log=print) -> Path:
    """``version_dir/attributes`` for the indexed ``ids``, written when absent."""
    target = version_dir / ATTRIBUTES_DIR
    if (target / VOCAB_FILE).is_file():
        return target
    products: dict[str, Product] = {p.id: p for p in catalogue}
    missing = [i for i in ids if i not in products]
    if missing:
        raise ValueError(f"{len(missing)} indexed ids are not in the catalogue, e.g. {missing[:3]}")
    rows = [products[i] for i in ids]
    tmp = version_dir / f".tmp-{ATTRIBUTES_DIR}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    vocab: dict[str, list[str]] = {}
    for name, field in COLUMNS.items():
        values = [getattr(p, field) for p in rows]
        vocab[name] = ["", *sorted(set(values) - {""})]
        code_of = {value: code for code, value in enumerate(vocab[name])}
        np.save(tmp / f"{name}.npy", np.array([code_of[v] for v in values], dtype=np.uint16))
    np.save(tmp / YEAR_FILE, np.array([p.year or 0 for p in rows], dtype=np.int16))
    (tmp / VOCAB_FILE).write_text(json.dumps(vocab, indent=1))
    tmp.rename(target)
    log(f"wrote {len(COLUMNS) + 1} attribute columns of {len(ids)} items to {target}")
    return target
