"""Request and response bodies of the HTTP API, and their cheap wire (de)serialisation.

``POST /rank`` parses the raw body with ``model_validate_json`` (tens of microseconds for 2,000
ids, where FastAPI's dict path costs milliseconds) and answers orjson bytes; the pydantic
response models below only document the response in the OpenAPI schema.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)
from pydantic_core import PydanticCustomError

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


_STRICT = ConfigDict(extra="forbid", strict=True, frozen=True)
MAX_FILTER_VALUES = 100
MAX_BOOSTS = 16

FilterValues = Annotated[list[str], Field(min_length=1, max_length=MAX_FILTER_VALUES)]


class NotOneOf(BaseModel):
    """``{"not": [values]}``: items whose value is none of these."""

    model_config = _STRICT
    not_: FilterValues = Field(alias="not")


class YearRange(BaseModel):
    """``{"gte": 2015, "lte": 2018}``: either bound may be absent."""

    model_config = _STRICT
    gte: int | None = None
    lte: int | None = None


# One value (equality), a list (one of), or {"not": [...]} (none of).
AttributeFilter = str | FilterValues | NotOneOf


class Filters(BaseModel):
    """Item attributes every returned item must match (all conditions at once). Values are
    the catalogue's own (e.g. gender "Men", "Women", "Unisex"); a value no item has matches
    nothing. Items the index does not hold have no attributes and never match."""

    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {
                    "gender": ["Men", "Unisex"],
                    "articleType": {"not": ["Socks"]},
                    "year": {"gte": 2015},
                }
            ]
        },
    )
    gender: AttributeFilter | None = None
    masterCategory: AttributeFilter | None = None  # noqa: N815 (the catalogue's names)
    subCategory: AttributeFilter | None = None  # noqa: N815
    articleType: AttributeFilter | None = None  # noqa: N815
    baseColour: AttributeFilter | None = None  # noqa: N815
    season: AttributeFilter | None = None
    usage: AttributeFilter | None = None
    year: int | YearRange | None = None

    def conditions(self) -> dict[str, AttributeFilter | int | YearRange]:
        """The attributes this filter constrains, by name."""
        return {name: value for name, value in self if value is not None}


class Boost(BaseModel):
    """``{"if": {filters}, "add": 0.5}``: add to the score of every item matching the filters,
    after the model scored it (shown as ``boost`` with explain)."""

    model_config = ConfigDict(**_STRICT, populate_by_name=False)
    if_: Filters = Field(alias="if")
    add: Annotated[float, Field(ge=-1000, le=1000, allow_inf_nan=False)]


class Diversity(BaseModel):
    """``{"max_per": {"articleType": 3}}``: at most that many of the returned items share a
    value of the attribute. Greedy and stable: items are taken best first, and an item whose
    value already has its quota is passed over for the next best."""

    model_config = _STRICT
    max_per: dict[
        Literal[
            "gender",
            "masterCategory",
            "subCategory",
            "articleType",
            "baseColour",
            "season",
            "usage",
            "year",
        ],
        Annotated[int, Field(ge=1, le=API_MAX_TOP_K)],
    ] = Field(min_length=1)


class RankRequest(BaseModel):
    """Body of POST /rank. Strict: "10" is not an int, unknown fields are errors."""

    model_config = ConfigDict(
        extra="forbid",
        strict=True,
        frozen=True,
        json_schema_extra={
            "anyOf": [{"required": ["query"]}, {"required": ["like_id"]}, {"required": ["image"]}]
        },
    )

    image: Annotated[
        str | None,
        Field(
            min_length=1,
            description="Search by photo: a JPEG or PNG, base64-encoded (at most "
            "max_image_bytes once decoded). Without candidate_ids the photo index retrieves "
            "the items whose photos are nearest (photo vectors: trained so that photos of the "
            "same type and colour lie close); without a query they are ranked by the cosine "
            "of their photo vectors to the photo's (reported as image_contribution), with a "
            "query the model ranks them by the query.",
        ),
    ] = None
    like_id: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=128,
            description="More like this indexed item: without candidate_ids, the index "
            "retrieves the items nearest to this item's own vectors (the item itself left "
            "out); without a query they are ranked by cosine similarity to it.",
            examples=["1164"],
        ),
    ] = None
    query: Annotated[
        str | None,
        Field(
            min_length=1,
            max_length=API_MAX_QUERY_CHARS,
            description="What the shopper typed; may be left out when image or like_id is given.",
            validate_default=True,
        ),
    ] = None
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
    filters: Annotated[
        Filters | None,
        Field(
            description="Only items with these attributes: given candidates that do not match "
            "are dropped (counted in filtered_out); retrieval searches the matching items only."
        ),
    ] = None
    boosts: Annotated[
        list[Boost] | None,
        Field(
            max_length=MAX_BOOSTS,
            description="Score modifiers by attribute match, added after the model's score.",
            examples=[[{"if": {"usage": "Sports"}, "add": 0.5}]],
        ),
    ] = None
    diversity: Annotated[
        Diversity | None,
        Field(
            description="Caps on how many returned items share an attribute value.",
            examples=[{"max_per": {"articleType": 3}}],
        ),
    ] = None

    @field_validator("query")
    @classmethod
    def _query_or_like_id(cls, query: str | None, info: ValidationInfo) -> str | None:
        if query is None and info.data.get("like_id") is None and info.data.get("image") is None:
            raise PydanticCustomError("missing", "Field required (or give like_id or image)")
        return query

    @field_validator("like_id")
    @classmethod
    def _like_id_or_image(cls, like_id: str | None, info: ValidationInfo) -> str | None:
        if like_id is not None and info.data.get("image") is not None:
            raise ValueError("give like_id or image, not both")
        return like_id

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

        query: Annotated[
            str | None,
            Field(min_length=1, max_length=limits.max_query_chars, validate_default=True),
        ] = None
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
    boost: float | None = Field(None, description="Only with explain: what boosts added.")


class RankResponse(BaseModel):
    items: list[RankedItem] = Field(description="By score, best first; at most top_k.")
    model_version: str = Field(description="Manifest version of the model that scored.")
    missing_ids: list[str] = Field(description="Candidate ids the feature store does not know.")
    filtered_out: int = Field(
        description="Given candidates dropped by the request's filters (0 for retrieval, which "
        "searches matching items only)."
    )


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
    contributions: tuple[list[float], list[float], list[float]] | None = None,
    filtered_out: int = 0,
) -> bytes:
    """The 200 body of POST /rank as JSON bytes; ``ids`` and ``scores`` are already ordered;
    ``contributions``: text, image and boost per item (explain)."""
    if contributions is None:
        items = [{"id": i, "score": s} for i, s in zip(ids, scores, strict=True)]
    else:
        text, image, boost = contributions
        items = [
            {"id": i, "score": s, "text_contribution": t, "image_contribution": v, "boost": b}
            for i, s, t, v, b in zip(ids, scores, text, image, boost, strict=True)
        ]
    body = {
        "items": items,
        "model_version": model_version,
        "missing_ids": missing_ids,
        "filtered_out": filtered_out,
    }
    return orjson.dumps(body)
