"""Search controls of POST /rank through HTTP: attribute filters (given candidates, and inside
the FAISS search), boosts, diversity, and the 422s of a malformed control. The reference for
what matches is the catalogue file itself (models.catalogue), and for filtered retrieval an
exact brute-force search over the index's own vectors with the exported query encoder."""

from __future__ import annotations

import base64
import io
import struct
import zipfile
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import faiss
import httpx
import numpy as np
import onnxruntime as ort
import pytest
from fastapi import FastAPI
from PIL import Image

from models.catalogue import Product, images_path, load_catalogue
from models.encoders import image_to_pixels
from service.app import create_app
from service.settings import Settings
from tests.service.test_rank_api import Reference

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

ServeApp = Callable[[FastAPI], AbstractAsyncContextManager[httpx.AsyncClient]]
SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


@pytest.fixture(scope="module")
def products() -> dict[str, Product]:
    return {p.id: p for p in load_catalogue(SAMPLE)}


@pytest.fixture(scope="module")
def reference(sample_artifacts: Path, sample_version_dir: Path) -> Reference:
    return Reference(sample_artifacts, sample_version_dir)


@pytest.fixture(scope="module")
async def client(serve: ServeApp, sample_artifacts: Path) -> AsyncIterator[httpx.AsyncClient]:
    async with serve(create_app(Settings(artifacts_dir=sample_artifacts))) as client:
        assert (await client.get("/readyz")).status_code == 200
        yield client


async def rank(client: httpx.AsyncClient, **body: object) -> dict:
    response = await client.post("/rank", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def men_but_not_tshirts(p: Product) -> bool:
    return p.gender in ("Men", "Unisex") and p.article_type != "Tshirts"


async def test_filters_drop_given_candidates_that_do_not_match_and_count_them(
    client: httpx.AsyncClient, reference: Reference, products: dict[str, Product]
) -> None:
    ids = reference.ids[:300]
    body = {
        "query": "shirt for men",
        "candidate_ids": [*ids, "no-such-id"],
        "top_k": 400,
        "filters": {"gender": ["Men", "Unisex"], "articleType": {"not": ["Tshirts"]}},
    }
    answer = await rank(client, **body)
    matching = [i for i in ids if men_but_not_tshirts(products[i])]
    assert 0 < len(matching) < len(ids)
    assert sorted(item["id"] for item in answer["items"]) == sorted(matching)
    assert answer["filtered_out"] == len(ids) - len(matching) + 1  # the unknown id too
    assert answer["missing_ids"] == []
    unfiltered = await rank(client, query="shirt for men", candidate_ids=ids, top_k=400)
    assert unfiltered["filtered_out"] == 0
    scores = {item["id"]: item["score"] for item in unfiltered["items"]}
    assert all(item["score"] == scores[item["id"]] for item in answer["items"])


@pytest.mark.parametrize(
    ("filters", "matches"),
    [
        ({"gender": "Women", "masterCategory": "Footwear"},
         lambda p: p.gender == "Women" and p.master_category == "Footwear"),
        ({"baseColour": ["Red", "Maroon"], "usage": {"not": ["Sports"]}},
         lambda p: p.colour in ("Red", "Maroon") and p.usage != "Sports"),
        ({"articleType": "Watches", "year": {"gte": 2016}},
         lambda p: p.article_type == "Watches" and (p.year or 0) >= 2016),
    ],
    ids=["women-footwear", "red-not-sports", "watches-since-2016"],
)  # fmt: skip
async def test_filtered_retrieval_is_the_exact_filtered_top_k(
    client: httpx.AsyncClient,
    reference: Reference,
    products: dict[str, Product],
    filters: dict,
    matches: Callable[[Product], bool],
) -> None:
    query, k = "something nice to wear", 40
    answer = await rank(client, query=query, retrieve_k=k, top_k=k, filters=filters)
    got = [item["id"] for item in answer["items"]]

    allowed = np.array([matches(products[i]) for i in reference.ids])
    vectors = reference.index.reconstruct_n(0, reference.index.ntotal)
    scores = vectors @ reference.encode(query)[1][0].astype(np.float32)
    scores[~allowed] = -np.inf
    exact = [reference.ids[r] for r in np.argsort(-scores, kind="stable")[: min(k, allowed.sum())]]
    assert all(matches(products[i]) for i in got)
    assert len(got) == min(k, int(allowed.sum()))  # k whenever that many exist
    assert set(got) == set(exact)


async def test_boosts_add_to_the_model_score_and_show_in_explain(
    client: httpx.AsyncClient, reference: Reference, products: dict[str, Product]
) -> None:
    ids = reference.ids[:200]
    plain = await rank(client, query="shoes", candidate_ids=ids, top_k=200)
    boosted = await rank(
        client,
        query="shoes",
        candidate_ids=ids,
        top_k=200,
        explain=True,
        boosts=[{"if": {"usage": "Sports"}, "add": 50.0}, {"if": {"gender": "Men"}, "add": -1.5}],
    )
    base = {item["id"]: item["score"] for item in plain["items"]}
    for item in boosted["items"]:
        p = products[item["id"]]
        expected = 50.0 * (p.usage == "Sports") - 1.5 * (p.gender == "Men")
        assert item["boost"] == pytest.approx(expected)
        assert item["score"] == pytest.approx(base[item["id"]] + expected, abs=1e-4)
    sports = [products[i["id"]].usage == "Sports" for i in boosted["items"]]
    assert any(sports) and sports == sorted(sports, reverse=True)  # every Sports item first


async def test_diversity_caps_a_value_greedily_and_stably(
    client: httpx.AsyncClient, reference: Reference, products: dict[str, Product]
) -> None:
    ids = reference.ids[:400]
    full = await rank(client, query="blue tshirt for men", candidate_ids=ids, top_k=400)
    capped = await rank(
        client,
        query="blue tshirt for men",
        candidate_ids=ids,
        top_k=12,
        diversity={"max_per": {"articleType": 2}},
    )
    got = [item["id"] for item in capped["items"]]
    counts = Counter(products[i].article_type for i in got)
    assert len(got) == 12 and max(counts.values()) <= 2
    expected, seen = [], Counter()  # the same greedy pass over the uncapped ranking
    for item in full["items"]:
        kind = products[item["id"]].article_type
        if seen[kind] < 2:
            seen[kind] += 1
            expected.append(item["id"])
    assert got == expected[:12]


@pytest.mark.parametrize(
    ("controls", "path"),
    [
        ({"filters": {"colour": "Red"}}, ["body", "filters", "colour"]),
        ({"filters": {"gender": {"in": ["Men"]}}}, ["body", "filters", "gender", "NotOneOf", "in"]),
        ({"filters": {"year": "2015"}}, ["body", "filters", "year", "int"]),
        ({"filters": {"gender": []}}, ["body", "filters", "gender", "list[str]"]),
        ({"boosts": [{"if": {"usage": "Sports"}, "add": "1"}]}, ["body", "boosts", 0, "add"]),
        ({"diversity": {"max_per": {"brand": 2}}}, ["body", "diversity", "max_per", "brand"]),
        ({"diversity": {"max_per": {"usage": 0}}}, ["body", "diversity", "max_per", "usage"]),
    ],
    ids=["unknown-attribute", "unknown-operator", "wrong-type", "empty-list", "boost-type",
         "diversity-attribute", "diversity-zero"],
)  # fmt: skip
async def test_a_malformed_control_is_a_422_naming_its_path(
    client: httpx.AsyncClient, controls: dict, path: list
) -> None:
    response = await client.post("/rank", json={"query": "red shirt", **controls})
    assert response.status_code == 422, response.text
    locations = [error["loc"][: len(path)] for error in response.json()["detail"]]
    assert path in locations, locations


async def test_like_id_ranks_by_similarity_to_the_items_own_vectors(
    client: httpx.AsyncClient, reference: Reference, products: dict[str, Product]
) -> None:
    item = reference.ids[10]
    answer = await rank(client, like_id=item, retrieve_k=50, top_k=50, explain=True)
    got = [entry["id"] for entry in answer["items"]]
    assert item not in got and len(got) == 50

    # The reference: the item's stored vector, retrieved by inner product over the index,
    # ranked by cosine; text and image parts add up to the score.
    features = reference.store.fetch(reference.ids).matrix.astype(np.float32)
    vector = features[10]
    by_dot = np.argsort(-(reference.index.reconstruct_n(0, len(reference.ids)) @ vector))
    pool = [reference.ids[r] for r in by_dot[:51].tolist() if reference.ids[r] != item][:50]
    assert set(got) == set(pool)
    cosine = features @ vector / (np.linalg.norm(features, axis=1) * np.linalg.norm(vector))
    row = {i: n for n, i in enumerate(reference.ids)}
    for entry in answer["items"]:
        assert entry["score"] == pytest.approx(float(cosine[row[entry["id"]]]), abs=1e-5)
        assert entry["text_contribution"] + entry["image_contribution"] == pytest.approx(
            entry["score"], abs=1e-5
        )
    scores = [entry["score"] for entry in answer["items"]]
    assert scores == sorted(scores, reverse=True)

    # With a query, the ranker orders the similar items; filters still apply.
    kind = products[item].article_type
    ranked = await rank(
        client, like_id=item, query="for men", retrieve_k=50, filters={"articleType": kind}
    )
    assert ranked["items"] and all(
        products[e["id"]].article_type == kind and e["id"] != item for e in ranked["items"]
    )


async def test_like_id_of_an_unknown_item_is_a_422_naming_it(client: httpx.AsyncClient) -> None:
    response = await client.post("/rank", json={"like_id": "no-such-item"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "like_id"]
    assert "no-such-item" in response.json()["detail"][0]["msg"]
    neither = await client.post("/rank", json={"top_k": 3})
    assert neither.status_code == 422
    assert neither.json()["detail"][0]["loc"] == ["body", "query"]


def photo_of(item_id: str) -> str:
    """A catalogue photo (60x80 JPEG) as a request's base64 image."""
    with zipfile.ZipFile(images_path(SAMPLE)) as archive:
        return base64.b64encode(archive.read(f"{item_id}.jpg")).decode()


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt)
    return out.getvalue()


async def test_a_products_own_photo_finds_that_product_first(
    client: httpx.AsyncClient, reference: Reference
) -> None:
    hits = 0
    items = reference.ids[::300][:8]
    for item in items:
        answer = await rank(client, image=photo_of(item), retrieve_k=50, top_k=5, explain=True)
        entries = answer["items"]
        assert all(e["text_contribution"] == 0 for e in entries)  # a photo has no text part
        assert entries[0]["score"] == pytest.approx(entries[0]["image_contribution"])
        hits += item in [e["id"] for e in entries[:1]]
    assert hits >= len(items) - 1, hits  # duplicate photos may tie with the product

    # A query and filters combine with the photo: the photo retrieves, the model ranks.
    with_text = await rank(
        client, image=photo_of(items[0]), query="for women", filters={"gender": "Women"}
    )
    assert with_text["items"]


async def test_a_photo_is_ranked_by_the_exported_photo_head_over_the_photo_index(
    client: httpx.AsyncClient, reference: Reference, sample_version_dir: Path
) -> None:
    """An independent reference: the exporter's own preprocessing (models.encoders, PIL), the
    exported image_encoder and photo_head run by hand, and an exact scan of photo_index.faiss.
    The service's photo-only ranking is that scan's order, with its scores."""
    manifest = reference.manifest
    image = ort.InferenceSession(
        manifest.path(sample_version_dir, "image_encoder"), providers=["CPUExecutionProvider"]
    )
    head = ort.InferenceSession(
        manifest.path(sample_version_dir, "photo_head"), providers=["CPUExecutionProvider"]
    )
    index = faiss.read_index(str(sample_version_dir / manifest.photo_index.file))
    vectors = index.reconstruct_n(0, index.ntotal)
    assert index.ntotal == len(reference.ids)
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-4)
    catalogue = load_catalogue(SAMPLE)
    for item in reference.ids[7::700][:4]:
        pixels = image_to_pixels(catalogue.load_image(item))[None]
        (embedding,) = image.run(None, {"pixels": pixels})
        (photo,) = head.run(None, {"image_embedding": embedding})
        cosine = vectors @ photo[0]
        order = np.argsort(-cosine, kind="stable")[:10]
        answer = await rank(client, image=photo_of(item), retrieve_k=100, top_k=10)
        got = [e["id"] for e in answer["items"]]
        expected = [reference.ids[r] for r in order]
        # Ties (duplicate photos) may come in either order: compare scores, and ids as sets.
        assert [e["score"] for e in answer["items"]] == pytest.approx(
            cosine[order].tolist(), abs=1e-4
        )
        assert set(got[:5]) <= set(expected), (got, expected)

    # Given candidates (unknown ids missing) are ranked the same way, without the store.
    item = reference.ids[0]
    given = [*reference.ids[100:140], "no-such-id"]
    answer = await rank(client, image=photo_of(item), candidate_ids=given, top_k=40)
    assert answer["missing_ids"] == ["no-such-id"]
    pixels = image_to_pixels(catalogue.load_image(item))[None]
    (photo,) = head.run(None, {"image_embedding": image.run(None, {"pixels": pixels})[0]})
    cosine = vectors[100:140] @ photo[0]
    scores = {e["id"]: e["score"] for e in answer["items"]}
    assert scores == pytest.approx(dict(zip(given[:-1], cosine.tolist(), strict=True)), abs=1e-4)


@pytest.mark.parametrize(
    ("image", "status", "words"),
    [
        (base64.b64encode(b"this is not an image at all").decode(), 422, "not a readable"),
        ("%%% not base64 %%%", 422, "not base64"),
        ("\u00bf\u0091", 422, "not base64"),  # found by schemathesis: a 500 once
        ("truncated", 422, "damaged"),
        (base64.b64encode(encoded(Image.new("RGB", (1, 1)))).decode(), 422, "at least 16"),
        ("bomb", 422, "not a readable"),
        ("large", 413, "max_image_bytes"),
    ],
    ids=[
        "not-an-image",
        "not-base64",
        "not-ascii",
        "truncated",
        "1x1",
        "20000x20000-png",
        "over-limit",
    ],
)
async def test_a_bad_photo_is_a_4xx_naming_image_and_the_worker_stays_up(
    client: httpx.AsyncClient, reference: Reference, image: str, status: int, words: str
) -> None:
    if image == "truncated":
        image = base64.b64encode(base64.b64decode(photo_of(reference.ids[0]))[:600]).decode()
    elif image == "bomb":  # a valid PNG header claiming 20000 x 20000 pixels, then nothing
        header = struct.pack(">IIBBBBB", 20000, 20000, 8, 2, 0, 0, 0)
        chunk = b"IHDR" + header
        png = b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + chunk
        png += struct.pack(">I", zlib.crc32(chunk)) + b"\x00\x00\x00\x00IEND\xaeB`\x82"
        image = base64.b64encode(png).decode()
    elif image == "large":
        image = base64.b64encode(b"\xff" * (600 * 1024)).decode()  # over 512 KiB decoded
    response = await client.post("/rank", json={"image": image})
    assert response.status_code == status, response.text
    detail = response.json()["detail"]
    assert detail[0]["loc"] == ["body", "image"] and words in detail[0]["msg"], detail
    assert (await rank(client, query="red shirt"))["items"]  # the worker still serves
