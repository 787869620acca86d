"""The search page in real headless Chromium (Debian's), against a real `searchengine serve`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect, sync_playwright

from tests.images import gradient
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
    # An index with no photos yet (only `index` makes one: `serve` on a data dir with no index
    # refuses to start, so a typo in --data-dir is never shown as an empty library).
    env = env_for(tiny_model_dir, tmp_path / "empty")
    (tmp_path / "nothing").mkdir()
    subprocess.run([EXE, "index", str(tmp_path / "nothing")], env=env, check=True, capture_output=True, timeout=300)
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
