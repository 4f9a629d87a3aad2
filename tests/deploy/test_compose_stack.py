"""``docker compose up`` for real: images built from the project's Dockerfile, the whole stack
in containers, requests through nginx, and faults on the running containers.

Run by ``make compose-test`` (it installs and starts dockerd where it can); everywhere else
(``make test`` included) the module skips, saying why, since it needs root, a Docker engine
and several minutes. What it does:

1. base images from Debian's packages (``deploy/local-images.sh``: no registry is needed);
2. ``docker build`` of the ``cpu`` and ``trainer`` targets (BuildKit, host network; this
   machine's torch CPU wheel is served to the trainer build over loopback when pip has one);
3. ``docker compose up`` with ``docker-compose.yml`` plus ``compose.stack-test.yml`` (host
   network, free ports, local images) and a copy of ``service`` as a second replica;
4. checks: Redis healthy, the artifacts job exited 0, both replicas healthy, /rank through
   nginx ranks as ``make demo``'s build of the same sample does, the search page is served;
5. faults: ``docker kill`` of a replica under an open-loop stream, ``compose restart redis``,
   and ``compose down -v`` leaving no container, volume or network behind.

Each step prints a ``STACK`` line with its figures (``pytest -s``), collected for the README.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.deploy.compose import compose_command
from tests.service.fleet import render_site
from tests.service.processes import (
    REPO,
    PacedLoad,
    free_port,
    rank_bodies,
    running_service,
    summary,
)

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")

ENABLED = os.environ.get("FUSIONRANK_COMPOSE_TEST") == "1"
pytestmark = [
    pytest.mark.compose,
    pytest.mark.skipif(
        not ENABLED,
        reason="the container stack runs under `make compose-test` (root, a Docker engine, "
        "minutes of image builds)",
    ),
]

PROJECT = "fusionrank-compose-test"
OVERRIDE = Path(__file__).with_name("compose.stack-test.yml")
SAMPLE = REPO / "data" / "sample"
PYTHON_IMAGE = "fusionrank-local/python:3.11-bookworm"
REDIS_IMAGE = "fusionrank-local/redis:bookworm"
NGINX_IMAGE = "fusionrank-local/nginx:bookworm"
SERVICE_IMAGE = "fusionrank:compose-test"
TRAINER_IMAGE = "fusionrank-trainer:compose-test"
REPLICAS = ("service", "service-2")
QUERIES = ["red tshirt for men", "black watch", "women heels", "blue jeans", "sports shoes"]
WHEELS_PORT = 45151  # served_find_links()
UP_TIMEOUT_S = 900  # the artifacts job trains on the sample inside it
READY_TIMEOUT_S = 180


def stack_line(name: str, figures: dict) -> None:
    print(f"\nSTACK {name}: {json.dumps(figures)}")


# -- the engine ------------------------------------------------------------------------------


def run(command: list[str], timeout: float = 600, **kwargs) -> subprocess.CompletedProcess:
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, **kwargs)
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(command)} exited {done.returncode}:\n{done.stdout[-4000:]}\n"
            f"{done.stderr[-4000:]}"
        )
    return done


@functools.cache
def docker_client() -> str:
    """A docker client that reaches the engine, or the reason to skip."""
    if shutil.which("docker") is None:
        pytest.skip("no docker client (make compose-test installs Debian's docker.io)")
    probe = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"no Docker engine answers (`docker info`: {probe.stderr.strip()[:300]})")
    return "docker"


def buildkit_client() -> str:
    """A client that builds with BuildKit, which builds only the stages a target needs (the
    classic builder would build the GPU stage too, whose CUDA base image is out of reach):
    one with the buildx plugin, or a client older than 23 (BuildKit built in)."""
    candidates = [shutil.which("docker"), "/usr/bin/docker"]
    for client in dict.fromkeys(c for c in candidates if c and Path(c).is_file()):
        if subprocess.run([client, "buildx", "version"], capture_output=True).returncode == 0:
            return client
        version = subprocess.run(
            [client, "version", "--format", "{{.Client.Version}}"], capture_output=True, text=True
        ).stdout.strip()
        if version and int(version.split(".")[0]) < 23:
            return client
    pytest.skip("no docker client builds with BuildKit (buildx plugin, or Debian's docker.io)")


def stack_compose_command() -> list[str]:
    command = compose_command()
    if command is None:
        pytest.skip("no compose implementation (Debian's docker-compose or the compose plugin)")
    return command


def image_size_mb(image: str) -> float:
    size = run([docker_client(), "image", "inspect", "--format", "{{.Size}}", image]).stdout
    return round(int(size) / 1e6, 1)


class QuietFileHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # pip asks once per package
        pass


@contextlib.contextmanager
def served_find_links() -> Iterator[str | None]:
    """This machine's pip find-links folder (its torch CPU wheel), served over loopback for
    the trainer build (host network); None when pip names no local folder."""
    listed = subprocess.run(
        [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True
    ).stdout
    folders = [
        line.split("=", 1)[1].strip("'")
        for line in listed.splitlines()
        if line.split("=", 1)[0].endswith(".find-links")
    ]
    folder = next((f for f in folders if Path(f).is_dir()), None)
    if folder is None:
        yield None
        return
    handler = functools.partial(QuietFileHandler, directory=folder)
    try:  # a fixed address keeps the build argument, and so BuildKit's cached layers, the same
        server = http.server.ThreadingHTTPServer(("127.0.0.1", WHEELS_PORT), handler)
    except OSError:
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()


# -- the stack -------------------------------------------------------------------------------


@dataclass
class Stack:
    compose: list[str]
    env: dict[str, str]
    lb_url: str
    replica_urls: dict[str, str]  # compose service -> its own address
    figures: dict = field(default_factory=dict)

    def __call__(self, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return run([*self.compose, *args], timeout=timeout, cwd=REPO, env=self.env)

    def container(self, service: str) -> str:
        ids = self("ps", "-q", service).stdout.split()
        assert len(ids) == 1, f"{service}: containers {ids}"
        return ids[0]

    def inspect(self, service: str) -> dict:
        """``docker inspect`` of the service's one container."""
        return json.loads(run([docker_client(), "inspect", self.container(service)]).stdout)[0]

    def state(self, service: str) -> dict:
        inspected = self.inspect(service)
        return inspected["State"] | {"RestartCount": inspected["RestartCount"]}

    def wait_healthy(self, service: str, timeout_s: float = READY_TIMEOUT_S) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            state = self.state(service)
            if state.get("Health", {}).get("Status") == "healthy":
                return time.monotonic() - started
            time.sleep(0.5)
        logs = self("logs", "--tail", "40", service).stdout
        pytest.fail(f"{service} not healthy after {timeout_s} s: {state}\n{logs}")


def write_host_network_services(stack_env: dict[str, str], files: list[str], path: Path) -> None:
    """``service-2``: ``service`` exactly as compose resolves it, on its own port; ``lb-host``:
    ``lb`` as resolved, without its published port and its profile, behind both replicas."""
    config = run([*stack_compose_command(), *files, "config"], env=stack_env).stdout
    resolved = yaml.safe_load(config)
    replica = resolved["services"]["service"]
    replica["environment"]["FUSIONRANK_PORT"] = stack_env["STACK_REPLICA_2_PORT"]
    replica.pop("deploy", None)
    lb = resolved["services"]["lb"]
    for key in ("ports", "profiles"):
        lb.pop(key, None)
    lb["depends_on"] = {name: {"condition": "service_healthy"} for name in REPLICAS}
    path.write_text(yaml.safe_dump({"services": {"service-2": replica, "lb-host": lb}}))


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    docker_client()  # skips, saying why, where no engine answers
    compose = stack_compose_command()
    work = tmp_path_factory.mktemp("compose-stack")
    figures: dict = {}

    started = time.monotonic()
    built = run(["bash", str(REPO / "deploy" / "local-images.sh")], timeout=900)
    figures["base_images_s"] = round(time.monotonic() - started, 1)
    figures["base_images_log"] = built.stdout.strip().splitlines()

    builder = buildkit_client()
    with served_find_links() as find_links:
        for target, tag in (("cpu", SERVICE_IMAGE), ("trainer", TRAINER_IMAGE)):
            extra = ["--build-arg", f"PIP_FIND_LINKS={find_links}"] if find_links else []
            started = time.monotonic()
            run(
                [builder, "build", "--network", "host", "--target", target, "-t", tag,
                 "--build-arg", f"PYTHON_IMAGE={PYTHON_IMAGE}", *extra, str(REPO)],
                timeout=1800,
                env={**os.environ, "DOCKER_BUILDKIT": "1"},
            )  # fmt: skip
            figures[f"build_{target}_s"] = round(time.monotonic() - started, 1)
    figures["image_mb"] = {
        image: image_size_mb(image)
        for image in (PYTHON_IMAGE, REDIS_IMAGE, NGINX_IMAGE, SERVICE_IMAGE, TRAINER_IMAGE)
    }

    ports = {name: str(free_port()) for name in ("REDIS", "REPLICA_1", "REPLICA_2", "LB")}
    nginx_conf = work / "nginx-site.conf"
    replica_ports = [int(ports["REPLICA_1"]), int(ports["REPLICA_2"])]
    nginx_conf.write_text(render_site(int(ports["LB"]), replica_ports))
    nginx_conf.chmod(0o644)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")}
    env.update(
        {f"STACK_{name}_PORT": port for name, port in ports.items()},
        STACK_NGINX_CONF=str(nginx_conf),
        COMPOSE_PROJECT_NAME=PROJECT,
        DATA=str(SAMPLE),
        REPLICAS="1",
        PYTHON_IMAGE=PYTHON_IMAGE,
        REDIS_IMAGE=REDIS_IMAGE,
        NGINX_IMAGE=NGINX_IMAGE,
        SERVICE_IMAGE=SERVICE_IMAGE,
        TRAINER_IMAGE=TRAINER_IMAGE,
    )
    files = ["-f", str(REPO / "docker-compose.yml"), "-f", str(OVERRIDE)]
    write_host_network_services(env, files, work / "host-network.yml")
    files += ["-f", str(work / "host-network.yml")]
    stack = Stack(
        compose=[*compose, "--project-directory", str(REPO), *files],
        env=env,
        lb_url=f"http://127.0.0.1:{ports['LB']}",
        replica_urls={
            name: f"http://127.0.0.1:{ports[port]}"
            for name, port in zip(REPLICAS, ("REPLICA_1", "REPLICA_2"), strict=True)
        },
        figures=figures,
    )
    stack("down", "-v", "--remove-orphans")  # what an interrupted run left
    try:
        started = time.monotonic()
        stack("up", "-d", "--no-build", timeout=UP_TIMEOUT_S)
        figures["up_returned_s"] = round(time.monotonic() - started, 1)
        for name in (*REPLICAS, "lb-host"):
            stack.wait_healthy(name)
        wait_ready_through(stack.lb_url, len(stack.replica_urls))
        figures["up_to_ready_s"] = round(time.monotonic() - started, 1)
        figures["artifacts_job_s"] = job_seconds(stack.state("artifacts"))
        stack_line("up", figures)
        yield stack
    finally:
        with contextlib.suppress(Exception):
            print(stack("logs", "--tail", "15").stdout[-6000:])
        if stack.figures.get("down") is None:
            stack("down", "-v", "--remove-orphans")


def job_seconds(state: dict) -> float:
    def moment(text: str) -> datetime:
        return datetime.fromisoformat(text[:26].rstrip("Z") + "+00:00")

    return round((moment(state["FinishedAt"]) - moment(state["StartedAt"])).total_seconds(), 1)


def wait_ready_through(lb_url: str, replicas: int, timeout_s: float = READY_TIMEOUT_S) -> None:
    """Until nginx answers /readyz 200 from each of ``replicas`` distinct upstreams."""
    answered: set[str] = set()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and len(answered) < replicas:
        try:
            response = httpx.get(f"{lb_url}/readyz", timeout=5)
        except httpx.TransportError:
            response = None
        if response is not None and response.status_code == 200:
            answered.add(response.headers["x-upstream"].split(",")[-1].strip())
        else:
            time.sleep(0.3)
    assert len(answered) == replicas, f"ready through nginx: {answered}"


# -- the running stack -----------------------------------------------------------------------


def test_every_part_is_up(stack: Stack) -> None:
    redis = stack.state("redis")
    assert redis["Running"] and redis["Health"]["Status"] == "healthy"
    job = stack.state("artifacts")
    assert job["Status"] == "exited" and job["ExitCode"] == 0
    logs = stack("logs", "artifacts").stdout
    assert "current model:" in logs, logs[-2000:]
    port = stack.env["STACK_REDIS_PORT"]
    keys = run([docker_client(), "exec", stack.container("redis"), "redis-cli", "-p", port,
                "dbsize"]).stdout  # fmt: skip
    assert int(keys) > len((SAMPLE / "products.csv").read_text().splitlines()) - 10, keys
    for replica, url in stack.replica_urls.items():
        assert stack.state(replica)["Health"]["Status"] == "healthy"
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
    assert httpx.get(f"{stack.lb_url}/lb-healthz", timeout=5).text == "ok\n"


def test_rank_through_nginx_matches_make_demo(stack: Stack, tmp_path: Path) -> None:
    """``make demo`` builds the sample with ``python -m export --data data/sample --out
    artifacts`` and serves it: the same here, on this host, into a folder of the test's."""
    out = tmp_path / "artifacts"
    run(
        [sys.executable, "-m", "export", "--data", str(SAMPLE), "--out", str(out)],
        timeout=900,
        cwd=REPO,
        env={k: v for k, v in os.environ.items() if not k.startswith("FUSIONRANK_")},
    )
    stacked: dict[str, list[str]] = {}
    with httpx.Client(base_url=stack.lb_url, timeout=10) as http:
        for query in QUERIES:
            response = http.post("/rank", json={"query": query, "top_k": 5})
            assert response.status_code == 200, response.text
            stacked[query] = [item["id"] for item in response.json()["items"]]
            stack_version = response.json()["model_version"]
    demo: dict[str, list[str]] = {}
    with running_service(tmp_path / "demo.log", FUSIONRANK_ARTIFACTS_DIR=str(out)) as demo_service:
        for query in QUERIES:
            response = httpx.post(
                f"{demo_service.url}/rank", json={"query": query, "top_k": 5}, timeout=10
            )
            demo[query] = [item["id"] for item in response.json()["items"]]
            demo_version = response.json()["model_version"]
    stack_line(
        "rank",
        {
            "stack_version": stack_version,
            "demo_version": demo_version,
            "same_top_1": sum(stacked[q][0] == demo[q][0] for q in QUERIES),
            "same_top_5": sum(stacked[q] == demo[q] for q in QUERIES),
            "queries": len(QUERIES),
        },
    )
    assert {q: stacked[q][0] for q in QUERIES} == {q: demo[q][0] for q in QUERIES}


def test_search_page_is_served_through_nginx(stack: Stack) -> None:
    page = httpx.get(f"{stack.lb_url}/", timeout=10)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "<form" in page.text and "fusionrank" in page.text.lower()


def test_killing_a_replica_container_fails_no_request(stack: Stack) -> None:
    victim, survivor = "service-2", "service"
    victim_address = stack.replica_urls[victim].removeprefix("http://")
    survivor_address = stack.replica_urls[survivor].removeprefix("http://")
    with PacedLoad(stack.lb_url, rate=40, bodies=rank_bodies(), duration_s=9) as load:
        time.sleep(3)
        killed_at = time.perf_counter()
        run([docker_client(), "kill", stack.container(victim)])
        time.sleep(6)
        outcomes = load.stop()
    counts = summary(outcomes)
    upstreams = Counter(
        ("before" if o.sent < killed_at else "after", o.upstream.split(",")[-1].strip())
        for o in outcomes
        if o.status == 200
    )
    stack.figures["kill"] = {
        **counts,
        "rate_per_s": 40,
        "killed_after_s": 3,
        "load_s": 9,
        "served": {f"{phase} {address}": n for (phase, address), n in upstreams.items()},
        "retried_by_nginx": sum("," in o.upstream for o in outcomes),
        "victim_restarted_by_docker": stack.state(victim)["Running"],
    }
    stack_line("kill", stack.figures["kill"])
    assert counts["sent"] >= 300 and counts["failed"] == 0 and counts["lost"] == 0, counts
    assert upstreams[("before", victim_address)] > 0 and upstreams[("before", survivor_address)] > 0
    assert upstreams[("after", survivor_address)] > 0
    # Bring the replica back for what follows (compose restarts it or starts it again).
    stack("up", "-d", "--no-build", "--no-deps", victim)
    stack.wait_healthy(victim)
    wait_ready_through(stack.lb_url, len(stack.replica_urls))


def test_redis_restart_is_survived_without_restarting_the_service(stack: Stack) -> None:
    before = {name: stack.state(name) for name in stack.replica_urls}
    with PacedLoad(stack.lb_url, rate=20, bodies=rank_bodies(), duration_s=30) as load:
        time.sleep(2)
        restarted_at = time.perf_counter()
        stack("restart", "redis")
        restart_s = time.perf_counter() - restarted_at
        stack.wait_healthy("redis")
        time.sleep(5)
        outcomes = load.stop()
    after_restart = [o for o in outcomes if o.sent >= restarted_at + restart_s]
    first_ok = min((o.sent for o in after_restart if o.status == 200), default=None)
    stack.figures["redis_restart"] = {
        **summary(outcomes),
        "restart_command_s": round(restart_s, 1),
        "first_200_after_restart_s": None
        if first_ok is None
        else round(first_ok - restarted_at, 2),
        "after_restart": summary(after_restart),
    }
    stack_line("redis_restart", stack.figures["redis_restart"])
    assert first_ok is not None, stack.figures["redis_restart"]
    # Features came back from the append-only file: the last seconds answer 200 throughout.
    last_sent = max(o.sent for o in outcomes)
    tail = [o for o in outcomes if o.sent >= last_sent - 3]
    assert tail and all(o.status == 200 for o in tail), summary(tail)
    for name, url in stack.replica_urls.items():
        state = stack.state(name)
        assert state["StartedAt"] == before[name]["StartedAt"], f"{name} was restarted"
        assert state["RestartCount"] == before[name]["RestartCount"]
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200


def test_down_v_leaves_nothing_behind(stack: Stack) -> None:
    docker = docker_client()
    started = time.monotonic()
    stack("down", "-v", "--remove-orphans", timeout=120)
    stack.figures["down"] = round(time.monotonic() - started, 1)
    label = f"label=com.docker.compose.project={PROJECT}"
    left = {
        "container": run([docker, "ps", "-aq", "--filter", label]).stdout.split(),
        **{
            kind: run([docker, kind, "ls", "-q", "--filter", label]).stdout.split()
            for kind in ("volume", "network")
        },
    }
    stack_line("down", {"seconds": stack.figures["down"], "left": left})
    assert left == {"container": [], "volume": [], "network": []}
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{stack.lb_url}/lb-healthz", timeout=2)
