"""The search page in real headless Chromium (Debian's), against a real `searchengine serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import pytest
from playwright.sync_api import expect, sync_playwright

from tests.server import EXE, env_for, get, running_server

pytestmark = pytest.mark.slow  # a real server and a real browser

CHROMIUM = os.environ.get("SEARCHENGINE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def library(tmp_path_factory, photos_dir, tiny_model_dir, tiny_captioner_dir):
    root = tmp_path_factory.mktemp("ui")
    photos = root / "photos"
    shutil.copytree(photos_dir / "nature", photos / "nature")
    shutil.copytree(photos_dir / "abstract", photos / "abstract")
    env = env_for(tiny_model_dir, root / "data", tiny_captioner_dir)
    subprocess.run([EXE, "index", str(photos)], env={**env, "SEARCHENGINE_CAPTION_MAX_TOKENS": "8"}, check=True,
                   capture_output=True, timeout=600)
    with running_server(env, root / "serve.log") as (base, _):
        yield {"base": base, "photos": photos, "root": root, "env": env}


@pytest.fixture(scope="module")
def screenshots(tmp_path_factory) -> Path:
    """Screenshots land here (or in $SEARCHENGINE_SCREENSHOTS): look at them."""
    out = Path(os.environ.get("SEARCHENGINE_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set SEARCHENGINE_CHROMIUM)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, library):
    context = browser.new_context(viewport=DESKTOP)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_default_timeout(20_000)
    yield page
    context.close()
    # The page never reaches any host but the one serving it: no CDN, no web fonts.
    foreign = [u for u in requests if not (u.startswith(library["base"] + "/") or u.startswith("data:"))]
    assert not foreign, foreign


def api(library, path: str) -> dict:
    status, body = get(library["base"] + path)
    assert status == 200, body
    return json.loads(body)


def tiles(page):
    return page.locator("#grid .tile")


def images_loaded(page) -> None:
    page.wait_for_function(
        "[...document.querySelectorAll('#grid img')].slice(0, 12).every(i => i.complete && i.naturalWidth > 0)"
    )


def search(page, library, text: str) -> None:
    page.goto(library["base"] + "/")
    expect(page.locator("#status")).to_contain_text("Search")
    page.locator("#q").press_sequentially(text, delay=20)  # as typed: the page searches as you type
    expect(tiles(page).first).to_be_visible()


def test_type_a_query_and_see_results(page, library, screenshots):
    search(page, library, "yellow flower")
    want = api(library, "/api/search?q=yellow+flower&k=48")["hits"]
    expect(tiles(page)).to_have_count(len(want))
    assert [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")] == [h["id"] for h in want]
    assert "q=yellow+flower" in page.url
    expect(page.locator("#status")).to_contain_text("re-ranked by ITM")
    # Thumbnails come from the thumbnail endpoint, never the originals.
    srcs = tiles(page).locator("img").evaluate_all("imgs => imgs.map(i => i.getAttribute('src'))")
    assert all(re.fullmatch(r"/api/images/\d+/thumbnail", s) for s in srcs)
    tiles(page).first.hover()
    expect(tiles(page).first.locator(".score")).to_have_text(f"{want[0]['score']:.3f}")
    images_loaded(page)
    page.screenshot(path=screenshots / "results-desktop.png")
    page.set_viewport_size(PHONE)
    images_loaded(page)
    page.screenshot(path=screenshots / "results-phone.png")


def test_detail_view_and_keyboard(page, library, screenshots):
    search(page, library, "sand dune")
    hits = api(library, "/api/search?q=sand+dune&k=48")["hits"]
    tiles(page).nth(0).click()
    detail = page.locator("#detail")
    expect(detail).to_be_visible()
    expect(page.locator("#d-name")).to_have_text(Path(hits[0]["path"]).name)
    expect(page.locator("#d-path")).to_have_text(hits[0]["path"])
    expect(page.locator("#d-score")).to_have_text(f"{hits[0]['score']:.3f}")
    expect(page.locator("#d-itm")).to_have_text(f"{hits[0]['itm']:.3f}")
    expect(page.locator("#d-itc")).to_have_text(f"{hits[0]['itc']:.3f}")
    expect(page.locator("#d-size")).to_have_text(f"{hits[0]['width']} × {hits[0]['height']}")
    expect(page.locator("#d-file")).to_have_attribute("href", hits[0]["file_url"])
    page.wait_for_function("document.getElementById('d-img').complete")
    page.screenshot(path=screenshots / "detail-desktop.png")
    page.keyboard.press("ArrowRight")
    expect(page.locator("#d-name")).to_have_text(Path(hits[1]["path"]).name)
    page.keyboard.press("ArrowRight")
    expect(page.locator("#d-name")).to_have_text(Path(hits[2]["path"]).name)
    page.keyboard.press("ArrowLeft")
    expect(page.locator("#d-name")).to_have_text(Path(hits[1]["path"]).name)
    page.set_viewport_size(PHONE)
    page.screenshot(path=screenshots / "detail-phone.png")
    page.keyboard.press("Escape")
    expect(detail).to_be_hidden()


def test_more_like_this(page, library):
    search(page, library, "ladybird")
    first_id = int(tiles(page).first.get_attribute("data-id"))
    tiles(page).first.click()
    page.locator("#d-more").click()
    expect(page).to_have_url(re.compile(rf"similar={first_id}"))
    expect(page.locator("#banner")).to_contain_text("More like this")
    want = api(library, f"/api/images/{first_id}/similar?k=48")["hits"]
    expect(tiles(page)).to_have_count(len(want))
    expect(tiles(page).first).to_have_attribute("data-id", str(want[0]["id"]))
    assert first_id not in [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")]


def test_search_by_an_uploaded_image(page, library):
    page.goto(library["base"] + "/")
    expect(page.locator("#status")).to_contain_text("Search")
    example = sorted((library["photos"] / "nature").iterdir())[3]
    page.locator("#file").set_input_files(str(example))
    expect(page.locator("#banner")).to_contain_text(example.name)
    expect(tiles(page).first).to_be_visible()
    tiles(page).first.click()
    expect(page.locator("#d-path")).to_have_text(str(example))  # the same photo comes first
    expect(page.locator("#d-score")).to_have_text("1.000")


def test_filters_change_the_results(page, library):
    folder = library["photos"] / "abstract"
    search(page, library, "waves")
    page.locator("#toggle-filters").click()
    page.locator("#folder").fill(str(folder))
    page.locator("#folder").press("Enter")
    page.locator("#folder").dispatch_event("change")
    expect(page).to_have_url(re.compile("folder="))
    n = len(list(folder.iterdir()))
    expect(tiles(page)).to_have_count(n)
    want = api(library, f"/api/search?q=waves&k=48&folder={quote(str(folder))}")["hits"]
    assert [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")] == [h["id"] for h in want]
    # Re-rank off: ITC order, no ITM score.
    page.locator("#rerank").uncheck()
    expect(page).to_have_url(re.compile("rerank=0"))
    expect(tiles(page).first).to_have_attribute("title", re.compile("ITM –"))  # the new results
    expect(page.locator("#status")).to_contain_text("results")
    expect(page.locator("#status")).not_to_contain_text("re-ranked")
    # Picture only: the semantic mode, ITC order.
    page.locator("#match").select_option("semantic")
    expect(page).to_have_url(re.compile("mode=semantic"))
    want = api(library, f"/api/search?q=waves&k=48&rerank=false&mode=semantic&folder={quote(str(folder))}")["hits"]
    expect(tiles(page).first).to_have_attribute("data-id", str(want[0]["id"]))
    assert [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")] == [h["id"] for h in want]
    # The relevance cutoff drops results (ITC alone never reaches 1.5).
    page.locator("#min").evaluate("(el) => { el.value = '1.5'; el.dispatchEvent(new Event('input')); el.dispatchEvent(new Event('change')); }")
    expect(page).to_have_url(re.compile(r"min=1\.5"))
    expect(page.locator("#status")).to_contain_text("No results above the minimum score")
    expect(tiles(page)).to_have_count(0)


def test_words_only_finds_by_file_name_and_shows_captions(page, library, screenshots):
    page.goto(library["base"] + "/?mode=keyword")
    expect(page.locator("#match")).to_have_value("keyword")
    expect(page.locator("#filters")).to_be_visible()
    page.locator("#q").press_sequentially("ladybird", delay=20)
    want = api(library, "/api/search?q=ladybird&k=48&mode=keyword")["hits"]
    assert want[0]["path"].endswith("/LadyBird.jpg") and want[0]["keyword"] == 1.0
    expect(tiles(page)).to_have_count(len(want))
    assert [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")] == [h["id"] for h in want]
    tiles(page).first.click()
    expect(page.locator("#d-name")).to_have_text("LadyBird.jpg")
    expect(page.locator("#d-kw")).to_have_text("100% of the words")
    expect(page.locator("#d-caption")).to_have_text(want[0]["caption"])
    assert want[0]["caption"]  # made at index time by the tiny captioner
    page.screenshot(path=screenshots / "keyword-detail.png")


def test_url_round_trips_and_back_forward(page, library):
    folder = library["photos"] / "nature"
    page.goto(f"{library['base']}/?q=storm&folder={quote(str(folder))}")
    expect(page.locator("#q")).to_have_value("storm")
    expect(page.locator("#folder")).to_have_value(str(folder))
    expect(page.locator("#filters")).to_be_visible()
    expect(tiles(page)).to_have_count(len(list(folder.iterdir())))
    page.locator("#q").fill("garden")
    page.locator("#q").press("Enter")
    expect(page).to_have_url(re.compile("q=garden"))
    page.go_back()
    expect(page.locator("#q")).to_have_value("storm")
    expect(page).to_have_url(re.compile("q=storm"))
    page.go_forward()
    expect(page.locator("#q")).to_have_value("garden")


def test_no_results_and_error_states(page, library, screenshots):
    page.goto(f"{library['base']}/?q=flower&after=2090-01-01")
    expect(page.locator("#status")).to_have_text("No results with these filters.")
    page.goto(f"{library['base']}/?q=" + "dog%20" * 300)  # over the query length limit: an API error
    expect(page.locator("#status.error")).to_contain_text("the limit is")
    page.screenshot(path=screenshots / "error-desktop.png")


def test_loading_state_until_the_model_is_ready(page, library):
    ready = {"now": False}

    def loading(route):
        if ready["now"]:
            return route.continue_()
        route.fulfill(status=503, content_type="application/json",
                      body=json.dumps({"error": "the service is still loading the model; try again in a moment"}))

    def healthz(route):
        if ready["now"]:
            return route.continue_()
        route.fulfill(status=503, content_type="application/json", body=json.dumps({"status": "loading", "error": None}))

    page.route("**/api/stats", loading)
    page.route("**/healthz", healthz)
    page.goto(library["base"] + "/")
    expect(page.locator("#status")).to_contain_text("Loading the model")
    ready["now"] = True
    expect(page.locator("#status")).to_contain_text("Search", timeout=10_000)


def test_empty_library_says_how_to_index(browser, tmp_path, tiny_model_dir, screenshots):
    with running_server(env_for(tiny_model_dir, tmp_path / "empty"), tmp_path / "serve.log") as (base, _):
        context = browser.new_context(viewport=PHONE)
        page = context.new_page()
        page.goto(base + "/")
        expect(page.locator("#status")).to_contain_text("Your library is empty")
        expect(page.locator("#status code")).to_have_text("searchengine index ~/Pictures")
        page.screenshot(path=screenshots / "empty-phone.png")
        context.close()


def test_the_page_is_small(library):
    sizes = {name: len(get(library["base"] + path)[1]) for name, path in
             [("html", "/"), ("js", "/static/app.js"), ("css", "/static/app.css")]}
    assert sum(sizes.values()) < 60_000, sizes
