"""Zero-downtime model swap through ``POST /admin/reload``, against a real ``python -m service``
under load; and the admin routes' guards (token required, off without one, weak one refused).

The second version is the sample's, copied under another version name (same weights, same
features): a swap of models that read the same published features. A version exported with
other features is refused, naming both feature versions, and the old model keeps serving.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.manifest import MANIFEST_FILE, load_manifest
from service.settings import Settings
from tests.service.processes import (
    REPO,
    Load,
    rank_bodies,
    report,
    running_service,
    service_environment,
    summary,
)

TOKEN = secrets.token_urlsafe(32)


def add_version(models: Path, source: Path, name: str, **manifest_changes: object) -> Path:
    """A version directory ``name`` whose files link to ``source``'s, with its own manifest."""
    target = models / name
    target.mkdir()
    for path in source.iterdir():
        if path.name != MANIFEST_FILE:
            os.symlink(path, target / path.name)
    manifest = json.loads((source / MANIFEST_FILE).read_text())
    manifest.update(version=name, **manifest_changes)
    (target / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2))
    return target


def artifacts_with_versions(sample_artifacts: Path, version_dir: Path, root: Path) -> Path:
    """artifacts/: the sample's version (CURRENT), ``<v>-b`` (same features) and ``<v>-x``
    (exported with other features, laid out otherwise), and the sample's published features."""
    artifacts = root / "artifacts"
    models = artifacts / "models"
    models.mkdir(parents=True)
    os.symlink(version_dir, models / version_dir.name)
    (models / "CURRENT").write_text(version_dir.name)
    os.symlink(sample_artifacts / "features", artifacts / "features")
    add_version(models, version_dir, f"{version_dir.name}-b")
    layout = load_manifest(version_dir).feature_layout
    add_version(
        models,
        version_dir,
        f"{version_dir.name}-x",
        features_version="f-retrained",
        feature_layout={**layout, "image_dims": layout["image_dims"] // 2},
    )
    return artifacts


@pytest.mark.slow
def test_reload_under_load_fails_no_request(
    sample_artifacts: Path, sample_version_dir: Path, tmp_path: Path
) -> None:
    artifacts = artifacts_with_versions(sample_artifacts, sample_version_dir, tmp_path)
    old, new = sample_version_dir.name, f"{sample_version_dir.name}-b"
    features = load_manifest(sample_version_dir).features_version
    env = {"FUSIONRANK_ARTIFACTS_DIR": str(artifacts), "FUSIONRANK_ADMIN_TOKEN": TOKEN}
    auth = {"authorization": f"Bearer {TOKEN}"}
    with (
        running_service(tmp_path / "service.log", **env) as service,
        httpx.Client(base_url=service.url, timeout=60) as admin,
        Load(service.url, clients=3, bodies=rank_bodies()) as load,
    ):
        load.wait_for(200, time.perf_counter())
        time.sleep(0.5)
        no_token = admin.post("/admin/reload", json={"version": new})
        wrong_token = admin.post(
            "/admin/reload", json={"version": new}, headers={"authorization": "Bearer nope"}
        )
        asked = time.perf_counter()
        swapped = admin.post("/admin/reload", json={"version": new}, headers=auth)
        answered = time.perf_counter()
        load.wait_for(200, answered)
        time.sleep(0.5)
        refused = admin.post("/admin/reload", json={"version": f"{old}-x"}, headers=auth)
        missing = admin.post("/admin/reload", json={"version": "no-such-version"}, headers=auth)
        traversal = admin.post("/admin/reload", json={"version": "../models"}, headers=auth)
        refused_at = time.perf_counter()
        load.wait_for(200, refused_at)
        time.sleep(0.3)
        ready = admin.get("/readyz").json()
        outcomes = load.stop()

    during = [o for o in outcomes if o.sent < answered and o.done > asked]
    report(
        "model_swap",
        outcomes,
        during_swap=len(during),
        swap_seconds=round(answered - asked, 2),
        load_seconds=swapped.json().get("load_seconds"),
    )
    assert no_token.status_code == 401 and wrong_token.status_code == 401
    assert swapped.status_code == 200, swapped.text
    assert swapped.json() == {
        "model_version": new,
        "previous_version": old,
        "features_version": features,
        "load_seconds": swapped.json()["load_seconds"],
        "drained": True,
    }
    counts = summary(outcomes)
    assert counts["failed"] == 0 and counts["lost"] == 0, counts
    assert during, "requests were in flight during the swap"
    # Every response names the model that scored it: the old one for everything answered
    # before the reload was asked, the new one for everything sent after it answered. (Ordering
    # by the client's receive time says nothing in between: an old-model answer can reach its
    # client a moment after a new-model answer reached another client.)
    assert {o.model_version for o in outcomes} == {old, new}
    assert all(o.model_version == old for o in outcomes if o.done < asked)
    assert all(o.model_version == new for o in outcomes if o.sent > answered)

    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert "f-retrained" in detail and features in detail, detail
    assert "still serving the previous model" in detail
    assert missing.status_code == 409 and "no such model version" in missing.json()["detail"]
    assert traversal.status_code == 422
    assert all(o.model_version == new for o in outcomes if o.sent > refused_at)
    assert ready["model_version"] == new and ready["ready"] is True


@pytest.mark.anyio
async def test_admin_routes_are_off_without_a_token(
    tmp_path: Path, unstarted_client: Callable[[FastAPI], httpx.AsyncClient]
) -> None:
    app = create_app(Settings(artifacts_dir=tmp_path))
    async with unstarted_client(app) as client:
        response = await client.post("/admin/reload", headers={"authorization": "Bearer x"})
        schema = (await client.get("/openapi.json")).json()
    assert response.status_code == 404
    assert not [path for path in schema["paths"] if path.startswith("/admin")]


@pytest.mark.anyio
async def test_admin_reload_before_the_model_loaded_is_503(
    tmp_path: Path, unstarted_client: Callable[[FastAPI], httpx.AsyncClient]
) -> None:
    app = create_app(Settings(artifacts_dir=tmp_path, admin_token=TOKEN))
    async with unstarted_client(app) as client:
        response = await client.post("/admin/reload", headers={"authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 503


@pytest.mark.parametrize(
    ("token", "workers", "message"),
    [
        ("changeme", "1", "admin_token is weak"),
        ("a1" * 20, "1", "admin_token is weak"),
        (TOKEN, "2", "admin_token needs workers = 1"),
    ],
    ids=["short", "few-distinct-characters", "several-workers"],
)
def test_the_service_refuses_to_start_with_a_weak_token(
    token: str, workers: str, message: str, tmp_path: Path
) -> None:
    env = service_environment(
        FUSIONRANK_ARTIFACTS_DIR=str(tmp_path),
        FUSIONRANK_ADMIN_TOKEN=token,
        FUSIONRANK_WORKERS=workers,
        FUSIONRANK_PORT="1",  # never bound: it must not get that far
    )
    done = subprocess.run(
        [sys.executable, "-m", "service"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert message in done.stderr
    assert token not in done.stderr  # the error never echoes the token
