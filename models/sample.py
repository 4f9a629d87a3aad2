"""Cut the small real sample that ships in the repo (data/sample/) out of the full catalogue.

    python -m models.sample --data ../shared/data/fashion --out data/sample --size 3000

Stratified by articleType: each type gets a share proportional to its size, and at least a few
products when it has them, so rare types still appear. Deterministic for a given seed.
"""

from __future__ import annotations

import argparse
import csv
import random
import zipfile
from collections import defaultdict
from pathlib import Path

from models.catalogue import PRODUCTS_FILE, SAMPLE_IMAGES_FILE, load_catalogue


def stratified_ids(
    by_type: dict[str, list[str]], size: int, seed: int, floor: int = 3
) -> list[str]:
    total = sum(len(v) for v in by_type.values())
    rng = random.Random(seed)
    chosen: list[str] = []
    for article_type in sorted(by_type):
        ids = sorted(by_type[article_type])
        share = max(min(floor, len(ids)), round(size * len(ids) / total))
        chosen.extend(rng.sample(ids, min(share, len(ids))))
    return chosen


def write_sample(data: Path, out: Path, size: int, seed: int) -> int:
    catalogue = load_catalogue(data)
    by_type: dict[str, list[str]] = defaultdict(list)
    for product in catalogue:
        by_type[product.article_type].append(product.id)
    keep = set(stratified_ids(by_type, size, seed))

    out.mkdir(parents=True, exist_ok=True)
    with open(data / PRODUCTS_FILE, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row["id"] in keep]
        fields = reader.fieldnames
    with open(out / PRODUCTS_FILE, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    # Stored, not deflated: JPEGs do not compress, and members stay directly readable.
    with zipfile.ZipFile(out / SAMPLE_IMAGES_FILE, "w", compression=zipfile.ZIP_STORED) as archive:
        for row in rows:
            name = f"{row['id']}.jpg"
            info = zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0))
            archive.writestr(info, catalogue.image_bytes(row["id"]))
    return len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True, help="full catalogue directory")
    parser.add_argument("--out", type=Path, default=Path("data/sample"))
    parser.add_argument("--size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    count = write_sample(args.data, args.out, args.size, args.seed)
    print(f"wrote {count} products to {args.out}")


if __name__ == "__main__":
    main()
