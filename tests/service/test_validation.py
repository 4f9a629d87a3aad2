"""POST /rank input validation through HTTP: every rule answers 422 naming the field.

The body is validated before readiness is looked at, so these run against an app that has
loaded nothing: a valid body gets 503 (not ready), an invalid one 422.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import httpx
import orjson
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.settings import Settings

pytestmark = pytest.mark.anyio

Client = Callable[[FastAPI], httpx.AsyncClient]


@pytest.fixture
def app(tmp_path: Path) -> FastAPI:
    return create_app(Settings(artifacts_dir=tmp_path / "none"))


async def post(client: httpx.AsyncClient, body: object) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return await client.post("/rank", content=content, headers={"content-type": "application/json"})


def fields_named(response: httpx.Response) -> list[tuple[str, ...]]:
    assert response.status_code == 422, response.text
    detail = response.json()["detail"]
    for error in detail:
        assert set(error) == {"loc", "msg", "type"}
        assert error["loc"][0] == "body" and error["msg"]
    return [tuple(error["loc"][1:]) for error in detail]


IDS = [f"id-{i}" for i in range(5)]

INVALID = {
    "empty query": ({"query": ""}, ("query",), "string_too_short"),
    "query of 257 characters": ({"query": "q" * 257}, ("query",), "string_too_long"),
    "query missing": ({"candidate_ids": IDS}, ("query",), "missing"),
    "query not a string": ({"query": 5}, ("query",), "string_type"),
    "2,001 candidate ids": (
        {"query": "q", "candidate_ids": [f"id-{i}" for i in range(2001)]},
        ("candidate_ids",),
        "too_long",
    ),
    "duplicate candidate ids": (
        {"query": "q", "candidate_ids": ["a", "b", "a"]},
        ("candidate_ids",),
        "value_error",
    ),
    "candidate ids not a list": (
        {"query": "q", "candidate_ids": "a"},
        ("candidate_ids",),
        "list_type",
    ),
    "candidate id not a string": (
        {"query": "q", "candidate_ids": ["a", 7]},
        ("candidate_ids", 1),
        "string_type",
    ),
    "top_k 0": ({"query": "q", "top_k": 0}, ("top_k",), "greater_than_equal"),
    "top_k 1,001": ({"query": "q", "top_k": 1001}, ("top_k",), "less_than_equal"),
    "top_k a string": ({"query": "q", "top_k": "10"}, ("top_k",), "int_type"),
    "top_k a float": ({"query": "q", "top_k": 2.5}, ("top_k",), "int_type"),
    "top_k null": ({"query": "q", "top_k": None}, ("top_k",), "int_type"),
    "retrieve_k 0": ({"query": "q", "retrieve_k": 0}, ("retrieve_k",), "greater_than_equal"),
    "retrieve_k 2,001": ({"query": "q", "retrieve_k": 2001}, ("retrieve_k",), "less_than_equal"),
    "explain not a bool": ({"query": "q", "explain": "yes"}, ("explain",), "bool_type"),
    "unknown field": ({"query": "q", "k": 3}, ("k",), "extra_forbidden"),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=list(INVALID))
async def test_invalid_body_is_422_naming_the_field(
    app: FastAPI, unstarted_client: Client, case: tuple[dict, tuple, str]
) -> None:
    body, field, error_type = case
    async with unstarted_client(app) as client:
        response = await post(client, body)
    assert fields_named(response) == [field]
    assert response.json()["detail"][0]["type"] == error_type


async def test_duplicates_are_named_in_the_message(app: FastAPI, unstarted_client: Client) -> None:
    async with unstarted_client(app) as client:
        response = await post(client, {"query": "q", "candidate_ids": ["x", "y", "x", "y"]})
    assert "duplicate ids: 'x', 'y'" in response.json()["detail"][0]["msg"]


async def test_every_invalid_field_is_reported(app: FastAPI, unstarted_client: Client) -> None:
    async with unstarted_client(app) as client:
        response = await post(client, {"query": "", "top_k": 0, "extra": 1})
    assert sorted(fields_named(response)) == [("extra",), ("query",), ("top_k",)]


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'"query"', b"null"])
async def test_body_that_is_not_a_json_object_is_422(
    app: FastAPI, unstarted_client: Client, body: bytes
) -> None:
    async with unstarted_client(app) as client:
        response = await post(client, body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body"]


@pytest.mark.parametrize(
    "body",
    [
        {"query": "q" * 256},
        {"query": "q", "candidate_ids": [f"id-{i}" for i in range(2000)]},
        {"query": "q", "candidate_ids": [], "top_k": 1000, "retrieve_k": 2000, "explain": True},
        {"query": "q", "candidate_ids": None, "top_k": 1, "retrieve_k": 1},
    ],
    ids=["longest query", "most ids", "largest k", "null ids"],
)
async def test_valid_bodies_pass_validation(
    app: FastAPI, unstarted_client: Client, body: dict
) -> None:
    async with unstarted_client(app) as client:
        response = await post(client, body)
    assert response.status_code == 503  # valid, but nothing is loaded
    assert response.json()["detail"].startswith("not ready")


async def test_body_over_the_limit_is_413(tmp_path: Path, unstarted_client: Client) -> None:
    app = create_app(Settings(artifacts_dir=tmp_path, max_body_bytes=2048))
    async with unstarted_client(app) as client:
        response = await post(client, {"query": "q", "candidate_ids": ["x" * 3000]})
    assert response.status_code == 413
    assert "2048" in response.json()["detail"]


async def test_limits_come_from_settings(tmp_path: Path, unstarted_client: Client) -> None:
    settings = Settings(
        artifacts_dir=tmp_path, max_candidates=3, max_query_chars=8, max_top_k=5, default_top_k=5
    )
    app = create_app(settings)
    async with unstarted_client(app) as client:
        too_many = await post(client, {"query": "q", "candidate_ids": ["a", "b", "c", "d"]})
        too_long = await post(client, {"query": "q" * 9})
        too_big = await post(client, {"query": "q", "top_k": 6})
        fine = await post(client, {"query": "q" * 8, "candidate_ids": ["a", "b", "c"]})
    assert fields_named(too_many) == [("candidate_ids",)]
    assert fields_named(too_long) == [("query",)]
    assert fields_named(too_big) == [("top_k",)]
    assert fine.status_code == 503


async def test_openapi_documents_the_rank_bodies(app: FastAPI, unstarted_client: Client) -> None:
    async with unstarted_client(app) as client:
        schema = (await client.get("/openapi.json")).json()
    rank = schema["paths"]["/rank"]["post"]
    request = rank["requestBody"]["content"]["application/json"]["schema"]
    assert request["title"] == "RankRequest"
    assert request["anyOf"] == [
        {"required": ["query"]},
        {"required": ["like_id"]},
        {"required": ["image"]},
    ]
    assert request["additionalProperties"] is False
    assert set(request["properties"]) == {
        "query",
        "image",
        "like_id",
        "candidate_ids",
        "top_k",
        "retrieve_k",
        "explain",
        "filters",
        "boosts",
        "diversity",
    }
    query = request["properties"]["query"]["anyOf"]
    assert {"type": "null"} in query  # may be left out for like_id
    assert next(b for b in query if b.get("type") == "string")["maxLength"] == 256
    # Nested bodies are components of the document, so their references resolve.
    components = schema["components"]["schemas"]
    assert {"Filters", "NotOneOf", "YearRange", "Boost", "Diversity"} <= set(components)
    assert "$defs" not in request and "$defs" not in json.dumps(schema)
    ok = rank["responses"]["200"]["content"]["application/json"]["schema"]
    assert ok == {"$ref": "#/components/schemas/RankResponse"}
    assert set(schema["components"]["schemas"]["RankResponse"]["properties"]) == {
        "items",
        "model_version",
        "missing_ids",
        "filtered_out",
    }
    assert {"422", "503"} <= set(rank["responses"])
    assert {"/healthz", "/readyz", "/metrics"} <= set(schema["paths"])
