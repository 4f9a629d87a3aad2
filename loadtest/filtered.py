"""python -m loadtest.filtered --url URL --artifacts DIR [--data DIR] [--sets 200] [--rate 50]

Filtered retrieval against a running service, three checks in one run:

1. correctness: ``--sets`` random filter sets built from the catalogue's real attribute values
   (one to three attributes each; equality, one-of, not-one-of, a year range), each sent with
   a workload query as POST /rank with ``retrieve_k`` = ``top_k`` = ``--k``: every returned
   item must match (checked against the catalogue file), and there must be ``--k`` of them
   whenever that many items match;
2. recall@k of each answer against an exact filtered brute-force search over the index's own
   vectors, with the export's query encoder (the int8 one where the export has it, as the
   service runs on CPU): the FAISS search with an ID selector should find the same items;
3. latency: open-loop retrieval at ``--rate`` without and with filters, in alternating steps of
   ``--duration`` seconds, and the ratio of their p99s.

Queries and filters are derived from the catalogue's attributes (there are no logged queries
for this catalogue). Writes a JSON report (``--out``) and prints a summary. Talks only to
``--url`` (loopback).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import faiss
import numpy as np
import onnxruntime as ort
import orjson
from tokenizers import Tokenizer

from loadtest.openloop import Target, poisson_offsets, request_bytes, run_open_loop, run_sync
from loadtest.runner import post_json
from loadtest.workload import Workload, default_catalogue
from models.catalogue import ATTRIBUTE_FIELDS, Product, load_catalogue
from service.manifest import load_manifest, resolve_version_dir

FIELDS = ATTRIBUTE_FIELDS


def random_filters(products: list[Product], rng: random.Random) -> dict[str, object]:
    """One to three conditions on real values (taken from random products)."""
    filters: dict[str, object] = {}
    for name in rng.sample([*FIELDS, "year"], rng.randint(1, 3)):
        if name == "year":
            years = [p.year for p in rng.sample(products, 2) if p.year]
            if years:
                filters["year"] = {"gte": min(years)}
            continue
        values = sorted({getattr(p, FIELDS[name]) for p in rng.sample(products, 3)} - {""})
        if not values:
            continue
        kind = rng.choice(("eq", "one_of", "not"))
        if kind == "eq":
            filters[name] = values[0]
        elif kind == "one_of":
            filters[name] = values
        else:
            filters[name] = {"not": values[:1]}
    return filters or {"gender": products[0].gender}


def matches(product: Product, filters: dict[str, object]) -> bool:
    for name, condition in filters.items():
        if name == "year":
            low = condition["gte"]  # type: ignore[index]
            if not product.year or product.year < low:
                return False
            continue
        value = getattr(product, FIELDS[name])
        if isinstance(condition, str):
            ok = value == condition
        elif isinstance(condition, list):
            ok = value in condition
        else:
            ok = value not in condition["not"]  # type: ignore[index]
        if not ok:
            return False
    return True


class ExactRetrieval:
    """The served version's retrieval, done exhaustively: query encoder -> scores against every
    indexed vector -> the best k of the allowed items."""

    def __init__(self, artifacts: Path) -> None:
        version_dir = resolve_version_dir(artifacts / "models")
        manifest = load_manifest(version_dir)
        graph = "query_encoder_int8" if "query_encoder_int8" in manifest.graphs else "query_encoder"
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        self.encoder = ort.InferenceSession(
            manifest.path(version_dir, graph), options, providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(str(version_dir / manifest.tokenizer_file))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(manifest.max_tokens)
        files = manifest.index.shards or [manifest.index.file]
        self.vectors = np.concatenate(
            [_vectors(faiss.read_index(str(version_dir / f))) for f in files]
        )
        self.ids: list[str] = json.loads((version_dir / manifest.index.ids_file).read_text())
        self.version = manifest.version

    def top_k(self, query: str, allowed: np.ndarray, k: int) -> list[str]:
        tokens = np.asarray([self.tokenizer.encode(query).ids], dtype=np.int64)
        _, retrieval = self.encoder.run(
            None, {"input_ids": tokens, "attention_mask": tokens * 0 + 1}
        )
        scores = self.vectors @ retrieval[0].astype(np.float32)
        scores[~allowed] = -np.inf
        best = np.argsort(-scores, kind="stable")[: min(k, int(allowed.sum()))]
        return [self.ids[r] for r in best.tolist()]


def _vectors(index: faiss.Index) -> np.ndarray:
    return index.reconstruct_n(0, index.ntotal)


def check_sets(
    target: Target, exact: ExactRetrieval, products: dict[str, Product], workload: Workload,
    sets: int, k: int, seed: int,
) -> dict[str, object]:  # fmt: skip
    rng = random.Random(seed)
    catalogue = [products[i] for i in exact.ids]
    wrong, short, recalls, sizes = [], [], [], []
    for n in range(sets):
        filters = random_filters(catalogue, rng)
        query = workload.draw(rng).text
        allowed = np.array([matches(p, filters) for p in catalogue])
        body = orjson.dumps({"query": query, "retrieve_k": k, "top_k": k, "filters": filters})
        status, raw = post_json(target, "/rank", body)
        if status != 200:
            raise SystemExit(f"set {n}: POST /rank answered {status}: {raw[:300]!r}")
        got = [item["id"] for item in orjson.loads(raw)["items"]]
        wrong += [(n, i) for i in got if not matches(products[i], filters)]
        if len(got) != min(k, int(allowed.sum())):
            short.append((n, len(got), int(allowed.sum())))
        expected = exact.top_k(query, allowed, k)
        if expected:
            recalls.append(len(set(got) & set(expected)) / len(expected))
        sizes.append(int(allowed.sum()))
    return {
        "filter_sets": sets,
        "items_not_matching": len(wrong),
        "answers_short_of_k": len(short),
        "short_examples": short[:5],
        f"mean_recall_at_{k}": round(float(np.mean(recalls)), 4) if recalls else None,
        f"min_recall_at_{k}": round(float(np.min(recalls)), 4) if recalls else None,
        "matching_items_median": int(np.median(sizes)),
        "matching_items_min": int(np.min(sizes)),
    }


def latency(
    target: Target, workload: Workload, catalogue: list[Product], rate: float, duration: float,
    rounds: int, k: int, seed: int,
) -> dict[str, object]:  # fmt: skip
    rng = random.Random(seed)
    latencies: dict[str, list[float]] = {"unfiltered": [], "filtered": []}
    errors = {"unfiltered": 0, "filtered": 0}
    for _ in range(rounds):
        for kind in ("unfiltered", "filtered"):
            offsets = poisson_offsets(rate, duration, rng)
            bodies = []
            for _ in offsets:
                body: dict[str, object] = {"query": workload.draw(rng).text, "retrieve_k": k}
                if kind == "filtered":
                    body["filters"] = random_filters(catalogue, rng)
                bodies.append(request_bytes(target, "POST", "/rank", orjson.dumps(body)))
            result = run_sync(run_open_loop(target, bodies, offsets, label=f"[{kind}]"))
            latencies[kind] += result.latencies_ms.tolist()
            errors[kind] += sum(s != "200" for s in result.status)
    out: dict[str, object] = {"rate": rate, "step_s": duration, "rounds": rounds}
    for kind, values in latencies.items():
        array = np.asarray(values)
        out[kind] = {
            "requests": len(values),
            "errors": errors[kind],
            "p50_ms": round(float(np.percentile(array, 50)), 2),
            "p99_ms": round(float(np.percentile(array, 99, method="higher")), 2),
        }
    out["p99_ratio"] = round(out["filtered"]["p99_ms"] / out["unfiltered"]["p99_ms"], 2)  # type: ignore[index]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.filtered", description=__doc__)
    parser.add_argument("--url", required=True)
    parser.add_argument("--artifacts", type=Path, default=Path("artifacts"))
    parser.add_argument("--data", type=Path, default=default_catalogue())
    parser.add_argument("--sets", type=int, default=200)
    parser.add_argument("--k", type=int, default=100)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per step")
    parser.add_argument("--rounds", type=int, default=2, help="unfiltered/filtered step pairs")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    target = Target.parse(args.url)
    exact = ExactRetrieval(args.artifacts)
    products = {p.id: p for p in load_catalogue(args.data)}
    missing = [i for i in exact.ids if i not in products]
    if missing:
        raise SystemExit(f"--data is not the served catalogue: {len(missing)} indexed ids absent")
    workload = Workload.build(args.data, seed=args.seed)
    report = {
        "provenance": "queries and filters derived from the catalogue's attributes; no logged "
        "queries exist for this catalogue",
        "model_version": exact.version,
        "correctness": check_sets(target, exact, products, workload, args.sets, args.k, args.seed),
        "latency": latency(
            target,
            workload,
            [products[i] for i in exact.ids],
            args.rate,
            args.duration,
            args.rounds,
            args.k,
            args.seed,
        ),  # fmt: skip
    }
    text = json.dumps(report, indent=2)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    print(text)
    correct = report["correctness"]
    if correct["items_not_matching"] or correct["answers_short_of_k"]:  # type: ignore[index]
        sys.exit(1)


if __name__ == "__main__":
    main()
