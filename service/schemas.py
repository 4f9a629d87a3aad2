"""Request and response bodies of the HTTP API, and their cheap wire (de)serialisation.

``POST /rank`` parses the raw body with ``model_validate_json`` (tens of microseconds for 2,000
ids, where FastAPI's dict path costs milliseconds) and answers orjson bytes; the pydantic
response models below only document the response in the OpenAPI schema.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

API_MAX_QUERY_CHARS = 256
API_MAX_CANDIDATES = 2000
API_MAX_TOP_K = 1000
API_MAX_RETRIEVE_K = 2000


@dataclass(frozen=True)
class RequestLimits:
    """Bounds of a rank request (Settings can tighten or widen the API's defaults)."""

    max_query_chars: int = API_MAX_QUERY_CHARS
    max_candidates: int = API_MAX_CANDIDATES
    max_top_k: int = API_MAX_TOP_K
    max_retrieve_k: int = API_MAX_RETRIEVE_K
    default_top_k: int = 10
    default_retrieve_k: int = 200


class RankRequest(BaseModel):
    """Body of POST /rank. Strict: "10" is not an int, unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    query: Annotated[str, Field(min_length=1, max_length=API_MAX_QUERY_CHARS)]
    candidate_ids: (
        Annotated[
            list[str],
            Field(
                max_length=API_MAX_CANDIDATES,
                description="Ids to rank, no duplicates; absent: retrieve from the index.",
            ),
        ]
        | None
    ) = None
    top_k: Annotated[int, Field(ge=1, le=API_MAX_TOP_K)] = 10
    retrieve_k: Annotated[
        int,
        Field(ge=1, le=API_MAX_RETRIEVE_K, description="Candidates to retrieve without ids."),
    ] = 200
    explain: Annotated[
        bool, Field(description="Add each item's text and image contributions to its score.")
    ] = False

    @field_validator("candidate_ids")
    @classmethod
    def _no_duplicates(cls, ids: list[str] | None) -> list[str] | None:
        if ids is not None and len(set(ids)) != len(ids):
            repeated = [item for item, count in Counter(ids).items() if count > 1]
            shown = ", ".join(repr(item) for item in repeated[:5])
            more = f" and {len(repeated) - 5} more" if len(repeated) > 5 else ""
            raise ValueError(f"duplicate ids: {shown}{more}")
        return ids


@cache
def rank_request_model(limits: RequestLimits) -> type[RankRequest]:
    """RankRequest itself for the API's limits, else a subclass with ``limits`` applied."""
    if limits == RequestLimits():
        return RankRequest

    class LimitedRankRequest(RankRequest):
        model_config = ConfigDict(title="RankRequest")

        query: Annotated[str, Field(min_length=1, max_length=limits.max_query_chars)]
        candidate_ids: Annotated[list[str], Field(max_length=limits.max_candidates)] | None = None
        top_k: Annotated[int, Field(ge=1, le=limits.max_top_k)] = limits.default_top_k
        retrieve_k: Annotated[int, Field(ge=1, le=limits.max_retrieve_k)] = (
            limits.default_retrieve_k
        )

    return LimitedRankRequest


def validation_errors(exc: ValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 ``detail`` items (loc under "body", msg, type), without echoing input."""
    return [
        {"loc": ["body", *error["loc"]], "msg": error["msg"], "type": error["type"]}
        for error in exc.errors(include_url=False, include_input=False, include_context=False)
    ]


# -- documentation models (the wire format is written by render_ranking) --------------------


class RankedItem(BaseModel):
    id: str
    score: float
    text_contribution: float | None = Field(None, description="Only with explain.")
    image_contribution: float | None = Field(None, description="Only with explain.")


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="By score, best first; at most top_k.")
    model_version: str = Field(description="Manifest version of the model that scored.")
    missing_ids: list[str] = Field(description="Candidate ids the feature store does not know.")


class ErrorResponse(BaseModel):
    detail: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]


class ReadinessResponse(BaseModel):
    ready: bool
    detail: str = Field(description="Why not ready, or 'ready'.")
    model_version: str | None = None
    execution_provider: str | None = None
    features_version: str | None = None


def render_ranking(
    ids: list[str],
    scores: list[float],
    model_version: str,
    missing_ids: list[str],
    contributions: tuple[list[float], list[float]] | None = None,
) -> bytes:
    """The 200 body of POST /rank as JSON bytes; ``ids`` and ``scores`` are already ordered."""
    if contributions is None:
        items = [{"id": i, "score": s} for i, s in zip(ids, scores, strict=True)]
    else:
        text, image = contributions
        items = [
            {"id": i, "score": s, "text_contribution": t, "image_contribution": v}
            for i, s, t, v in zip(ids, scores, text, image, strict=True)
        ]
    body = {"items": items, "model_version": model_version, "missing_ids": missing_ids}
    return orjson.dumps(body)
