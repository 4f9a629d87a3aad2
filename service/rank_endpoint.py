"""POST /rank as a plain ASGI endpoint.

The one route on the hot path skips FastAPI's per-request machinery (dependency solving, its
request and response wrappers, exit stacks): that machinery cost more event-loop CPU than
parsing 1,000 ids and writing the answer. The contract is FastAPI's, answer for answer:

- 413 ``{"detail": "request body over N bytes"}`` as soon as the body is known to be larger;
- 422 ``{"detail": [{"loc": ["body", ...], "msg": ..., "type": ...}]}`` (strict pydantic
  validation of the raw JSON, before anything else, so bad input is a 422 while the model loads);
- any error raised while ranking is answered as service.http_errors maps it: 503 with
  Retry-After when the model is not ready, a dependency is down or slow, or the request ran
  past ``request_timeout_s``; a JSON 500 naming the reason for a fault of the service or its
  data;
- 200 with the orjson body of Pipeline.rank.

The app mounts it with ``methods=["POST"]`` (other methods get FastAPI's 405) and documents it
in the OpenAPI schema from ``documentation_route``.
"""

from __future__ import annotations

import asyncio

import orjson
from fastapi.routing import APIRoute
from pydantic import ValidationError
from starlette.types import Receive, Scope, Send

from service.errors import DeadlineExceeded
from service.http_errors import error_answer
from service.runtime import runtime_of
from service.schemas import (
    ErrorResponse,
    RankRequest,
    RankResponse,
    ValidationErrorResponse,
    validation_errors,
)

JSON = b"application/json"
SUMMARY = "Rank candidates (given, or retrieved) for a query."


class RankEndpoint:
    def __init__(
        self,
        request_model: type[RankRequest],
        *,
        max_body_bytes: int,
        request_timeout_s: float,
        retry_after_s: int,
    ) -> None:
        self._model = request_model
        self._max_body_bytes = max_body_bytes
        self._timeout_s = request_timeout_s
        self._retry_after_s = retry_after_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await self._read_body(scope, receive)
        if body is None:
            detail = f"request body over {self._max_body_bytes} bytes"
            await _answer(send, 413, orjson.dumps({"detail": detail}))
            return
        try:
            request = self._model.model_validate_json(body)
        except ValidationError as exc:
            await _answer(send, 422, orjson.dumps({"detail": validation_errors(exc)}))
            return
        try:
            with runtime_of(scope["app"]).lease() as pipeline:  # a reload waits for this request
                try:
                    async with asyncio.timeout(self._timeout_s):
                        ranked = await pipeline.rank(request)
                except TimeoutError:
                    raise DeadlineExceeded(
                        f"no answer within request_timeout_s = {self._timeout_s:g} s: a "
                        "dependency is slow or the service is overloaded"
                    ) from None
        except Exception as exc:  # every error is answered in JSON, as http_errors maps it
            status, payload, headers = error_answer(exc, self._retry_after_s)
            await _answer(send, status, payload, [(k.encode(), v.encode()) for k, v in headers])
            return
        await _answer(send, 200, ranked)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None once it is known to exceed max_body_bytes."""
        limit = self._max_body_bytes
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                return None
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)


async def _answer(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", JSON),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def request_schema(request_model: type[RankRequest]) -> tuple[dict, dict]:
    """(the request body's JSON schema, the schemas of the models it nests): the nested ones
    belong in the OpenAPI document's components, where the body's references point."""
    schema = request_model.model_json_schema(ref_template="#/components/schemas/{model}")
    return schema, schema.pop("$defs", {})


def documentation_route(request_model: type[RankRequest]) -> APIRoute:
    """A route that is never mounted, only described in the OpenAPI schema: what RankEndpoint
    accepts and answers (the nested models' schemas: ``request_schema``)."""

    async def rank() -> None:  # the name gives the operationId, as a FastAPI route's would
        raise NotImplementedError

    return APIRoute(
        "/rank",
        rank,
        methods=["POST"],
        response_model=None,  # the 200 body is documented by `responses`
        summary=SUMMARY,
        responses={
            200: {"model": RankResponse, "description": "Items by score, best first."},
            413: {"model": ErrorResponse, "description": "Request body too large."},
            422: {"model": ValidationErrorResponse, "description": "Invalid body."},
            500: {
                "model": ErrorResponse,
                "description": "A fault of the service or its data (e.g. the feature store "
                "refuses the service's credentials); not worth retrying.",
            },
            503: {
                "model": ErrorResponse,
                "description": "Not ready, a dependency is down or slow, or overloaded; "
                "with Retry-After.",
            },
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": request_schema(request_model)[0]}},
            }
        },
    )
