"""The search page in a real browser: headless Chromium (Debian's ``chromium``) driven through
Playwright's Python package, against ``python -m service`` serving the sample artifacts.

Skips, saying why, where Playwright or a Chromium executable is missing (``make test``
installs both where it can: the dev extra and .ci/debian-packages). Screenshots go to the
test's tmp_path; their paths are printed (``pytest -s`` or ``-rP`` shows them).
"""

from __future__ import annotations

import csv
import os
import shutil
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from models.catalogue import images_path
from tests.conftest import SAMPLE
from tests.service.processes import running_service

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 20_000
QUERY = "red tshirt for men"


def chromium_executable() -> str | None:
    """$FUSIONRANK_CHROMIUM, else Debian's chromium on the PATH."""
    for name in (os.environ.get("FUSIONRANK_CHROMIUM"), "chromium", "chromium-browser"):
        if name and (path := shutil.which(name)):
            return path
    return None


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A fresh headless Chromium profile (a Playwright BrowserContext)."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("the playwright Python package is not installed (pip install -e '.[dev]')")
    executable = chromium_executable()
    if executable is None:
        pytest.skip(
            "no Chromium executable (Debian package `chromium`, which .ci/ensure-tools "
            "installs when run as root; or set FUSIONRANK_CHROMIUM)"
        )
    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")),
            executable_path=executable,
            args=CHROMIUM_ARGS,
            headless=True,
            viewport={"width": 1280, "height": 860},
        )
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def service_url(sample_artifacts: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m service`` (uvicorn) on a free loopback port, serving the sample."""
    log = tmp_path_factory.mktemp("search-page") / "service.log"
    with running_service(log, FUSIONRANK_ARTIFACTS_DIR=str(sample_artifacts)) as service:
        yield service.url


@pytest.fixture(scope="module")
def titles() -> dict[str, str]:
    with (SAMPLE / "products.csv").open(newline="") as f:
        return {row["id"]: row["productDisplayName"] for row in csv.DictReader(f)}


def catalogue_photo(item_id: str) -> bytes:
    with zipfile.ZipFile(images_path(SAMPLE)) as archive:
        return archive.read(f"{item_id}.jpg")


@pytest.fixture
def page(browser):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    yield page
    page.close()
    assert errors == [], f"the page's script failed: {errors}"


def rank(url: str, **body: object) -> list[dict]:
    response = httpx.post(f"{url}/rank", json=body, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()["items"]


def save(page, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    print(f"screenshot: {path}")


def test_typed_query_shows_the_api_top_item_first(
    page, service_url: str, titles: dict[str, str], tmp_path: Path
) -> None:
    top = rank(service_url, query=QUERY)[0]["id"]
    page.goto(service_url)
    search = page.get_by_label("Search products")
    search.press_sequentially(QUERY)
    photo_url = f"{service_url}/items/{top}/image"
    with page.expect_response(photo_url, timeout=WAIT_MS) as photo:
        search.press("Enter")  # the keyboard submits the form
    cards = page.locator("#fused-list .card")
    cards.first.wait_for(timeout=WAIT_MS)

    first = cards.first
    assert first.get_attribute("data-id") == top
    assert first.locator(".title").inner_text() == titles[top]
    image = first.locator("img")
    assert image.get_attribute("src") == f"/items/{top}/image"
    assert image.get_attribute("alt") == f"Photo: {titles[top]}"
    assert photo.value.status == 200
    assert photo.value.body() == catalogue_photo(top), "the browser got the item's own photo"
    image.evaluate("img => img.decode()")
    assert image.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [60, 80]
    assert cards.count() == 10
    assert first.locator(".bar .seg").count() == 3  # text, image, joint
    assert page.locator("#error").is_hidden()
    assert "?q=red+tshirt+for+men" in page.url
    save(page, tmp_path / "search-page.png")


def test_compare_orders_the_same_candidates_by_text_and_errors_are_shown(
    page, service_url: str, tmp_path: Path
) -> None:
    items = rank(service_url, query=QUERY, retrieve_k=200, top_k=200, explain=True)
    by_text = sorted(items, key=lambda item: -item["text_contribution"])
    page.goto(service_url)
    page.get_by_label("Search products").fill(QUERY)
    page.get_by_label("Show top").fill("6")
    page.get_by_label("Compare with the text side alone").check()
    page.get_by_role("button", name="Search").click()
    text_cards = page.locator("#text-list .card")
    text_cards.first.wait_for(timeout=WAIT_MS)
    fused_ids = page.locator("#fused-list .card").evaluate_all("cs => cs.map(c => c.dataset.id)")
    text_ids = text_cards.evaluate_all("cs => cs.map(c => c.dataset.id)")
    assert fused_ids == [item["id"] for item in items[:6]]
    assert text_ids == [item["id"] for item in by_text[:6]]
    place = {item["id"]: n for n, item in enumerate(items, start=1)}
    assert text_cards.first.locator(".moved").inner_text() == f"#{place[text_ids[0]]} with photo"
    page.locator("#text-list img").last.evaluate("img => img.decode()")
    save(page, tmp_path / "search-page-compare.png")

    # A refused request is explained in words, not swallowed.
    page.get_by_label("Compare with the text side alone").uncheck()
    page.get_by_label("Candidates").fill("5000")
    page.get_by_label("Candidates").press("Enter")
    alert = page.get_by_role("alert")
    alert.wait_for(timeout=WAIT_MS)
    message = alert.inner_text()
    assert message.startswith("The service refused this search. Candidates:"), message
    assert "2000" in message
    assert page.locator("#fused-list .card").count() == 0


def test_a_ticked_facet_filters_the_results(page, service_url: str, tmp_path: Path) -> None:
    page.goto(f"{service_url}/?q=shoes&top=20")
    cards = page.locator("#fused-list .card")
    cards.first.wait_for(timeout=WAIT_MS)
    facet = page.locator("#facets input[data-attribute='gender']").first
    facet.wait_for(timeout=WAIT_MS)
    gender = facet.get_attribute("value")
    label = page.locator(f"label[for='{facet.get_attribute('id')}']").inner_text()
    shown = int(label.rsplit("(", 1)[1].rstrip(")"))
    assert 0 < shown <= 20  # a count over the shown results

    with page.expect_response(f"{service_url}/rank", timeout=WAIT_MS) as answer:
        facet.check()
    assert answer.value.request.post_data_json["filters"] == {"gender": [gender]}
    page.wait_for_function(
        "g => [...document.querySelectorAll('#fused-list .card .attrs')]"
        ".every(a => a.textContent.split(' \u00b7 ').includes(g))",
        arg=gender,
        timeout=WAIT_MS,
    )
    expected = rank(service_url, query="shoes", top_k=20, filters={"gender": [gender]})
    ids = cards.evaluate_all("cs => cs.map(c => c.dataset.id)")
    assert ids == [item["id"] for item in expected]
    assert f"Only gender {gender}" in page.locator("#status").inner_text()
    assert page.locator(f"#facets input[value='{gender}']").is_checked()
    save(page, tmp_path / "search-page-filtered.png")


def test_more_like_this_shows_the_items_nearest_to_a_card(
    page, service_url: str, titles: dict[str, str]
) -> None:
    page.goto(f"{service_url}/?q=shoes")
    cards = page.locator("#fused-list .card")
    cards.first.wait_for(timeout=WAIT_MS)
    chosen = cards.nth(2).get_attribute("data-id")
    with page.expect_response(f"{service_url}/rank", timeout=WAIT_MS) as answer:
        cards.nth(2).get_by_role("button", name="More like this").click()
    assert answer.value.request.post_data_json["like_id"] == chosen
    assert "query" not in answer.value.request.post_data_json
    status = page.locator("#status")
    page.wait_for_function(
        "t => document.getElementById('status').textContent.includes(t)",
        arg=f"like \u201c{titles[chosen]}\u201d",
        timeout=WAIT_MS,
    )
    expected = rank(service_url, like_id=chosen)
    ids = cards.evaluate_all("cs => cs.map(c => c.dataset.id)")
    assert ids == [item["id"] for item in expected] and chosen not in ids
    assert "products like" in status.inner_text()


def test_a_photo_upload_searches_by_photo_and_a_bad_file_is_explained(
    page, service_url: str, tmp_path: Path
) -> None:
    page.goto(service_url)
    item = rank(service_url, query=QUERY)[0]["id"]
    photo = tmp_path / f"{item}.jpg"
    photo.write_bytes(catalogue_photo(item))
    with page.expect_response(f"{service_url}/rank", timeout=WAIT_MS) as answer:
        page.get_by_label("Find by photo").set_input_files(str(photo))
    assert "image" in answer.value.request.post_data_json
    page.wait_for_function(
        "() => document.getElementById('status').textContent.includes('like your photo')",
        timeout=WAIT_MS,
    )
    cards = page.locator("#fused-list .card")
    assert cards.first.get_attribute("data-id") == item  # its own photo finds it first
    save(page, tmp_path / "search-page-photo.png")

    not_a_photo = tmp_path / "notes.png"
    not_a_photo.write_bytes(b"this is not a picture")
    page.get_by_label("Find by photo").set_input_files(str(not_a_photo))
    alert = page.get_by_role("alert")
    alert.wait_for(timeout=WAIT_MS)
    message = alert.inner_text()
    assert message.startswith("The service refused this search. Photo:"), message
    assert "JPEG or PNG" in message
