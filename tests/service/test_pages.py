"""The search page's routes through HTTP (ASGI): the page and its files, GET /items/{id} and
GET /items/{id}/image on the artifacts exported from the sample, and the top item of a /rank
answer resolving through them with either feature store. The page itself is driven in a
browser by test_search_page.py."""

from __future__ import annotations

import csv
import zipfile
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from models.catalogue import images_path
from service.app import create_app
from service.features import EmbeddedFeatureStore, FeatureStore
from service.settings import Settings
from tests.conftest import SAMPLE

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]
Client = Callable[[FastAPI], httpx.AsyncClient]


@pytest.fixture(scope="module")
def products() -> dict[str, dict[str, str]]:
    with (SAMPLE / "products.csv").open(newline="") as f:
        return {row["id"]: row for row in csv.DictReader(f)}


def photo(item_id: str) -> bytes:
    with zipfile.ZipFile(images_path(SAMPLE)) as archive:
        return archive.read(f"{item_id}.jpg")


async def test_the_page_and_its_files(unstarted_client: Client, sample_artifacts: Path) -> None:
    app = create_app(Settings(artifacts_dir=sample_artifacts))
    async with unstarted_client(app) as client:
        page = await client.get("/")
        script = await client.get("/static/page.js")
        style = await client.get("/static/page.css")
        unknown = await client.get("/static/secrets.txt")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    for needle in ('<label for="query">', '<label for="candidates">', '<label for="top-k">'):
        assert needle in page.text
    assert script.status_code == 200 and "/rank" in script.text
    assert script.headers["content-type"].startswith("text/javascript")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")
    assert unknown.status_code == 404 and unknown.json() == {
        "detail": "no static file 'secrets.txt'"
    }


async def test_item_and_photo_while_the_model_still_loads(
    unstarted_client: Client, sample_artifacts: Path, products: dict[str, dict[str, str]]
) -> None:
    """Item routes need the item data only, not a loaded model."""
    app = create_app(Settings(artifacts_dir=sample_artifacts))
    item_id = "1164"
    async with unstarted_client(app) as client:
        item = await client.get(f"/items/{item_id}")
        image = await client.get(f"/items/{item_id}/image")
        again = await client.get(
            f"/items/{item_id}/image", headers={"if-none-match": image.headers["etag"]}
        )
        unknown = await client.get("/items/no-such-id")
        unknown_image = await client.get("/items/no-such-id/image")
    row = products[item_id]
    assert item.status_code == 200
    assert item.json() == {
        "id": item_id,
        "title": row["productDisplayName"],
        "attributes": {
            "gender": row["gender"],
            "masterCategory": row["masterCategory"],
            "subCategory": row["subCategory"],
            "articleType": row["articleType"],
            "baseColour": row["baseColour"],
            "usage": row["usage"],
            "season": row["season"],
        },
        "image": f"/items/{item_id}/image",
    }
    assert image.status_code == 200
    assert image.headers["content-type"] == "image/jpeg"
    assert image.headers["cache-control"].startswith("public, max-age=")
    assert image.content == photo(item_id)
    assert again.status_code == 304 and again.content == b""
    assert unknown.status_code == 404
    assert unknown.json() == {"detail": "no item 'no-such-id'"}
    assert unknown_image.status_code == 404
    assert unknown_image.headers["content-type"] == "application/json"
    assert unknown_image.json() == {"detail": "no photo for item 'no-such-id'"}


async def test_missing_item_data_or_model_is_a_503_that_says_why(
    unstarted_client: Client, sample_artifacts: Path, tmp_path: Path
) -> None:
    without_items = tmp_path / "without-items"
    without_items.mkdir()
    (without_items / "models").symlink_to(sample_artifacts / "models", target_is_directory=True)
    async with unstarted_client(create_app(Settings(artifacts_dir=without_items))) as client:
        no_items = await client.get("/items/1164/image")
    async with unstarted_client(create_app(Settings(artifacts_dir=tmp_path / "empty"))) as client:
        no_model = await client.get("/items/1164")
    assert no_items.status_code == 503
    assert "run `make artifacts`" in no_items.json()["detail"]
    assert no_model.status_code == 503
    assert "CURRENT" in no_model.json()["detail"]


@pytest.mark.parametrize("backend", ["embedded", "redis"])
async def test_the_top_ranked_item_has_a_title_and_photo(
    backend: str,
    request: pytest.FixtureRequest,
    serve: ServeApp,
    sample_artifacts: Path,
    products: dict[str, dict[str, str]],
) -> None:
    store: FeatureStore = (
        request.getfixturevalue("sample_redis_store")
        if backend == "redis"
        else EmbeddedFeatureStore(sample_artifacts / "features")
    )
    app = create_app(Settings(artifacts_dir=sample_artifacts), feature_store=store)
    async with serve(app) as client:
        ranked = await client.post("/rank", json={"query": "red tshirt for men", "top_k": 3})
        assert ranked.status_code == 200, ranked.text
        top = ranked.json()["items"][0]["id"]
        item = await client.get(f"/items/{top}")
        image = await client.get(item.json()["image"])
    assert item.json()["title"] == products[top]["productDisplayName"]
    assert image.content == photo(top)
