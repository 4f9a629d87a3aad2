"""python -m loadtest.filtered as a user runs it, against a real python -m service on the
sample: it exits 0 only when every filtered answer matches and holds k items whenever that
many match; its report must show an exact recall and both latency series."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.processes import REPO, running_service, service_environment

pytestmark = pytest.mark.slow


def test_the_filtered_retrieval_check_passes_on_the_sample(
    sample_artifacts: Path, tmp_path: Path
) -> None:
    out = tmp_path / "filtered.json"
    with running_service(
        tmp_path / "service.log", FUSIONRANK_ARTIFACTS_DIR=str(sample_artifacts)
    ) as service:
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.filtered", "--url", service.url,
             "--artifacts", str(sample_artifacts), "--data", "data/sample", "--sets", "40",
             "--k", "50", "--rate", "20", "--duration", "1", "--rounds", "1", "--out", str(out)],
            cwd=REPO, env=service_environment(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    correctness, latency = report["correctness"], report["latency"]
    assert correctness["filter_sets"] == 40
    assert correctness["items_not_matching"] == 0 and correctness["answers_short_of_k"] == 0
    assert correctness["min_recall_at_50"] >= 0.99  # Flat index: the filtered search is exact
    for kind in ("unfiltered", "filtered"):
        assert latency[kind]["requests"] > 0 and latency[kind]["errors"] == 0
    assert latency["p99_ratio"] > 0
