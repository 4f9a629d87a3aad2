"""The search page and the item routes it uses (an APIRouter the app includes).

    GET /                    the search page (service/static/index.html: HTML, CSS, a little JS)
    GET /static/{name}       its stylesheet and script
    GET /items/{id}          {"id", "title", "attributes", "image"}; 404 JSON for an unknown id
    GET /items/{id}/image    the product photo (JPEG, cacheable, ETag); 404 JSON when unknown

The page ranks through ``POST /rank`` like any client. Item data comes from the directory the
exporter writes for the served model's catalogue (service.items), loaded on first use; while
it is missing the item routes answer 503 naming the reason.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from service.errors import ArtifactError, ServiceNotReady
from service.items import ItemCatalogue
from service.manifest import load_manifest, resolve_version_dir
from service.runtime import runtime_of
from service.settings import Settings

STATIC_DIR = Path(__file__).resolve().parent / "static"
STATIC_FILES = {
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
PAGE_CACHE = "no-cache"  # revalidate: a new deploy shows at once
ITEM_CACHE = "public, max-age=3600"
PHOTO_CACHE = "public, max-age=86400"

router = APIRouter()


class _Items:
    """The app's item catalogue, (re)loaded when the served catalogue changes."""

    def __init__(self) -> None:
        self.catalogue: ItemCatalogue | None = None
        self.lock = asyncio.Lock()


def _state(request: Request) -> _Items:
    state = request.app.state
    items = getattr(state, "page_items", None)
    if items is None:
        items = state.page_items = _Items()
    return items


def _configured_fingerprint(settings: Settings) -> str:
    version_dir = resolve_version_dir(settings.models_dir, settings.model_version)
    return load_manifest(version_dir).catalogue_fingerprint


async def _served_fingerprint(request: Request) -> str:
    """The catalogue of the model being served, else (still loading, or failed to) of the
    model the settings name."""
    try:
        pipeline = runtime_of(request.app).pipeline
    except ServiceNotReady:  # before the lifespan started
        pipeline = None
    if pipeline is not None:
        return pipeline.manifest.catalogue_fingerprint
    return await asyncio.to_thread(_configured_fingerprint, request.app.state.settings)


async def _catalogue(request: Request) -> ItemCatalogue:
    items = _state(request)
    fingerprint = await _served_fingerprint(request)
    current = items.catalogue
    if current is not None and current.fingerprint == fingerprint:
        return current
    async with items.lock:
        current = items.catalogue
        if current is None or current.fingerprint != fingerprint:
            artifacts = request.app.state.settings.artifacts_dir
            items.catalogue = await asyncio.to_thread(ItemCatalogue.open, artifacts, fingerprint)
            if current is not None:
                current.close()
        return items.catalogue


def _error(status: int, detail: str) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status)


def _static(name: str, media_type: str) -> Response:
    return Response(
        (STATIC_DIR / name).read_bytes(),
        media_type=media_type,
        headers={"Cache-Control": PAGE_CACHE},
    )


@router.get("/", include_in_schema=False)
async def search_page() -> Response:
    return _static("index.html", "text/html; charset=utf-8")


@router.get("/static/{name}", include_in_schema=False)
async def static_file(name: str) -> Response:
    media_type = STATIC_FILES.get(name)
    if media_type is None:
        return _error(404, f"no static file {name!r}")
    return _static(name, media_type)


@router.get(
    "/items/{item_id}",
    summary="An item's title and attributes.",
    responses={404: {"description": "Unknown id."}, 503: {"description": "No item data."}},
)
async def item(item_id: str, request: Request) -> Response:
    try:
        catalogue = await _catalogue(request)
    except ArtifactError as exc:
        return _error(503, str(exc))
    found = catalogue.item(item_id)
    if found is None:
        return _error(404, f"no item {item_id!r}")
    body = {
        "id": item_id,
        "title": found["title"],
        "attributes": found["attributes"],
        "image": str(request.url_for("item_image", item_id=item_id).path),
    }
    return JSONResponse(body, headers={"Cache-Control": ITEM_CACHE})


@router.get(
    "/items/{item_id}/image",
    summary="An item's photo (JPEG).",
    response_class=Response,
    responses={
        200: {"content": {"image/jpeg": {}}},
        304: {"description": "Not modified (If-None-Match)."},
        404: {"description": "Unknown id, or no photo."},
        503: {"description": "No item data."},
    },
)
async def item_image(item_id: str, request: Request) -> Response:
    try:
        catalogue = await _catalogue(request)
    except ArtifactError as exc:
        return _error(503, str(exc))
    photo = catalogue.photo(item_id)
    if photo is None:
        return _error(404, f"no photo for item {item_id!r}")
    headers = {"Cache-Control": PHOTO_CACHE, "ETag": photo.etag}
    if photo.etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(photo.data, media_type="image/jpeg", headers=headers)
