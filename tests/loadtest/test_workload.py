"""The load generator's workload: derived + real queries with a Zipf skew, fixed candidate
lists from the catalogue, request bodies the service accepts."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import pytest

from loadtest.workload import Workload, read_query_file
from service.schemas import RankRequest

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def workload(tmp_path_factory: pytest.TempPathFactory) -> Workload:
    real = tmp_path_factory.mktemp("queries") / "queries.csv"
    real.write_text("query_text\nt towels kitchen\ntan strappy heels for women\n")
    return Workload.build(SAMPLE, derived=300, query_files=[real], zipf=1.0, seed=3)


def test_queries_come_from_both_pools(workload: Workload) -> None:
    sources = workload.describe()["queries_by_source"]
    assert sources == {"derived": 300, "queries.csv": 2}
    assert len({q.text for q in workload.queries}) == len(workload.queries)


def test_popularity_is_zipf_skewed(workload: Workload) -> None:
    rng = random.Random(0)
    counts = Counter(workload.draw(rng).text for _ in range(20_000))
    top = workload.queries[0].text
    assert counts.most_common(1)[0][0] == top
    # P(rank 1) = 1 / H(302) ~ 0.16 with s = 1; the tail still shows up.
    assert 0.12 < counts[top] / 20_000 < 0.20
    assert len(counts) > 150


def test_candidates_are_fixed_distinct_catalogue_ids(workload: Workload) -> None:
    ids = set(workload.ids)
    for query in workload.queries[:20]:
        picked = workload.candidates(query, 100)
        assert len(picked) == len(set(picked)) == 100
        assert set(picked) <= ids
        assert workload.candidates(query, 100) == picked
    too_many = workload.candidates(workload.queries[0], len(ids) + 10)
    assert sorted(too_many) == sorted(ids)


def test_bodies_are_valid_rank_requests(workload: Workload) -> None:
    bodies, distinct = workload.bodies(50, 1000, random.Random(1))
    assert 1 <= distinct <= 50 and len(bodies) == 50
    request = RankRequest.model_validate_json(bodies[0])
    assert len(request.candidate_ids or []) == 1000 and request.top_k == 10
    retrieval = orjson.loads(workload.body(workload.queries[0], 0, retrieve_k=200))
    assert "candidate_ids" not in retrieval and retrieval["retrieve_k"] == 200


def test_query_files(tmp_path: Path) -> None:
    lines = tmp_path / "q.txt"
    lines.write_text("red shoes\n\nred shoes\nblue bag\n")
    assert read_query_file(lines) == ["red shoes", "blue bag"]
    bad = tmp_path / "q.csv"
    bad.write_text("text\nred shoes\n")
    with pytest.raises(ValueError, match="query_text"):
        read_query_file(bad)


def test_the_generator_imports_no_torch() -> None:
    code = "import sys, loadtest.__main__, loadtest.bench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
