"""The Dockerfile and docker-compose.yml, without a container engine (make compose-test runs
them in one: tests/deploy/test_compose_stack.py):

- a compose implementation's ``config`` validates the compose file (Debian's docker-compose,
  or a compose v2 binary; skipped, saying so, when none is installed);
- the wiring is read back from the file: redis health and no persistence, the one-shot
  artifacts job, the service waiting for both, the gpu profile's device reservation;
- the Dockerfile's stages, user and HEALTHCHECK are read back from it, and the CPU image's
  CMD runs outside Docker with the image's ENV plus the compose file's environment (only
  addresses and paths mapped onto this host), until its HEALTHCHECK command passes.
"""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is in the dev extra")

from service.manifest import resolve_version_dir  # noqa: E402
from tests.deploy.compose import compose_command  # noqa: E402
from tests.service.processes import (  # noqa: E402
    REPO,
    free_port,
    publish_sample,
    redis_server,
    running_service,
    service_environment,
)

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"


# -- compose ---------------------------------------------------------------------------------


def run_compose(command: list[str], compose_file: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in service_environment().items() if k not in ("DATA", "PORT")}
    return subprocess.run(
        [*command, "--project-directory", str(REPO), "-f", str(compose_file), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_compose_config_validates() -> None:
    command = compose_command()
    if command is None:
        pytest.skip(
            "no compose implementation (Debian's docker-compose, .ci/debian-packages, or a "
            "compose v2 binary) is installed to validate docker-compose.yml"
        )
    for profile in ([], ["--profile", "gpu"]):
        done = run_compose(command, COMPOSE_FILE, *profile, "config")
        assert done.returncode == 0, done.stderr
        resolved = yaml.safe_load(done.stdout)
        # (docker-compose 1.x lists profiled services whether or not their profile is on)
        assert {"redis", "artifacts", "service", "lb", "service-gpu"} <= set(resolved["services"])
        assert resolved["services"]["service"]["environment"]["FUSIONRANK_WORKERS"] == "1"


def test_compose_config_rejects_a_broken_file(tmp_path: Path) -> None:
    """The validator validates (a wrapper that always exits 0 would pass anything)."""
    command = compose_command()
    if command is None:
        pytest.skip("no compose implementation is installed (see the test above)")
    broken = yaml.safe_load(COMPOSE_FILE.read_text())
    broken["services"]["service"]["depends_on"]["redis"]["condition"] = "whenever"
    path = tmp_path / "docker-compose.yml"
    path.write_text(yaml.safe_dump(broken))
    assert run_compose(command, path, "config", "-q").returncode != 0


def test_compose_wiring() -> None:
    services = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    redis, artifacts, service, gpu = (
        services[name] for name in ("redis", "artifacts", "service", "service-gpu")
    )
    # redis: healthy when it answers PING; an append-only file on a volume (no RDB snapshots),
    # so a restart finds the published features again.
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert redis["command"] == [
        "redis-server", "--dir", "/data", "--appendonly", "yes", "--save", "",
        "--protected-mode", "no",
    ]  # fmt: skip
    assert redis["volumes"] == ["redis-data:/data"]
    # Images: upstream ones unless a variable names another (make compose-test's local ones).
    assert redis["image"] == "${REDIS_IMAGE:-redis:7-alpine}"
    assert services["lb"]["image"] == "${NGINX_IMAGE:-nginx:1.27-alpine}"
    for name in ("artifacts", "service"):
        assert services[name]["build"]["args"] == {
            "PYTHON_IMAGE": "${PYTHON_IMAGE:-python:3.11-slim-bookworm}"
        }
    # artifacts: one shot (never restarted), the catalogue read-only, publishes into Redis.
    assert artifacts["restart"] == "no" and artifacts["build"]["target"] == "trainer"
    assert artifacts["command"][:3] == ["python", "-m", "export"]
    assert "--redis-url" in artifacts["command"]
    assert "${DATA:-./data/sample}:/data:ro" in artifacts["volumes"]
    # service: waits for a healthy Redis and a finished artifacts job; port 8000; env only.
    assert service["depends_on"] == {
        "redis": {"condition": "service_healthy"},
        "artifacts": {"condition": "service_completed_successfully"},
    }
    # replicas behind nginx: no host port of their own; lb publishes :8000 (deploy/nginx.conf).
    assert "ports" not in service and service["deploy"]["replicas"] == "${REPLICAS:-2}"
    lb = services["lb"]
    assert lb["ports"] == ["${PORT:-8000}:8080"]
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in lb["volumes"]
    assert lb["depends_on"] == {"service": {"condition": "service_healthy"}}
    assert "artifacts:/artifacts:ro" in service["volumes"]
    assert all(key.startswith("FUSIONRANK_") for key in service["environment"])
    assert service["build"]["target"] == "cpu"
    # gpu profile: the same service on the GPU image, with one NVIDIA device reserved.
    assert gpu["profiles"] == ["gpu"] and gpu["build"]["target"] == "gpu"
    assert gpu["environment"]["FUSIONRANK_DEVICE"] == "cuda"
    assert gpu["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]
    assert gpu["depends_on"] == service["depends_on"]


# -- Dockerfile ------------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its (INSTRUCTION, arguments) in order, continuation lines joined."""
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    logical = ""
    for line in DOCKERFILE.read_text().splitlines():
        if not logical and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        instruction, _, arguments = logical.strip().partition(" ")
        logical = ""
        if instruction.upper() == "FROM":
            name = arguments.split(" AS ")[-1].strip() if " AS " in arguments else arguments
            current = stages.setdefault(name, [])
        current.append((instruction.upper(), arguments.strip()))
    return stages


def stage_env(instructions: list[tuple[str, str]]) -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, arguments in instructions:
        if instruction == "ENV":
            for pair in shlex.split(arguments):
                key, _, value = pair.partition("=")
                env[key] = value
    return env


def last(instructions: list[tuple[str, str]], name: str) -> str:
    return [arguments for instruction, arguments in instructions if instruction == name][-1]


def test_dockerfile_stages_user_and_healthcheck() -> None:
    stages = dockerfile_stages()
    assert list(stages)[-1] == "cpu", "the default target (the last stage) is the CPU service"
    assert {"build", "trainer", "gpu", "cpu"} <= set(stages)
    for name in ("trainer", "gpu", "cpu"):
        user = last(stages[name], "USER")
        assert user.split(":")[0] not in ("0", "root"), f"{name} runs as {user}"
    for name in ("gpu", "cpu"):
        assert "service.healthcheck" in last(stages[name], "HEALTHCHECK")
        assert last(stages[name], "EXPOSE") == "8000"
        assert json.loads(last(stages[name], "CMD")) == ["python", "-m", "service"]
    gpu = " ".join(arguments for _, arguments in stages["gpu"])
    assert "CUDA_IMAGE" in last(stages["gpu"], "FROM") and "onnxruntime-gpu" in gpu
    assert "grep -v '^onnxruntime'" in gpu  # never onnxruntime and onnxruntime-gpu together


def test_healthcheck_fails_without_a_service() -> None:
    env = service_environment(FUSIONRANK_HOST="0.0.0.0", FUSIONRANK_PORT=str(free_port()))
    done = subprocess.run(
        [sys.executable, "-m", "service.healthcheck"], cwd=REPO, env=env, capture_output=True
    )
    assert done.returncode == 1 and b"/readyz" in done.stderr


@pytest.mark.slow
def test_image_command_and_env_serve_outside_docker(sample_artifacts: Path, tmp_path: Path) -> None:
    sample_version_dir = resolve_version_dir(sample_artifacts / "models")
    stages = dockerfile_stages()
    command = json.loads(last(stages["cpu"], "CMD"))
    healthcheck = json.loads(last(stages["cpu"], "HEALTHCHECK").split(" CMD ", 1)[1])
    image_env = {k: v for k, v in stage_env(stages["cpu"]).items() if k.startswith("FUSIONRANK")}
    compose_env = yaml.safe_load(COMPOSE_FILE.read_text())["services"]["service"]["environment"]
    with redis_server() as redis:
        publish_sample(sample_artifacts, sample_version_dir, redis.url)  # the artifacts job
        env = {**image_env, **{k: resolve(v) for k, v in compose_env.items()}}
        # Mapped onto this host: the artifacts volume, Redis' address; loopback, not 0.0.0.0.
        env |= {
            "FUSIONRANK_ARTIFACTS_DIR": str(sample_artifacts),
            "FUSIONRANK_REDIS_URL": redis.url,
            "FUSIONRANK_HOST": "127.0.0.1",
        }
        assert command == ["python", "-m", "service"]
        with running_service(tmp_path / "service.log", **env) as service:
            port = service.url.rsplit(":", 1)[1]
            check_env = service_environment(**{**env, "FUSIONRANK_PORT": port})
            check = subprocess.run(
                [sys.executable, *healthcheck[1:]], cwd=REPO, env=check_env, timeout=30
            )
            ranked = httpx.post(f"{service.url}/rank", json={"query": "red tshirt"}, timeout=10)
    assert healthcheck[:3] == ["python", "-m", "service.healthcheck"]
    assert check.returncode == 0
    assert ranked.status_code == 200 and ranked.json()["model_version"] == sample_version_dir.name


def resolve(value: object) -> str:
    """A compose value with ``${NAME:-default}`` taking its default (nothing is set here)."""
    text = str(value)
    if text.startswith("${") and text.endswith("}") and ":-" in text:
        return text[2:-1].split(":-", 1)[1]
    return text
