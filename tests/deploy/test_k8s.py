"""deploy/k8s/*.yaml parsed with PyYAML and checked for what the project relies on: probes on
the app's /readyz and /healthz at the container's port, settings from a ConfigMap whose keys are
FUSIONRANK_* Settings fields with valid values, selectors that match the pod labels, and an
autoscaler that targets the Deployment."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.app import create_app
from service.features.cluster_store import parse_cluster_url
from service.settings import Settings

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"


@pytest.fixture(scope="module")
def objects() -> dict[str, dict[str, Any]]:
    """Every object in deploy/k8s by kind (one of each)."""
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document is None:
                continue
            assert {"apiVersion", "kind", "metadata"} <= set(document), path
            assert document["kind"] not in found, f"{path}: a second {document['kind']}"
            found[document["kind"]] = document
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "ConfigMap"} <= set(found)
    return found


@pytest.fixture(scope="module")
def container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    containers = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def container_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or Service's port, by number or by the container port's name."""
    by_name = {p["name"]: p["containerPort"] for p in container["ports"]}
    return by_name[port] if isinstance(port, str) else port


def test_probes_hit_the_apps_health_routes_on_the_served_port(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    routes = {getattr(route, "path", None) for route in create_app(Settings()).routes}
    served = int(objects["ConfigMap"]["data"]["FUSIONRANK_PORT"])
    expected = {
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
        "startupProbe": "/healthz",
    }
    for probe, path in expected.items():
        check = container[probe]["httpGet"]
        assert check["path"] == path and path in routes, probe
        assert container_port(container, check["port"]) == served, probe


def test_settings_come_from_the_configmap_and_validate(
    objects: dict[str, dict[str, Any]], container: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    config = objects["ConfigMap"]
    refs = [source["configMapRef"]["name"] for source in container["envFrom"]]
    assert refs == [config["metadata"]["name"]]
    fields = {f"FUSIONRANK_{name.upper()}" for name in Settings.model_fields}
    data = config["data"]
    assert set(data) <= fields, set(data) - fields  # no typo silently ignored... or refused
    assert all(isinstance(value, str) for value in data.values())  # ConfigMap values are strings

    for name in [name for name in os.environ if name.startswith("FUSIONRANK_")]:
        monkeypatch.delenv(name)
    for name, value in data.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises on any invalid value
    assert settings.host == "0.0.0.0"  # reachable on the pod's address, not loopback only
    assert str(settings.artifacts_dir) in {m["mountPath"] for m in container["volumeMounts"]}
    if settings.redis_url and settings.redis_url.startswith("redis+cluster://"):
        assert len(parse_cluster_url(settings.redis_url)[0]) >= 1
    assert settings.admin_token is None  # a secret: never in a ConfigMap

    # SIGTERM comes after preStop; the pod must get to drain before SIGKILL.
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    pause = int(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] > pause + settings.shutdown_timeout_s


def test_selectors_match_the_pod_labels(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    deployment, service = objects["Deployment"], objects["Service"]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    for port in service["spec"]["ports"]:
        served = int(objects["ConfigMap"]["data"]["FUSIONRANK_PORT"])
        assert container_port(container, port["targetPort"]) == served


def test_the_autoscaler_targets_the_deployment(
    objects: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    hpa, deployment = objects["HorizontalPodAutoscaler"], objects["Deployment"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    assert 2 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Resource":
            # Utilisation is a share of the container's request: there must be one.
            assert metric["resource"]["name"] in container["resources"]["requests"]
