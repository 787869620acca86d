// The search page. Talks to the HTTP API only; no framework, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const PAGE = 48;

const state = {
  mode: "text",        // "text" | "similar" | "upload"
  q: "",
  similar: null,       // image id for "more like this"
  upload: null,        // a File for search by example (not in the URL)
  folder: "", after: "", before: "", rerank: true, min: 0, match: "hybrid",
  hits: [],
  nextOffset: null,
  busy: false,
  request: 0,          // newer requests make older answers stale
  detail: -1,          // index of the hit shown in the detail view
  images: null,        // images in the library (from /api/stats)
};

// -- the API ---------------------------------------------------------------------------------

function apiKey() { return localStorage.getItem("searchengine.api_key") || ""; }

function withKey(url) {
  const key = apiKey();
  return key ? url + (url.includes("?") ? "&" : "?") + "api_key=" + encodeURIComponent(key) : url;
}

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

async function api(url, options = {}) {
  const headers = apiKey() ? { "X-API-Key": apiKey() } : {};
  let response;
  try {
    response = await fetch(url, { ...options, headers });
  } catch (e) {
    throw new ApiError(0, "cannot reach the search service: is `searchengine serve` running?");
  }
  if (response.status === 401) {
    const key = prompt("This search service needs an API key:");
    if (key) { localStorage.setItem("searchengine.api_key", key); return api(url, options); }
  }
  let body = null;
  try { body = await response.json(); } catch (e) { /* not JSON */ }
  if (!response.ok) throw new ApiError(response.status, (body && body.error) || `HTTP ${response.status}`);
  return body;
}

// -- the URL holds the search: bookmarks, sharing, back and forward ---------------------------

function readURL() {
  const p = new URLSearchParams(location.search);
  state.q = p.get("q") || "";
  state.similar = p.get("similar");
  state.mode = state.similar ? "similar" : "text";
  state.upload = null;
  state.folder = p.get("folder") || "";
  state.after = p.get("after") || "";
  state.before = p.get("before") || "";
  state.rerank = p.get("rerank") !== "0";
  state.match = ["semantic", "keyword"].includes(p.get("mode")) ? p.get("mode") : "hybrid";
  state.min = parseFloat(p.get("min") || "0") || 0;
  $("q").value = state.q;
  $("folder").value = state.folder;
  $("after").value = state.after;
  $("before").value = state.before;
  $("rerank").checked = state.rerank;
  $("match").value = state.match;
  $("min").value = state.min;
  showMin();
  if (state.folder || state.after || state.before || !state.rerank || state.min || state.match !== "hybrid") setFilters(true);
}

function writeURL(push) {
  const p = new URLSearchParams();
  if (state.mode === "text" && state.q) p.set("q", state.q);
  if (state.mode === "similar") p.set("similar", state.similar);
  if (state.folder) p.set("folder", state.folder);
  if (state.after) p.set("after", state.after);
  if (state.before) p.set("before", state.before);
  if (!state.rerank) p.set("rerank", "0");
  if (state.match !== "hybrid") p.set("mode", state.match);
  if (state.min) p.set("min", String(state.min));
  const url = location.pathname + (p.toString() ? "?" + p : "");
  if (url === location.pathname + location.search) return;
  (push ? history.pushState : history.replaceState).call(history, null, "", url);
}

// -- searching -------------------------------------------------------------------------------

function filterParams(p) {
  if (state.folder) p.set("folder", state.folder);
  if (state.after) p.set("taken_after", state.after);
  if (state.before) p.set("taken_before", state.before);
  if (state.min) p.set("min_score", String(state.min));
  return p;
}

async function fetchPage(offset) {
  const p = filterParams(new URLSearchParams({ k: PAGE, offset }));
  if (state.mode === "text") {
    p.set("q", state.q);
    p.set("rerank", state.rerank ? "true" : "false");
    p.set("mode", state.match);
    return api("/api/search?" + p);
  }
  if (state.mode === "similar") return api(`/api/images/${encodeURIComponent(state.similar)}/similar?` + p);
  const form = new FormData();
  form.append("image", state.upload);
  return api("/api/search/image?" + p, { method: "POST", body: form });
}

async function search() {
  const request = ++state.request;
  state.hits = [];
  state.nextOffset = null;
  state.busy = true;
  banner();
  if (state.mode === "text" && !state.q.trim()) {
    state.busy = false;
    render();
    return idle();
  }
  status("Searching…");
  try {
    const page = await fetchPage(0);
    if (request !== state.request) return;
    state.hits = page.hits;
    state.nextOffset = page.next_offset;
    state.busy = false;
    $("grid").textContent = "";  // a new ranking: no tile of the last one may stay
    render();
    if (!page.hits.length) {
      status(state.min ? "No results above the minimum score. Lower it in Filters."
        : state.folder || state.after || state.before ? "No results with these filters." : "No results.");
    } else {
      status(timings(page));
    }
  } catch (e) {
    if (request !== state.request) return;
    state.busy = false;
    render();
    failed(e);
  }
}

async function loadMore() {
  if (state.busy || state.nextOffset == null) return;
  const request = state.request;
  state.busy = true;
  try {
    const page = await fetchPage(state.nextOffset);
    if (request !== state.request) return;
    state.hits = state.hits.concat(page.hits);
    state.nextOffset = page.next_offset;
    render();
  } catch (e) {
    if (request === state.request) failed(e);
  } finally {
    if (request === state.request) state.busy = false;
  }
}

function timings(page) {
  const t = page.timings_ms;
  const more = page.next_offset != null ? "+" : "";
  return `${state.hits.length}${more} results · ${Math.round(t.total)} ms` +
    (page.reranked ? ` · ${page.reranked} re-ranked by ITM` : "");
}

// -- states ----------------------------------------------------------------------------------

function status(text, kind = "") {
  const el = $("status");
  el.className = kind;
  el.textContent = text;
}

function failed(e) {
  if (e.status === 503) return waitForService(e.message);
  status(e.message, "error");
}

function idle() {
  if (state.images === 0) {
    $("status").className = "big";
    $("status").innerHTML = "Your library is empty. Index a folder of photos, then search here:" +
      "<br><br><code>searchengine index ~/Pictures</code>";
  } else if (state.images != null) {
    // Nothing can be dragged onto a page on a phone: there it says how to pick one.
    const how = noDrag() ? "pick an image (Image…)" : "drop an image here";
    status(`Search ${state.images} photos in words, or ${how} to find photos like it.`, "big");
  } else {
    status("");
  }
}

async function waitForService(message) {
  // Routes say "still loading" or "could not start: ..."; /healthz carries the start error.
  if (/could not start/.test(message || "")) return status(message, "error big");
  status("Loading the model… the first start takes a while.", "big");
  for (;;) {
    await new Promise((r) => setTimeout(r, 1000));
    try {
      await api("/healthz");
      return start();
    } catch (e) {
      if (e.status !== 503) return status(e.message, "error big");
      if (e.message !== "HTTP 503") return status(`The service could not start: ${e.message}`, "error big");
    }
  }
}

function banner() {
  const el = $("banner");
  if (state.mode === "upload" && state.upload) {
    el.hidden = false;
    el.textContent = `Photos like ${state.upload.name}`;
  } else if (state.mode === "similar") {
    el.hidden = false;
    el.innerHTML = "";
    const img = document.createElement("img");
    img.src = withKey(`/api/images/${encodeURIComponent(state.similar)}/thumbnail`);
    img.alt = "";
    el.append(img, document.createTextNode("More like this photo"));
  } else {
    el.hidden = true;
  }
}

// -- the grid --------------------------------------------------------------------------------

function fmt(x) { return x == null ? "–" : x.toFixed(3); }
function basename(path) { return path.split("/").pop(); }
function noDrag() { return matchMedia("(hover: none), (pointer: coarse)").matches; }

// A path as text with a line-break opportunity after each "/", so it wraps between folders
// rather than mid-name (CSS breaks a name only when it is longer than a whole line).
function pathNodes(path) {
  const out = [];
  path.split("/").forEach((part, i, parts) => {
    out.push(document.createTextNode(part + (i < parts.length - 1 ? "/" : "")));
    if (i < parts.length - 1) out.push(document.createElement("wbr"));
  });
  return out;
}

function render() {
  const grid = $("grid");
  const have = grid.children.length;
  if (have > state.hits.length || (have && grid.children[0].dataset.id != String(state.hits[0] && state.hits[0].id))) {
    grid.textContent = "";
  }
  for (let i = grid.children.length; i < state.hits.length; i++) {
    const h = state.hits[i];
    const tile = document.createElement("button");
    tile.className = "tile";
    tile.dataset.id = h.id;
    tile.dataset.index = i;
    tile.setAttribute("role", "listitem");
    tile.title = `${basename(h.path)}\nscore ${fmt(h.score)} · ITM ${fmt(h.itm)} · ITC ${fmt(h.itc)}` +
      (h.keyword == null ? "" : ` · words ${fmt(h.keyword)}`);
    const img = document.createElement("img");
    img.loading = "lazy";
    img.decoding = "async";
    img.src = withKey(h.thumbnail_url);
    img.alt = h.caption || basename(h.path);
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = fmt(h.score);
    tile.append(img, score);
    const meta = document.createElement("span");  // shown where there is no hover (touch)
    meta.className = "meta";
    const name = document.createElement("span");
    name.className = "n";
    name.textContent = basename(h.path);
    const s = document.createElement("span");
    s.className = "s";
    s.textContent = fmt(h.score);
    meta.append(name, s);
    tile.append(meta);
    if (h.caption) {
      const cap = document.createElement("span");
      cap.className = "cap";
      cap.textContent = h.caption;
      tile.append(cap);
    }
    tile.addEventListener("click", () => openDetail(i));
    grid.append(tile);
  }
}

// -- the detail view -------------------------------------------------------------------------

function openDetail(i) {
  if (i < 0 || i >= state.hits.length) return;
  state.detail = i;
  const h = state.hits[i];
  $("d-img").src = withKey(h.preview_url);  // screen-sized; the original only on "Open original"
  $("d-img").alt = h.caption || basename(h.path);
  $("d-name").textContent = basename(h.path);
  $("d-caption").textContent = h.caption || "";
  $("d-path").replaceChildren(...h.paths.map((path) => {
    const line = document.createElement("span");
    line.append(...pathNodes(path));
    return line;
  }));
  $("d-date").textContent = h.taken_at ? h.taken_at.replace("T", " ") : "–";
  $("d-camera").textContent = h.camera || "–";
  $("d-size").textContent = `${h.width} × ${h.height}`;
  $("d-score").textContent = fmt(h.score);
  $("d-itm").textContent = fmt(h.itm);
  $("d-itc").textContent = fmt(h.itc);
  $("d-kw").textContent = h.keyword == null ? "–" : `${Math.round(h.keyword * 100)}% of the words`;
  $("d-file").href = withKey(h.file_url);
  $("d-prev").disabled = i === 0;
  $("d-next").disabled = i === state.hits.length - 1 && state.nextOffset == null;
  $("detail").hidden = false;
  $("d-close").focus();
  if (i + 1 < state.hits.length) new Image().src = withKey(state.hits[i + 1].preview_url);  // the next arrow key
  if (i >= state.hits.length - 4) loadMore();
}

function closeDetail() {
  const i = state.detail;
  $("detail").hidden = true;
  state.detail = -1;
  const tile = $("grid").children[i];
  if (tile) tile.focus();
}

async function step(delta) {
  const i = state.detail + delta;
  if (i >= state.hits.length && state.nextOffset != null) await loadMore();
  if (i >= 0 && i < state.hits.length) openDetail(i);
}

function moreLikeThis() {
  const h = state.hits[state.detail];
  closeDetail();
  state.mode = "similar";
  state.similar = String(h.id);
  state.q = "";
  $("q").value = "";
  writeURL(true);
  search();
}

// -- search by example -----------------------------------------------------------------------

function searchByImage(file) {
  if (!file) return;
  if (!file.type.startsWith("image/") && file.type !== "") {
    return status(`${file.name} is not an image`, "error");
  }
  state.mode = "upload";
  state.upload = file;
  state.q = "";
  $("q").value = "";
  writeURL(true);
  search();
}

// -- filters ---------------------------------------------------------------------------------

function setFilters(open) {
  $("filters").hidden = !open;
  $("toggle-filters").setAttribute("aria-expanded", String(open));
}

function showMin(value = state.min) {
  $("min-out").textContent = value ? value.toFixed(2) : "off";
}

function filtersChanged() {
  // A field's change fires again when it loses focus (say, to a tap on a result): the same
  // filters must not start the same search over, clearing the results under the tap.
  const before = [state.folder, state.after, state.before, state.rerank, state.match, state.min].join("\n");
  state.folder = $("folder").value.trim();
  state.after = $("after").value;
  state.before = $("before").value;
  state.rerank = $("rerank").checked;
  state.match = $("match").value;
  state.min = parseFloat($("min").value) || 0;
  showMin();
  if ([state.folder, state.after, state.before, state.rerank, state.match, state.min].join("\n") === before) return;
  writeURL(true);
  if (state.mode !== "text" || state.q) search();
}

// -- the search box's placeholder: the long example where it fits, else the short one --------

function fitPlaceholder() {
  const q = $("q");
  q.dataset.longPlaceholder = q.dataset.longPlaceholder || q.placeholder;
  const css = getComputedStyle(q);
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = `${css.fontStyle} ${css.fontWeight} ${css.fontSize} ${css.fontFamily}`;
  const room = q.clientWidth - parseFloat(css.paddingLeft) - parseFloat(css.paddingRight) - 24;  // the clear button
  const long = q.dataset.longPlaceholder;
  q.placeholder = ctx.measureText(long).width <= room ? long : q.dataset.shortPlaceholder;
}

// -- folder suggestions: every indexed folder, subfolders too, matching what was typed -------

let folderTimer = 0;
let foldersAsked = null;

async function suggestFolders() {
  const typed = $("folder").value.trim();
  if (typed === foldersAsked) return;
  foldersAsked = typed;
  try {
    const found = await api("/api/folders?" + new URLSearchParams({ q: typed, limit: 30 }));
    if (typed !== $("folder").value.trim()) return;  // typed on meanwhile: a newer answer comes
    $("folders").replaceChildren(...found.folders.map((f) => {
      const option = document.createElement("option");
      option.value = f.path;
      option.label = `${f.images} photo${f.images === 1 ? "" : "s"}`;
      return option;
    }));
  } catch (e) {
    foldersAsked = null;  // suggestions are a help, not a requirement: ask again next time
  }
}

// -- wiring ----------------------------------------------------------------------------------

function typing(el) {
  if (el.isContentEditable || el.tagName === "TEXTAREA" || el.tagName === "SELECT") return true;
  return el.tagName === "INPUT" && !["checkbox", "radio", "range", "button", "submit", "file"].includes(el.type);
}

let debounce = 0;

function wire() {
  $("q").addEventListener("input", () => {
    clearTimeout(debounce);
    debounce = setTimeout(() => {
      state.mode = "text";
      state.q = $("q").value.trim();
      writeURL(false);  // typing replaces the history entry; Enter adds one
      search();
    }, 300);
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    clearTimeout(debounce);
    state.mode = "text";
    state.q = $("q").value.trim();
    writeURL(true);
    search();
  });
  $("toggle-filters").addEventListener("click", () => setFilters($("filters").hidden));
  for (const id of ["folder", "after", "before", "rerank", "match"]) $(id).addEventListener("change", filtersChanged);
  $("folder").addEventListener("input", () => { clearTimeout(folderTimer); folderTimer = setTimeout(suggestFolders, 150); });
  $("folder").addEventListener("focus", suggestFolders);
  $("min").addEventListener("input", () => showMin(parseFloat($("min").value) || 0));  // the search waits for change
  $("min").addEventListener("change", filtersChanged);
  $("pick").addEventListener("click", () => $("file").click());
  $("file").addEventListener("change", () => { searchByImage($("file").files[0]); $("file").value = ""; });
  $("d-close").addEventListener("click", closeDetail);
  $("d-prev").addEventListener("click", () => step(-1));
  $("d-next").addEventListener("click", () => step(1));
  $("d-more").addEventListener("click", moreLikeThis);
  $("detail").addEventListener("click", (e) => { if (e.target.classList.contains("detail-image")) closeDetail(); });
  document.addEventListener("keydown", (e) => {
    // "/" goes to the search box from anywhere but a field being typed in (as on GitHub, MDN).
    if (e.key === "/" && !e.ctrlKey && !e.metaKey && !e.altKey && !typing(e.target)) {
      e.preventDefault();
      if (!$("detail").hidden) closeDetail();
      $("q").focus();
      $("q").select();
      return;
    }
    if ($("detail").hidden) return;
    if (e.key === "Escape") closeDetail();
    else if (e.key === "ArrowRight") step(1);
    else if (e.key === "ArrowLeft") step(-1);
    else return;
    e.preventDefault();
  });
  let depth = 0;
  document.addEventListener("dragenter", (e) => { e.preventDefault(); depth++; $("drop").hidden = false; });
  document.addEventListener("dragleave", () => { if (--depth <= 0) { depth = 0; $("drop").hidden = true; } });
  document.addEventListener("dragover", (e) => e.preventDefault());
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    depth = 0;
    $("drop").hidden = true;
    searchByImage(e.dataTransfer.files[0]);
  });
  window.addEventListener("resize", fitPlaceholder);
  window.addEventListener("popstate", () => { closeDetailSilently(); readURL(); search(); });
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: "600px" }).observe($("sentinel"));
}

function closeDetailSilently() { $("detail").hidden = true; state.detail = -1; }

async function start() {
  try {
    const stats = await api("/api/stats");
    state.images = stats.images;
  } catch (e) {
    return failed(e);
  }
  search();
}

wire();
fitPlaceholder();
readURL();
start();
