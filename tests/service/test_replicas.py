"""Two stateless replicas behind a real nginx running deploy/nginx.conf: both take traffic, one
is SIGKILLed mid-stream, and requests keep succeeding because nginx retries them on the other.

The replicas are ``python -m service`` processes on loopback ports serving the sample artifacts
(embedded feature store, read by both). nginx runs in the foreground from a temporary prefix
with the deployed config, only its upstream servers and listen port swapped for local ones.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from tests.service.fleet import replicas_behind_nginx

REQUESTS = 400  # in all, from CLIENTS threads; replica A is killed after KILL_AFTER of them
CLIENTS = 4
KILL_AFTER = 150

pytestmark = pytest.mark.slow


def test_killing_a_replica_behind_nginx_loses_no_request(
    sample_artifacts: Path, tmp_path: Path
) -> None:
    with replicas_behind_nginx(tmp_path, sample_artifacts) as fleet:
        report = drive_and_kill(fleet.url, victim=fleet.replicas[0])
        ports = [int(url.rsplit(":", 1)[1]) for url in fleet.replica_urls]

    (tmp_path / "report.json").write_text(json.dumps(report, indent=2))
    print(f"\nreplica kill behind nginx: {json.dumps(report)}")
    victim, survivor = (f"127.0.0.1:{port}" for port in ports)
    before = report["served_before_kill"]
    assert before.get(victim, 0) > 0 and before.get(survivor, 0) > 0, before  # both took traffic
    assert report["requests"] == REQUESTS
    assert report["failures"] == 0, report
    assert report["served_after_kill"].get(survivor, 0) > 0
    assert report["retried_by_nginx"] >= 1  # at least the request that found the victim gone


def drive_and_kill(url: str, victim: subprocess.Popen[bytes]) -> dict:
    """REQUESTS /rank calls from CLIENTS threads; SIGKILL ``victim`` after KILL_AFTER of them.
    Every answer other than a 200 with a ranking, and every transport error, is a failure."""
    ids = [str(n) for n in range(100)]  # unknown ids are fine: they come back as missing_ids
    bodies = [
        {"query": "red tshirt for men", "top_k": 5},
        {"query": "black watch", "retrieve_k": 100, "top_k": 10},
        {"query": "women heels", "candidate_ids": ids, "top_k": 10},
    ]
    lock = threading.Lock()
    sent = 0
    killed_at: float | None = None
    failures: list[str] = []
    served: dict[str, Counter[str]] = {"before": Counter(), "after": Counter()}
    retried = 0
    latencies: list[float] = []

    def client() -> None:
        nonlocal sent, killed_at, retried
        with httpx.Client(base_url=url, timeout=15) as http:
            while True:
                with lock:
                    if sent == REQUESTS:
                        return
                    number = sent
                    sent += 1
                    if number == KILL_AFTER:
                        victim.send_signal(signal.SIGKILL)
                        killed_at = time.monotonic()
                    phase = "before" if killed_at is None else "after"
                started = time.perf_counter()
                try:
                    response = http.post("/rank", json=bodies[number % len(bodies)])
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(f"#{number}: {type(exc).__name__}: {exc}")
                    continue
                elapsed = time.perf_counter() - started
                upstreams = [u.strip() for u in response.headers.get("x-upstream", "").split(",")]
                with lock:
                    latencies.append(elapsed)
                    if response.status_code != 200 or "items" not in response.json():
                        failures.append(f"#{number}: {response.status_code} {response.text[:200]}")
                        continue
                    served[phase][upstreams[-1]] += 1
                    retried += len(upstreams) > 1

    threads = [threading.Thread(target=client) for _ in range(CLIENTS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    victim.wait(timeout=10)
    return {
        "requests": sent,
        "clients": CLIENTS,
        "killed_after": KILL_AFTER,
        "failures": len(failures),
        "failure_samples": failures[:5],
        "retried_by_nginx": retried,
        "served_before_kill": dict(served["before"]),
        "served_after_kill": dict(served["after"]),
        "p50_ms": round(sorted(latencies)[len(latencies) // 2] * 1e3, 1),
        "max_ms": round(max(latencies) * 1e3, 1),
    }


def test_no_replica_left_is_a_json_503_with_retry_after(
    sample_artifacts: Path, tmp_path: Path
) -> None:
    """With every replica gone nginx has nobody to ask: its own 502 reaches the client as the
    service's answer for a transient condition (deploy/nginx.conf's @no_replica)."""
    with replicas_behind_nginx(tmp_path, sample_artifacts) as fleet:
        for replica in fleet.replicas:
            replica.send_signal(signal.SIGKILL)
            replica.wait(timeout=10)
        response = httpx.post(f"{fleet.url}/rank", json={"query": "black watch"}, timeout=10)
        assert response.status_code == 503, response.text
        assert response.headers["content-type"].startswith("application/json")
        assert response.headers["retry-after"] == "1"
        assert "no replica" in response.json()["detail"]
        # The balancer's own liveness is not a replica's.
        assert httpx.get(f"{fleet.url}/lb-healthz", timeout=5).status_code == 200
