"""``python -m service`` as a real process (uvicorn, uvloop, httptools), and its imports."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO
from tests.service.processes import START_TIMEOUT_S, running_service


def test_the_service_never_imports_torch() -> None:
    code = (
        "import sys, service.app, service.__main__, service.pipeline\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))\n"
        "print(bad)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert done.stdout.strip() == "[]"


@pytest.mark.slow
def test_python_m_service_serves_the_sample(sample_artifacts: Path, tmp_path: Path) -> None:
    env = {"FUSIONRANK_ARTIFACTS_DIR": str(sample_artifacts)}
    with running_service(tmp_path / "service.log", **env) as service:
        body = {"query": "red tshirt", "top_k": 3}
        response = httpx.post(f"{service.url}/rank", json=body, timeout=10)
        assert response.headers["server"] == "uvicorn"
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 3


@pytest.mark.slow
def test_two_workers_share_their_metrics(sample_artifacts: Path, tmp_path: Path) -> None:
    env = {"FUSIONRANK_ARTIFACTS_DIR": str(sample_artifacts), "FUSIONRANK_WORKERS": "2"}
    with (
        running_service(tmp_path / "service.log", **env) as service,
        httpx.Client(base_url=service.url) as client,
    ):
        for n in range(12):
            # A new connection each time, so both workers get some. /readyz was answered by
            # one worker: the other may still be warming up, and says so with a 503.
            deadline = time.monotonic() + START_TIMEOUT_S
            while True:
                response = client.post(
                    "/rank",
                    json={"query": f"shirt {n}", "top_k": 2},
                    headers={"connection": "close"},
                )
                if response.status_code != 503 or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert response.status_code == 200
        # A worker counts a request once its answer is sent, so the last count may land just
        # after the client has its answer: read until all 12 show (or 10 s pass).
        deadline = time.monotonic() + 10
        while (counted := rank_answers(client.get("/metrics").text)) < 12:
            if time.monotonic() > deadline:
                break
            time.sleep(0.1)
    assert counted == 12  # whichever worker answered /metrics


def rank_answers(metrics: str) -> float:
    return sum(
        sample.value
        for family in text_string_to_metric_families(metrics)
        for sample in family.samples
        if sample.name == "fusionrank_http_requests_total"
        and sample.labels == {"route": "/rank", "method": "POST", "status": "200"}
    )
