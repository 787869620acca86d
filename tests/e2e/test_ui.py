"""The search page in real headless Chromium (Debian's), against a real `searchengine serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from searchengine.models.tiny import build_tiny_captioner
from tests.inprocess import run_cli
from tests.images import gradient
from tests.server import env_for, get, running_server

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
    # A long path (issue 16: paths broke mid-word on a phone), in a subfolder found by name,
    # holding a transparent image.
    deep = photos / "Trips" / "Winter 2022" / "Mountains above the lake at dawn"
    deep.mkdir(parents=True)
    rgba = np.dstack([gradient(300, 200), np.full((200, 300), 255, np.uint8)])
    rgba[:, 150:, 3] = 0
    Image.fromarray(rgba, "RGBA").save(deep / "transparent-logo.png")
    for i in range(5):  # the same file in more folders: one image with six paths, a long panel
        (photos / "Backups" / f"copy {i}").mkdir(parents=True)
        shutil.copy(deep / "transparent-logo.png", photos / "Backups" / f"copy {i}" / "transparent-logo.png")
    env = env_for(tiny_model_dir, root / "data", tiny_captioner_dir)
    indexed = run_cli("index", photos, env={**env, "SEARCHENGINE_CAPTION_MAX_TOKENS": "8"}, clean=False)  # only the server is a process
    assert indexed.returncode == 0, indexed.stderr
    # Questions about photos: a tiny BLIP-2 OPT model answers them.
    env["SEARCHENGINE_VQA_MODEL"] = str(build_tiny_captioner(root / "tiny-blip2-opt", kind="blip2", seed=1))
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


def _page(browser, library, **context_options):
    context = browser.new_context(**context_options)
    page = context.new_page()
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.set_default_timeout(20_000)
    page.requests = requests
    yield page
    context.close()
    # The page never reaches any host but the one serving it: no CDN, no web fonts.
    foreign = [u for u in requests if not (u.startswith(library["base"] + "/") or u.startswith("data:"))]
    assert not foreign, foreign


@pytest.fixture
def page(browser, library):
    yield from _page(browser, library, viewport=DESKTOP)


@pytest.fixture
def phone(browser, library):
    """A phone: 390 x 844, touch, no hover."""
    yield from _page(browser, library, viewport=PHONE, has_touch=True, is_mobile=True, device_scale_factor=2)


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


def settled(page) -> None:
    """The search's final ranking is shown (results sharpen: the ITC order comes first)."""
    page.wait_for_function("window.searchTimes && window.searchTimes.reranked > 0")


def search(page, library, text: str) -> None:
    page.goto(library["base"] + "/")
    expect(page.locator("#status")).to_contain_text("Search")
    page.locator("#q").press_sequentially(text, delay=20)  # as typed: the page searches as you type
    expect(tiles(page).first).to_be_visible()
    settled(page)


def test_type_a_query_and_see_results(page, library, screenshots):
    search(page, library, "yellow flower")
    want = api(library, "/api/search?q=yellow+flower&k=48")["hits"]
    expect(tiles(page)).to_have_count(len(want))
    expect(page.locator("#status")).to_contain_text("re-ranked by ITM")  # the ITC order came first
    assert [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")] == [h["id"] for h in want]
    assert "q=yellow+flower" in page.url
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
    settled(page)
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
    # An index with no photos yet (only `index` makes one: `serve` on a data dir with no index
    # refuses to start, so a typo in --data-dir is never shown as an empty library).
    env = env_for(tiny_model_dir, tmp_path / "empty")
    (tmp_path / "nothing").mkdir()
    assert run_cli("index", tmp_path / "nothing", env=env, clean=False).returncode == 0
    with running_server(env, tmp_path / "serve.log") as (base, _):
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


# -- issue 16: the detail view's image, folders by name, a phone --------------------------


def test_detail_view_shows_the_preview_and_loads_the_original_only_when_asked(page, library):
    big = library["photos"] / "abstract" / "Elephants_5640x3172.jpg"  # 16 MB
    hit = api(library, "/api/search?q=Elephants_5640x3172&mode=keyword&k=1")["hits"][0]
    assert hit["path"] == str(big)
    page.goto(f"{library['base']}/?q=Elephants_5640x3172&mode=keyword")
    tiles(page).first.click()
    expect(page.locator("#d-img")).to_have_attribute("src", hit["preview_url"])
    page.wait_for_function("document.getElementById('d-img').complete && document.getElementById('d-img').naturalWidth > 0")
    assert page.locator("#d-img").evaluate("i => [i.naturalWidth, i.naturalHeight]") == [1600, 900]
    expect(page.locator("#d-file")).to_have_attribute("href", hit["file_url"])
    assert len(get(library["base"] + hit["preview_url"])[1]) < big.stat().st_size / 20
    assert any(u.endswith(hit["preview_url"]) for u in page.requests)
    assert not [u for u in page.requests if u.endswith("/file")]  # no original was fetched
    with page.expect_popup() as popup:
        page.locator("#d-file").click()  # "Open original": now, and only now, the file
    popup.value.wait_for_load_state()
    assert popup.value.url == library["base"] + hit["file_url"]
    popup.value.close()


def test_folder_field_suggests_subfolders_and_takes_a_name(page, library):
    photos = library["photos"]
    page.goto(f"{library['base']}/?q=mountains")
    page.locator("#toggle-filters").click()
    page.locator("#folder").press_sequentially("winter", delay=20)
    options = page.locator("#folders option")
    expect(options).to_have_count(2)
    assert options.evaluate_all("os => os.map(o => [o.value, o.label])") == [
        [str(photos / "Trips" / "Winter 2022"), "1 photo"],
        [str(photos / "Trips" / "Winter 2022" / "Mountains above the lake at dawn"), "1 photo"],
    ]
    page.locator("#folder").fill("")
    page.locator("#folder").press_sequentially("NATURE", delay=20)  # any case, anywhere in the path
    expect(options).to_have_count(1)
    expect(options.first).to_have_attribute("value", str(photos / "nature"))
    # A bare folder name filters (no absolute path needed) ...
    page.locator("#folder").fill("Winter 2022")
    page.locator("#folder").dispatch_event("change")
    expect(page).to_have_url(re.compile("folder=Winter"))
    expect(tiles(page)).to_have_count(1)
    tiles(page).first.click()
    expect(page.locator("#d-name")).to_have_text("transparent-logo.png")
    page.keyboard.press("Escape")
    # ... and one that matches no folder says so, rather than showing an empty page.
    page.locator("#folder").fill("Winter 2023")
    page.locator("#folder").dispatch_event("change")
    expect(page.locator("#status.error")).to_contain_text("no indexed folder matches 'Winter 2023'")


def test_slash_focuses_the_search_box(page, library):
    search(page, library, "garden")
    page.locator("main").click(position={"x": 5, "y": 5})
    expect(page.locator("#q")).not_to_be_focused()
    page.keyboard.press("/")
    expect(page.locator("#q")).to_be_focused()
    expect(page.locator("#q")).to_have_value("garden")  # the "/" is not typed into it
    tiles(page).first.click()  # from the detail view too
    expect(page.locator("#detail")).to_be_visible()
    page.keyboard.press("/")
    expect(page.locator("#detail")).to_be_hidden()
    expect(page.locator("#q")).to_be_focused()
    # In a field, "/" is just a character.
    page.locator("#toggle-filters").click()
    page.locator("#folder").click()
    page.keyboard.type("a/b")
    expect(page.locator("#folder")).to_have_value("a/b")
    expect(page.locator("#folder")).to_be_focused()


def placeholder_fits(page) -> tuple[float, float]:
    """(the placeholder's text width, the room for it in the search box), in CSS pixels."""
    return page.locator("#q").evaluate("""q => {
        const css = getComputedStyle(q);
        const ctx = document.createElement('canvas').getContext('2d');
        ctx.font = `${css.fontStyle} ${css.fontWeight} ${css.fontSize} ${css.fontFamily}`;
        return [ctx.measureText(q.placeholder).width, q.clientWidth - parseFloat(css.paddingLeft) - parseFloat(css.paddingRight)];
    }""")


def test_desktop_keeps_the_long_placeholder_and_the_drop_hint(page, library):
    page.goto(library["base"] + "/")
    expect(page.locator("#status")).to_contain_text("drop an image here")
    expect(page.locator("#q")).to_have_attribute("placeholder", re.compile("e.g. a dog on a beach"))
    width, room = placeholder_fits(page)
    assert width <= room
    search(page, library, "garden")
    expect(tiles(page).first.locator(".meta")).to_be_hidden()  # a mouse can hover for the score


def lines_and_bad_breaks(locator) -> dict:
    """Where the text of each line box of `locator`'s block children wraps, from the browser's
    own layout: a break is allowed after "/", "-" or at a space, nowhere else."""
    return locator.evaluate("""el => {
        const out = {lines: 0, bad: []};
        for (const block of el.children.length ? el.children : [el]) {
            let prev = null;
            out.lines++;
            const walker = document.createTreeWalker(block, NodeFilter.SHOW_TEXT);
            for (let n = walker.nextNode(); n; n = walker.nextNode()) {
                for (let i = 0; i < n.length; i++) {
                    const r = document.createRange();
                    r.setStart(n, i); r.setEnd(n, i + 1);
                    const rect = r.getClientRects()[0];
                    if (!rect) continue;
                    const ch = n.data[i];
                    if (prev && rect.top > prev.top + 2) {
                        out.lines++;
                        if (!"/- ".includes(prev.ch) && ch !== " ") out.bad.push(prev.ch + "|" + ch);
                    }
                    prev = {top: rect.top, ch};
                }
            }
        }
        return out;
    }""")


def test_phone_layout(phone, library, screenshots):
    page = phone
    page.goto(library["base"] + "/")
    # No dragging on a phone: the hint says how to pick an image.
    expect(page.locator("#status")).to_contain_text("pick an image")
    expect(page.locator("#status")).not_to_contain_text("drop")
    # The placeholder fits the narrow search box.
    width, room = placeholder_fits(page)
    assert width <= room, (page.locator("#q").get_attribute("placeholder"), width, room)
    page.screenshot(path=screenshots / "start-phone.png")
    # Tiles show a name and score without hover.
    page.locator("#q").press_sequentially("mountains lake", delay=20)
    expect(tiles(page).first).to_be_visible()
    hits = api(library, "/api/search?q=mountains+lake&k=48")["hits"]
    first = tiles(page).first
    meta = first.locator(".meta")
    expect(meta).to_be_visible()
    expect(meta.locator(".n")).to_have_text(Path(hits[0]["path"]).name)
    expect(meta.locator(".s")).to_have_text(f"{hits[0]['score']:.3f}")
    assert meta.evaluate("m => getComputedStyle(m).opacity") == "1"
    box, tile_box = meta.bounding_box(), first.bounding_box()
    assert box["height"] >= 12 and tile_box["y"] <= box["y"] and box["y"] + box["height"] <= tile_box["y"] + tile_box["height"] + 0.5
    images_loaded(page)
    page.screenshot(path=screenshots / "results-phone-touch.png")
    # The detail view of the photo with the long path.
    deep = next(i for i, h in enumerate(hits) if h["path"].endswith("transparent-logo.png"))
    tiles(page).nth(deep).tap()
    expect(page.locator("#d-name")).to_have_text("transparent-logo.png")
    assert len(hits[deep]["paths"]) == 6
    expect(page.locator("#d-path span")).to_have_text(hits[deep]["paths"])
    wrapped = lines_and_bad_breaks(page.locator("#d-path"))
    assert wrapped["lines"] >= 10 and wrapped["bad"] == [], wrapped  # it wraps, and only between words
    # The panel is longer than the room it has ...
    assert page.locator("aside").evaluate("a => a.scrollHeight > a.clientHeight + 100")
    # ... yet "More like this" and "Open original" are in view, not under anything, without scrolling.
    for action in ("#d-more", "#d-file"):
        box = page.locator(action).bounding_box()
        assert box and box["y"] >= 0 and box["y"] + box["height"] <= PHONE["height"], (action, box)
        cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
        assert page.evaluate(f"document.elementFromPoint({cx}, {cy}).closest('{action}') !== null"), action
    page.wait_for_function("document.getElementById('d-img').complete")
    page.screenshot(path=screenshots / "detail-phone-touch.png")
    page.locator("#d-more").tap()
    expect(page.locator("#banner")).to_contain_text("More like this")


# -- issue 14: results that sharpen, steering, strong matches, facets, questions, duplicates ---


def grid_ids(page) -> list[int]:
    return [int(x) for x in tiles(page).evaluate_all("ts => ts.map(t => t.dataset.id)")]


def reranked(page) -> None:
    expect(page.locator("#status")).to_contain_text("re-ranked by ITM")


RECORD_ORDERS = """() => {
  window.orders = [];
  new MutationObserver(() => {
    const ids = [...document.querySelectorAll('#grid .tile')].map(t => Number(t.dataset.id));
    const last = window.orders[window.orders.length - 1];
    if (ids.length && (!last || last.join() !== ids.join())) window.orders.push(ids);
  }).observe(document.getElementById('grid'), { childList: true });
}"""


def test_results_sharpen_in_place(page, library):
    """The ITC order shows first, then the ITM order replaces it in place: same number of
    tiles, so nothing jumps; both moments are timed (window.searchTimes)."""
    page.goto(library["base"] + "/")
    expect(page.locator("#status")).to_contain_text("Search")
    page.evaluate(RECORD_ORDERS)
    page.locator("#q").fill("a yellow flower")
    page.locator("#q").press("Enter")
    reranked(page)
    itc = [h["id"] for h in api(library, "/api/search?q=a+yellow+flower&k=48&rerank=false")["hits"]]
    itm = [h["id"] for h in api(library, "/api/search?q=a+yellow+flower&k=48")["hits"]]
    assert itc != itm  # re-ranking changes the order, or this test would show nothing
    orders = page.evaluate("window.orders")
    assert orders[0] == itc and orders[-1] == itm and grid_ids(page) == itm
    assert {len(o) for o in orders} == {len(itm)}  # the grid never changed size
    times = page.evaluate("window.searchTimes")
    assert 0 < times["first"] <= times["reranked"]
    print(f"time to first results {times['first']:.0f} ms, to re-ranked results {times['reranked']:.0f} ms (tiny model)")


def test_plus_and_minus_steer_the_next_search(page, library, screenshots):
    search(page, library, "yellow flower")
    reranked(page)
    liked = grid_ids(page)[3]
    tile = page.locator(f"#grid .tile[data-id='{liked}']")
    tile.hover()
    tile.locator(".steer-btn.like").click()
    expect(page).to_have_url(re.compile(rf"like={liked}"))
    expect(page.locator("#steer .chip.like")).to_have_count(1)
    reranked(page)
    want = [h["id"] for h in api(library, f"/api/search?q=yellow+flower&k=48&like={liked}")["hits"]]
    assert grid_ids(page) == want
    unliked = grid_ids(page)[0]
    tile = page.locator(f"#grid .tile[data-id='{unliked}']")
    tile.hover()
    tile.locator(".steer-btn.unlike").click()
    expect(page).to_have_url(re.compile(rf"unlike={unliked}"))
    reranked(page)
    want = [h["id"] for h in api(library, f"/api/search?q=yellow+flower&k=48&like={liked}&unlike={unliked}")["hits"]]
    assert grid_ids(page) == want and unliked not in want
    page.wait_for_function("document.getAnimations().length === 0")  # the tiles have slid into place
    page.screenshot(path=screenshots / "steered.png")
    page.locator("#steer .chip.like button").click()  # the chip's x stops steering towards it
    expect(page).not_to_have_url(re.compile("like=" + str(liked)))
    expect(page.locator("#steer .chip")).to_have_count(1)
    settled(page)  # a tile of the ranking being replaced opens nothing: its hits are gone
    # the detail view's buttons do the same, for the keyboard
    tiles(page).first.click()
    page.locator("#d-like").click()
    expect(page.locator("#steer .chip.like")).to_have_count(1)
    # words only cannot take examples: steering there switches to words + picture
    page.goto(library["base"] + "/?q=yellow+flower&mode=keyword")
    expect(tiles(page).first).to_be_visible()
    tile = tiles(page).first
    tile.hover()
    tile.locator(".steer-btn.like").click()
    expect(page.locator("#match")).to_have_value("hybrid")
    reranked(page)


def test_only_strong_matches_and_their_count(page, library):
    want = api(library, "/api/search?q=yellow+flower&k=48&min_itm=0.5")
    page.goto(library["base"] + "/?q=yellow+flower&only=1")
    expect(page.locator("#only")).to_be_checked()
    if want["hits"]:
        expect(page.locator("#status")).to_contain_text(f"{want['strong']} strong match")
        expect(tiles(page)).to_have_count(len(want["hits"]))
        assert grid_ids(page) == [h["id"] for h in want["hits"]]
    else:
        expect(page.locator("#status")).to_contain_text("No strong matches")
    page.locator("#only").uncheck()
    reranked(page)
    all_hits = api(library, "/api/search?q=yellow+flower&k=48")
    expect(page.locator("#status")).to_contain_text(f"{all_hits['strong']} strong match")


def test_facets_in_the_filter_panel(page, library):
    facets = api(library, "/api/facets")
    png = dict((v["value"], v["images"]) for v in facets["type"])["png"]
    page.goto(library["base"] + "/?q=photo")
    page.locator("#toggle-filters").click()
    expect(page.locator("#type")).to_contain_text(f"png ({png})")
    expect(page.locator("#orientation")).to_contain_text("landscape (")
    expect(page.locator("label[data-facet='lens']")).to_be_hidden()  # no photo here names its lens
    page.locator("#type").select_option("png")
    expect(page).to_have_url(re.compile("type=png"))
    expect(tiles(page)).to_have_count(png)
    want = api(library, "/api/search?q=photo&k=48&type=png")["hits"]
    reranked(page)
    assert grid_ids(page) == [h["id"] for h in want] and all(h["path"].endswith(".png") for h in want)


def test_ask_a_question_in_the_detail_view(page, library, screenshots):
    search(page, library, "sand dune")
    reranked(page)
    first = grid_ids(page)[0]
    tiles(page).first.click()
    expect(page.locator("#d-ask")).to_be_visible()
    page.locator("#d-question").fill("what is in the picture?")
    page.locator("#d-question").press("Enter")
    import urllib.request

    request = urllib.request.Request(
        f"{library['base']}/api/images/{first}/ask", data=json.dumps({"question": "what is in the picture?"}).encode(),
        headers={"Content-Type": "application/json"}, method="POST",
    )
    with urllib.request.urlopen(request, timeout=60) as r:
        want = json.loads(r.read())["answer"]
    expect(page.locator("#d-answer")).to_have_text(want or "(no answer)")
    page.screenshot(path=screenshots / "ask.png")
    page.keyboard.press("ArrowRight")  # another photo: the answer goes
    expect(page.locator("#d-answer")).to_have_text("")


def test_without_a_question_model_the_box_is_hidden_with_a_note(page, library):
    page.route("**/api/vqa", lambda route: route.fulfill(
        status=200, content_type="application/json",
        body=json.dumps({"available": False, "model": None, "reason": "no model"}),
    ))
    search(page, library, "sand dune")
    tiles(page).first.click()
    expect(page.locator("#d-ask")).to_be_hidden()
    expect(page.locator("#d-ask-note")).to_contain_text("--vqa-model")


def test_the_duplicates_page_shows_groups_side_by_side(page, library, screenshots):
    want = api(library, "/api/duplicates?threshold=0.95&limit=20")
    page.goto(library["base"] + "/?view=duplicates")
    expect(page.locator("#dups")).to_be_visible()
    expect(page.locator("#grid")).to_be_hidden()
    expect(page.locator("#dups-status")).to_contain_text("among")
    expect(page.locator(".dup-group")).to_have_count(len(want["groups"]))
    for i, group in enumerate(want["groups"][:3]):
        cards = page.locator(".dup-group").nth(i).locator(".dup")
        assert [int(x) for x in cards.evaluate_all("cs => cs.map(c => c.dataset.id)")] == [m["id"] for m in group["images"]]
        expect(cards.first).to_contain_text(f"{group['images'][0]['width']} × {group['images'][0]['height']}")
    page.screenshot(path=screenshots / "duplicates.png")
    page.locator("#dups-threshold").select_option("0.98")
    strict = api(library, "/api/duplicates?threshold=0.98&limit=20")
    expect(page.locator(".dup-group")).to_have_count(len(strict["groups"]))
    page.locator("#dups-back").click()
    expect(page.locator("#dups")).to_be_hidden()
    expect(page).not_to_have_url(re.compile("view=duplicates"))


def test_the_detail_view_shows_where_the_words_match(page, library, screenshots):
    search(page, library, "sand dune")
    reranked(page)
    first = grid_ids(page)[0]
    tiles(page).first.click()
    button = page.locator("#d-explain")
    expect(button).to_be_visible()
    expect(button).to_have_attribute("aria-pressed", "false")
    button.click()
    expect(button).to_have_attribute("aria-pressed", "true")
    expect(page.locator("#d-img")).to_have_attribute("src", re.compile(rf"/api/images/{first}/explain\.png\?q=sand%20dune"))
    page.wait_for_function("document.getElementById('d-img').complete && document.getElementById('d-img').naturalWidth > 0")
    expect(page.locator("#d-explain-note")).to_contain_text("what matches “sand dune”")
    # The map is the preview's size, drawn over it.
    size = page.evaluate("[document.getElementById('d-img').naturalWidth, document.getElementById('d-img').naturalHeight]")
    want = api(library, f"/api/images/{first}")
    longest = max(want["width"], want["height"])
    assert max(size) == min(longest, 1600), (size, want)
    page.screenshot(path=screenshots / "explain.png")
    button.click()  # off: the photo as it is
    expect(page.locator("#d-img")).to_have_attribute("src", re.compile(rf"/api/images/{first}/preview"))
    page.keyboard.press("ArrowRight")  # another photo starts without the map
    expect(button).to_have_attribute("aria-pressed", "false")
    # With no words (search by an example), there is nothing to explain.
    page.goto(f"{library['base']}/?similar={first}")
    expect(tiles(page).first).to_be_visible()
    tiles(page).first.click()
    expect(page.locator("#detail")).to_be_visible()
    expect(button).to_be_hidden()


def test_a_three_turn_conversation_in_the_detail_view(page, library, screenshots):
    """Each question goes with the turns before it, the answer streams in, and the panel
    shows the conversation; "New conversation" starts again."""
    import urllib.request

    search(page, library, "sand dune")
    reranked(page)
    first = grid_ids(page)[0]
    tiles(page).first.click()
    expect(page.locator("#d-ask")).to_be_visible()
    questions = ["what is in the picture?", "is it sunny?", "where is it?"]
    turns = []
    for n, question in enumerate(questions):
        page.locator("#d-question").fill(question)
        page.locator("#d-question").press("Enter")
        request = urllib.request.Request(
            f"{library['base']}/api/images/{first}/chat", data=json.dumps({"question": question, "turns": turns}).encode(),
            headers={"Content-Type": "application/json"}, method="POST",
        )
        with urllib.request.urlopen(request, timeout=60) as r:
            want = json.loads(r.read())["answer"]
        expect(page.locator("#d-answer")).to_have_text(want or "(no answer)")
        expect(page.locator("#d-asked")).to_have_text(question)
        expect(page.locator("#d-turns li")).to_have_count(n)  # the earlier turns
        expect(page.locator("#d-ask-go")).to_be_enabled()
        turns.append({"question": question, "answer": want})
    assert page.locator("#d-turns li b").all_inner_texts() == questions[:2]
    page.screenshot(path=screenshots / "chat.png")
    page.locator("#d-new-chat").click()
    expect(page.locator("#d-turns li")).to_have_count(0)
    expect(page.locator("#d-answer")).to_have_text("")
    expect(page.locator("#d-new-chat")).to_be_hidden()
