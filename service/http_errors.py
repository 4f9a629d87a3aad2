"""The one mapping from exceptions to HTTP answers, used by every route (FastAPI's exception
handlers, the plain ASGI ``POST /rank`` and the admin routes).

- **503 + Retry-After**, transient: ``Overloaded``, ``DeadlineExceeded``, ``ServiceNotReady``,
  ``FeatureStoreUnavailable``, ``NoPublishedVersion``, ``FeatureVersionMissing``. A dependency
  is down or slow, the worker is full, or this replica is not ready for its model (another
  replica may be): retry, here or elsewhere.
- **409**: ``ModelRejected`` and other ``ArtifactError``, ``DeviceUnavailable``. A reload asked
  for a version this replica cannot serve; the old one keeps serving.
- **500, JSON**: ``FeatureStoreFault``, ``FeatureFormatError`` and any other error. A fault of
  the service's configuration or data (a Redis user without read permission, a key of the
  wrong type, unreadable meta): retrying does not mend it, so balancers must not retry it
  (deploy/nginx.conf retries 503 only).

- **422** (413 for a part over its size limit): ``RequestRejected``, a request that parsed
  but cannot be served as asked (``like_id`` of an unknown item, an image that is not a usable
  photo), answered like any invalid body: ``{"detail":
  [{"loc": [...], "msg": ..., "type": "value_error"}]}``.

Other client mistakes never get here: an invalid body is a 422 and an oversized one a 413
before anything runs. Every other answer is ``{"detail": reason}``; all are JSON, never
text/plain.
"""

from __future__ import annotations

import logging

import orjson

from service.errors import (
    ArtifactError,
    DeadlineExceeded,
    DeviceUnavailable,
    FeatureStoreUnavailable,
    FeatureVersionMissing,
    FusionRankError,
    NoPublishedVersion,
    Overloaded,
    RequestRejected,
    ServiceNotReady,
)

log = logging.getLogger("service")

TRANSIENT = (
    Overloaded,
    DeadlineExceeded,
    ServiceNotReady,
    FeatureStoreUnavailable,
    NoPublishedVersion,
    FeatureVersionMissing,
)
REFUSED_RELOAD = (ArtifactError, DeviceUnavailable)


def status_of(exc: BaseException) -> int:
    if isinstance(exc, RequestRejected):
        return exc.status
    if isinstance(exc, TRANSIENT):
        return 503
    if isinstance(exc, REFUSED_RELOAD):
        return 409
    return 500


def error_answer(
    exc: BaseException, retry_after_s: int
) -> tuple[int, bytes, list[tuple[str, str]]]:
    """(status, JSON body, extra headers) answering ``exc``; faults are logged here."""
    status = status_of(exc)
    if isinstance(exc, RequestRejected):
        error = {"loc": exc.loc, "msg": str(exc), "type": "value_error"}
        return status, orjson.dumps({"detail": [error]}), []
    if isinstance(exc, FusionRankError):
        detail = str(exc)
    else:
        detail = f"internal error: {type(exc).__name__}: {exc}"
    if status == 500:
        log.error("answered 500: %s", detail, exc_info=not isinstance(exc, FusionRankError))
    headers = [("retry-after", str(retry_after_s))] if status == 503 else []
    return status, orjson.dumps({"detail": detail}), headers
