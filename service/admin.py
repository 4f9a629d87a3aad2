"""Admin routes, mounted only when ``admin_token`` is set (Settings refuse a weak token).

``POST /admin/reload`` with ``Authorization: Bearer <admin_token>`` and an optional JSON body
``{"version": "<model version>"}`` (default: the version artifacts/models/CURRENT names) loads
that version beside the serving one, warms it, switches to it atomically and closes the old
one once its in-flight requests have finished on it (``Runtime.reload`` in service.runtime).

The rule for features: a model is accepted only if the feature store holds its manifest's
``features_version`` whole (laid out as the model reads it), since a model scores the item
vectors of the export it came from. A retrained model therefore needs its features published
first (``python -m export``); a version whose features are not there is refused with 409 while
the old model keeps serving. Errors are answered as service.http_errors maps them.
"""

# No `from __future__ import annotations`: FastAPI resolves the route's annotations.
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from service.runtime import RuntimeDep
from service.schemas import validation_errors

VERSION_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"  # a directory name, never a path
MAX_BODY_BYTES = 4096


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    version: str | None = Field(
        None,
        pattern=VERSION_PATTERN,
        description="A directory under artifacts/models/; absent: the one CURRENT names.",
    )


class ReloadResponse(BaseModel):
    model_version: str = Field(description="The version now serving.")
    previous_version: str | None
    features_version: str
    load_seconds: float = Field(description="Loading and warming the new version.")
    drained: bool = Field(description="Every request on the previous version finished on it.")


class AdminError(BaseModel):
    detail: str


def admin_router(token: SecretStr) -> APIRouter:
    expected = token.get_secret_value().encode()
    bearer = HTTPBearer(auto_error=False)

    async def authorised(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> None:
        given = b"" if credentials is None else credentials.credentials.encode()
        if not hmac.compare_digest(given, expected):
            raise HTTPException(
                401, "a valid bearer token is required", headers={"WWW-Authenticate": "Bearer"}
            )

    router = APIRouter(prefix="/admin", tags=["admin"], dependencies=[Depends(authorised)])

    @router.post(
        "/reload",
        summary="Swap the serving model for another version, without downtime.",
        response_model=ReloadResponse,
        responses={
            401: {"model": AdminError, "description": "Missing or wrong bearer token."},
            409: {"model": AdminError, "description": "Version refused; the old one serves."},
            413: {"model": AdminError, "description": "Request body too large."},
            422: {"description": "Invalid body."},
            500: {"model": AdminError, "description": "A fault of the feature store or data."},
            503: {"model": AdminError, "description": "Starting, or the feature store is down."},
        },
        openapi_extra={
            "requestBody": {
                "required": False,
                "content": {"application/json": {"schema": ReloadRequest.model_json_schema()}},
            }
        },
    )
    async def reload(request: Request, runtime: RuntimeDep) -> ReloadResponse:
        # The body is read here, after the token check, and parsed from raw bytes like /rank's
        # (any bytes: a 422, never a 400 or a 500).
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise HTTPException(413, f"request body over {MAX_BODY_BYTES} bytes")
        try:
            body = ReloadRequest.model_validate_json(raw) if raw.strip() else ReloadRequest()
        except ValidationError as exc:
            raise RequestValidationError(validation_errors(exc)) from None
        swap = await runtime.reload(body.version)
        return ReloadResponse(
            model_version=swap.model_version,
            previous_version=swap.previous_version,
            features_version=swap.features_version,
            load_seconds=round(swap.load_seconds, 3),
            drained=swap.drained,
        )

    return router
