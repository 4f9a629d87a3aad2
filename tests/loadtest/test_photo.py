"""python -m loadtest.photo as a user runs it, against a real python -m service on the
sample: photo queries answered without errors, latency figures reported, and the product
whose photo was sent usually first."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.processes import REPO, running_service, service_environment

pytestmark = pytest.mark.slow


def test_the_photo_load_runs_on_the_sample(sample_artifacts: Path, tmp_path: Path) -> None:
    out = tmp_path / "photo.json"
    with running_service(
        tmp_path / "service.log", FUSIONRANK_ARTIFACTS_DIR=str(sample_artifacts)
    ) as service:
        done = subprocess.run(
            [sys.executable, "-m", "loadtest.photo", "--url", service.url, "--data",
             "data/sample", "--rate", "10", "--duration", "2", "--out", str(out)],
            cwd=REPO, env=service_environment(), capture_output=True, text=True, timeout=300,
        )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["requests"] > 0 and report["errors"] == {}
    assert report["latency_ms"]["p99"] > 0
    first, checked = map(int, report["own_product_first"].split("/"))
    assert checked == 30 and first >= 24  # duplicate photos may tie with the product
