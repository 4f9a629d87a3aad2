"""What the load generator sends: queries with a Zipf skew, and candidate lists from the catalogue.

Queries come from two pools, shuffled together and ranked at random:

- derived queries: the templates the ranker is trained and evaluated on (models.queries'
  TRAIN_TEMPLATES + HELDOUT_TEMPLATES) filled from random catalogue products, as
  QueryGenerator draws them ("men's yellow t-shirt", "analog watch for men in silver colour");
- real Amazon shopping queries (ESCI, ``../shared/data/esci/queries.csv``), which name other
  products than the catalogue's: realistic text the service must still answer.

Query r of the ranking is drawn with probability proportional to 1 / r**s (Zipf), so a few
queries repeat a lot and a long tail seldom repeats, as in real search traffic: the service's
query cache sees the hit rate that skew gives, not 0 % or 100 %.

With the default 30,000 derived queries and s = 1, the queries ranked past 4,096 (the
service's default query cache) draw ~18 % of the requests: once the popular head is cached
(``loadtest.runner.prime``), about four requests in five find their query encoded.

A query's candidate list is fixed (the same query always comes with the same list, as from an
upstream retrieval): half from the query's article type, the rest random catalogue products.

Nothing here imports torch: models.catalogue and models.queries are plain Python.
"""

from __future__ import annotations

import bisect
import csv
import hashlib
import itertools
import random
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import orjson

from models.catalogue import load_catalogue
from models.queries import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, render, spec_for

REPO = Path(__file__).resolve().parents[1]
FULL_CATALOGUE = REPO.parent / "shared" / "data" / "fashion"
SAMPLE_CATALOGUE = REPO / "data" / "sample"
ESCI_QUERIES = REPO.parent / "shared" / "data" / "esci" / "queries.csv"
DEFAULT_DERIVED = 30_000
DEFAULT_ZIPF = 1.0


def default_catalogue() -> Path:
    return FULL_CATALOGUE if (FULL_CATALOGUE / "products.csv").is_file() else SAMPLE_CATALOGUE


def default_query_files() -> list[Path]:
    return [ESCI_QUERIES] if ESCI_QUERIES.is_file() else []


@dataclass(frozen=True, slots=True)
class WorkQuery:
    text: str
    article_type: str | None  # None: a real query from a file (no attributes known)
    source: str  # "derived" or the file's name


def read_query_file(path: Path) -> list[str]:
    """Query strings of a .csv with a ``query_text`` (or ``query``) column, else one a line."""
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(lines)
        column = next((c for c in ("query_text", "query") if c in (reader.fieldnames or [])), None)
        if column is None:
            raise ValueError(f"{path}: a CSV needs a query_text or query column")
        queries = [row[column].strip() for row in reader]
    else:
        queries = [line.strip() for line in lines]
    return list(dict.fromkeys(q for q in queries if q))


def derived_queries(products, count: int, seed: int) -> list[WorkQuery]:
    """``count`` distinct queries drawn as models.queries.QueryGenerator draws them (a random
    product seeds a random template), without the candidate grading the generator adds."""
    rng = random.Random(seed)
    templates = TRAIN_TEMPLATES + HELDOUT_TEMPLATES
    out: dict[str, WorkQuery] = {}
    for _ in range(count * 50):
        if len(out) >= count:
            break
        product = rng.choice(products)
        template = rng.choice(templates)
        spec = spec_for(template, product)
        if spec is None:
            continue
        if spec.gender is None and ("{gender_for}" in template or "{gender_pre}" in template):
            spec = replace(spec, gender=rng.choice(("Men", "Women")))
        text = render(template, spec, rng)
        out.setdefault(text, WorkQuery(text, spec.article_type, "derived"))
    return list(out.values())


class Workload:
    def __init__(
        self,
        ids: list[str],
        article_types: list[str],
        queries: list[WorkQuery],
        *,
        zipf: float = DEFAULT_ZIPF,
        seed: int = 0,
    ) -> None:
        if not ids or not queries:
            raise ValueError("a workload needs catalogue ids and queries")
        self.ids = ids
        self._by_type: dict[str, list[str]] = defaultdict(list)
        for item_id, article_type in zip(ids, article_types, strict=True):
            self._by_type[article_type].append(item_id)
        self._types = sorted(self._by_type)
        ranked = queries[:]
        random.Random(seed).shuffle(ranked)  # popularity rank is independent of the source
        self.queries = ranked
        self.zipf = zipf
        self._cumulative = list(
            itertools.accumulate(1.0 / (r**zipf) for r in range(1, len(ranked) + 1))
        )
        self._seed = seed
        self._candidates: dict[tuple[str, int], list[str]] = {}

    @classmethod
    def build(
        cls,
        data: Path,
        *,
        derived: int = DEFAULT_DERIVED,
        query_files: list[Path] | None = None,
        zipf: float = DEFAULT_ZIPF,
        seed: int = 0,
    ) -> Workload:
        """The workload of catalogue ``data`` (products with a photo: those the service has)."""
        catalogue = load_catalogue(data)
        try:
            products = list(catalogue)
        finally:
            catalogue.close()
        queries = derived_queries(products, derived, seed) if derived else []
        for path in query_files if query_files is not None else default_query_files():
            queries += [WorkQuery(q, None, path.name) for q in read_query_file(path)]
        unique = list({q.text: q for q in queries}.values())
        return cls(
            [p.id for p in products],
            [p.article_type for p in products],
            unique,
            zipf=zipf,
            seed=seed,
        )

    def describe(self) -> dict[str, object]:
        sources: dict[str, int] = defaultdict(int)
        for q in self.queries:
            sources[q.source] += 1
        return {
            "catalogue_products": len(self.ids),
            "queries": len(self.queries),
            "queries_by_source": dict(sources),
            "zipf_exponent": self.zipf,
            "top_query_share": self._cumulative[0] / self._cumulative[-1],
        }

    def head(self, count: int) -> list[WorkQuery]:
        """The ``count`` most popular queries, most popular first."""
        return self.queries[:count]

    def draw(self, rng: random.Random) -> WorkQuery:
        """A query by Zipf popularity."""
        x = rng.random() * self._cumulative[-1]
        return self.queries[bisect.bisect_right(self._cumulative, x)]

    def candidates(self, query: WorkQuery, n: int) -> list[str]:
        """The query's fixed candidate list of ``n`` distinct ids: half of its article type
        (a real query: of an article type it hashes to), the rest random products."""
        key = (query.text, n)
        cached = self._candidates.get(key)
        if cached is not None:
            return cached
        n = min(n, len(self.ids))
        digest = hashlib.sha1(f"{self._seed}:{query.text}".encode()).digest()
        rng = random.Random(digest)
        article_type = query.article_type or self._types[digest[0] % len(self._types)]
        same = self._by_type.get(article_type, [])
        picks = rng.sample(same, min(n // 2, len(same)))
        chosen = set(picks)
        while len(picks) < n:
            item = self.ids[rng.randrange(len(self.ids))]
            if item not in chosen:
                chosen.add(item)
                picks.append(item)
        rng.shuffle(picks)
        self._candidates[key] = picks
        return picks

    def body(
        self, query: WorkQuery, candidates: int, *, top_k: int = 10, retrieve_k: int = 200
    ) -> bytes:
        """A POST /rank body: ``candidates`` given ids, or retrieval (0) of ``retrieve_k``."""
        request: dict[str, object] = {"query": query.text, "top_k": top_k}
        if candidates:
            request["candidate_ids"] = self.candidates(query, candidates)
        else:
            request["retrieve_k"] = retrieve_k
        return orjson.dumps(request)

    def bodies(
        self,
        count: int,
        candidates: int,
        rng: random.Random,
        *,
        top_k: int = 10,
        retrieve_k: int = 200,
    ) -> tuple[list[bytes], int]:
        """``count`` bodies by Zipf popularity, and how many distinct queries they hold."""
        queries = [self.draw(rng) for _ in range(count)]
        bodies = [self.body(q, candidates, top_k=top_k, retrieve_k=retrieve_k) for q in queries]
        return bodies, len({q.text for q in queries})
