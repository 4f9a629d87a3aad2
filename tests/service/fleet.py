"""Replicas behind the real nginx: ``python -m service`` processes on loopback ports and an
nginx running deploy/nginx.conf from a temporary prefix, only its upstream servers and listen
port swapped for local ones (the tests of deploy/nginx.conf's retry rules use this)."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.service.processes import REPO, free_port, service_environment

NGINX_CONF = REPO / "deploy" / "nginx.conf"
START_TIMEOUT_S = 180


def start_replica(port: int, artifacts: Path, **env: str) -> subprocess.Popen[bytes]:
    environment = service_environment(
        FUSIONRANK_HOST="127.0.0.1",
        FUSIONRANK_PORT=str(port),
        FUSIONRANK_ARTIFACTS_DIR=str(artifacts),
        FUSIONRANK_LOG_LEVEL="warning",
        **env,
    )
    return subprocess.Popen(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=environment,
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


def render_site(listen: int, replicas: list[int]) -> str:
    """deploy/nginx.conf with its upstream servers and listen port swapped for loopback ones
    (each server keeps the deployed line's parameters: max_fails, fail_timeout)."""
    site = NGINX_CONF.read_text()
    deployed = re.search(r"^\s*server \S+ (.*);\s*# replicas$", site, flags=re.M)
    assert deployed, "deploy/nginx.conf: no `server ...;  # replicas` line"
    servers = "\n".join(f"    server 127.0.0.1:{port} {deployed.group(1)};" for port in replicas)
    site = site[: deployed.start()] + servers + site[deployed.end() :]
    site, swapped = re.subn(r"listen \d+;", f"listen 127.0.0.1:{listen};", site)
    assert swapped == 1, "deploy/nginx.conf: no `listen N;` line"
    return site


def render_nginx(prefix: Path, listen: int, replicas: list[int]) -> Path:
    """A foreground nginx.conf in ``prefix`` that includes deploy/nginx.conf with local
    upstream servers and listen port; pid, logs and temp paths all inside ``prefix``."""
    (prefix / "site.conf").write_text(render_site(listen, replicas))
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


@dataclass
class Fleet:
    url: str  # nginx
    replica_urls: list[str]
    replicas: list[subprocess.Popen[bytes]]


@contextmanager
def replicas_behind_nginx(
    prefix: Path, artifacts: Path, count: int = 2, **env: str
) -> Iterator[Fleet]:
    """``count`` ready replicas serving ``artifacts`` with FUSIONRANK_* ``env``, behind nginx."""
    nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/sbin")
    if nginx is None:
        pytest.skip("nginx is not installed (Debian package nginx, see .ci/debian-packages)")
    ports = [free_port() for _ in range(count)]
    listen = free_port()
    config = render_nginx(prefix, listen, ports)
    command = [nginx, "-p", str(prefix), "-e", str(prefix / "error.log"), "-c", str(config)]
    with ExitStack() as stack:
        replicas = [
            stack.enter_context(stopped_at_exit(start_replica(port, artifacts, **env)))
            for port in ports
        ]
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, replica in zip(urls, replicas, strict=True):
            wait_until_ready(url, replica)
        checked = subprocess.run([*command[:1], "-t", *command[1:]], capture_output=True, text=True)
        assert checked.returncode == 0, checked.stderr
        balancer = stack.enter_context(
            stopped_at_exit(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )
        )
        url = f"http://127.0.0.1:{listen}"
        wait_until_ready(url, balancer, path="/lb-healthz")
        yield Fleet(url, urls, replicas)
