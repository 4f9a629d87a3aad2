"""Two stateless replicas behind a real nginx running deploy/nginx.conf: both take traffic, one
is SIGKILLed mid-stream, and requests keep succeeding because nginx retries them on the other.

The replicas are ``python -m service`` processes on loopback ports serving the sample artifacts
(embedded feature store, read by both). nginx runs in the foreground from a temporary prefix
with the deployed config, only its upstream servers and listen port swapped for local ones.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest

from tests.service.conftest import _free_port

REPO = Path(__file__).resolve().parents[2]
NGINX_CONF = REPO / "deploy" / "nginx.conf"
START_TIMEOUT_S = 180
REQUESTS = 400  # in all, from CLIENTS threads; replica A is killed after KILL_AFTER of them
CLIENTS = 4
KILL_AFTER = 150

pytestmark = pytest.mark.slow


def start_replica(port: int, artifacts: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    env.update(
        FUSIONRANK_HOST="127.0.0.1",
        FUSIONRANK_PORT=str(port),
        FUSIONRANK_ARTIFACTS_DIR=str(artifacts),
        FUSIONRANK_LOG_LEVEL="warning",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def wait_until_ready(url: str, process: subprocess.Popen[bytes], path: str = "/readyz") -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        assert process.poll() is None, f"{process.args} exited with {process.returncode}"
        assert time.monotonic() < deadline, f"{url} did not get ready"
        try:
            if httpx.get(f"{url}{path}", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)


@contextmanager
def stopped_at_exit(process: subprocess.Popen[bytes]) -> Iterator[subprocess.Popen[bytes]]:
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def render_nginx(prefix: Path, listen: int, replicas: list[int]) -> Path:
    """A foreground nginx.conf in ``prefix`` that includes deploy/nginx.conf with local
    upstream servers and listen port; pid, logs and temp paths all inside ``prefix``."""
    site = NGINX_CONF.read_text()
    servers = "\n".join(
        f"    server 127.0.0.1:{port} max_fails=1 fail_timeout=5s;" for port in replicas
    )
    site, swapped = re.subn(r"^\s*server \S+ .*# replicas$", servers, site, flags=re.M)
    assert swapped == 1, "deploy/nginx.conf: no `server ...;  # replicas` line"
    site, swapped = re.subn(r"listen \d+;", f"listen 127.0.0.1:{listen};", site)
    assert swapped == 1, "deploy/nginx.conf: no `listen N;` line"
    (prefix / "site.conf").write_text(site)
    temp = "\n".join(
        f"    {name}_temp_path {prefix / name};"
        for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    main = f"""
daemon off;
worker_processes 1;
pid {prefix / "nginx.pid"};
error_log {prefix / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
    access_log {prefix / "access.log"};
{temp}
    include {prefix / "site.conf"};
}}
"""
    (prefix / "nginx.conf").write_text(main)
    return prefix / "nginx.conf"


def test_killing_a_replica_behind_nginx_loses_no_request(
    sample_artifacts: Path, tmp_path: Path
) -> None:
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx, see .ci/debian-packages)")
    ports = [_free_port(), _free_port()]
    listen = _free_port()
    config = render_nginx(tmp_path, listen, ports)
    with ExitStack() as stack:
        replicas = [
            stack.enter_context(stopped_at_exit(start_replica(port, sample_artifacts)))
            for port in ports
        ]
        for port, replica in zip(ports, replicas, strict=True):
            wait_until_ready(f"http://127.0.0.1:{port}", replica)
        checked = subprocess.run(
            [nginx, "-t", "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", config],
            capture_output=True,
            text=True,
        )
        assert checked.returncode == 0, checked.stderr
        balancer = stack.enter_context(
            stopped_at_exit(
                subprocess.Popen(
                    [nginx, "-p", str(tmp_path), "-e", str(tmp_path / "error.log"), "-c", config],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )
            )
        )
        url = f"http://127.0.0.1:{listen}"
        wait_until_ready(url, balancer, path="/lb-healthz")

        report = drive_and_kill(url, victim=replicas[0])

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
