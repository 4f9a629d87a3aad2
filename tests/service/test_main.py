"""``python -m service`` as a real process (uvicorn, uvloop, httptools), and its imports."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 180


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


@contextmanager
def running_service(port: int, **env: str) -> Iterator[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    environment.update({"FUSIONRANK_HOST": "127.0.0.1", "FUSIONRANK_PORT": str(port), **env})
    process = subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"python -m service exited:\n{process.stdout.read()}"
            assert time.monotonic() < deadline, "python -m service did not get ready"
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.slow
def test_python_m_service_serves_the_sample(sample_artifacts: Path, closed_port: int) -> None:
    with running_service(closed_port, FUSIONRANK_ARTIFACTS_DIR=str(sample_artifacts)) as url:
        response = httpx.post(f"{url}/rank", json={"query": "red tshirt", "top_k": 3}, timeout=10)
        assert response.headers["server"] == "uvicorn"
    assert response.status_code == 200, response.text
    assert len(response.json()["items"]) == 3


@pytest.mark.slow
def test_two_workers_share_their_metrics(sample_artifacts: Path, closed_port: int) -> None:
    env = {"FUSIONRANK_ARTIFACTS_DIR": str(sample_artifacts), "FUSIONRANK_WORKERS": "2"}
    with running_service(closed_port, **env) as url, httpx.Client(base_url=url) as client:
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
        text = client.get("/metrics").text
    counted = sum(
        sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "fusionrank_http_requests_total"
        and sample.labels == {"route": "/rank", "method": "POST", "status": "200"}
    )
    assert counted == 12  # whichever worker answered /metrics
