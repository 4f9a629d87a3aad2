"""python -m loadtest.photo --url URL [--data DIR] [--rate 20] [--duration 10]

Search by photo under open-loop load: POST /rank with ``image`` = the photo of a random
catalogue product (its own 60x80 JPEG, base64), no query, at ``--rate`` requests per second
for ``--duration`` seconds after a short warm-up; latency from each request's scheduled send
time. Prints (and with ``--out`` writes) the JSON summary: p50/p90/p99, errors by status, and
how often the product itself came first (a sanity check: duplicate photos may tie with it).
Talks only to ``--url`` (loopback).
"""

from __future__ import annotations

import argparse
import base64
import json
import random
from pathlib import Path

import orjson

from loadtest.openloop import Target, poisson_offsets, request_bytes, run_open_loop, run_sync
from loadtest.runner import post_json
from loadtest.workload import default_catalogue
from models.catalogue import load_catalogue

DEFAULT_RATE = 20.0
PHOTOS = 300  # distinct photos drawn for the load
SELF_CHECKS = 30


def photo_bodies(data: Path, count: int, seed: int) -> list[tuple[str, bytes]]:
    """(product id, POST /rank body) for ``count`` random products' own photos."""
    catalogue = load_catalogue(data)
    try:
        products = random.Random(seed).sample(list(catalogue), min(count, len(catalogue)))
        return [
            (
                p.id,
                orjson.dumps(
                    {"image": base64.b64encode(catalogue.image_bytes(p.id)).decode(), "top_k": 10}
                ),
            )
            for p in products
        ]
    finally:
        catalogue.close()


def photo_load(
    target: Target, bodies: list[tuple[str, bytes]], rate: float, duration: float, seed: int
) -> dict[str, object]:
    rng = random.Random(seed)
    first = 0
    for item_id, body in bodies[:SELF_CHECKS]:  # also warms the service up
        status, raw = post_json(target, "/rank", body)
        if status != 200:
            raise SystemExit(f"POST /rank with a photo answered {status}: {raw[:300]!r}")
        items = orjson.loads(raw)["items"]
        first += bool(items) and items[0]["id"] == item_id
    offsets = poisson_offsets(rate, duration, rng)
    requests = [
        request_bytes(target, "POST", "/rank", bodies[rng.randrange(len(bodies))][1])
        for _ in offsets
    ]
    result = run_sync(run_open_loop(target, requests, offsets, label="[photo]"))
    summary = result.summary(duration, rate)
    return {
        "rate": rate,
        "duration_s": duration,
        "requests": summary["requests"],
        "errors": summary["errors"],
        "latency_ms": summary["latency_ms"],
        "own_product_first": f"{first}/{min(SELF_CHECKS, len(bodies))}",
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.photo", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--data", type=Path, default=default_catalogue())
    parser.add_argument("--rate", type=float, default=DEFAULT_RATE)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    bodies = photo_bodies(args.data, PHOTOS, args.seed)
    report = photo_load(Target.parse(args.url), bodies, args.rate, args.duration, args.seed)
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    if report["errors"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
