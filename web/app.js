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
  camera: "", lens: "", type: "", orientation: "",
  only: false,         // only strong matches (ITM P(match) >= 0.5)
  like: [], unlike: [],  // image ids steering a text search
  view: "search",      // "search" | "duplicates"
  vqa: null,           // {available, model, reason} from /api/vqa
  asking: 0,           // newer questions make older answers stale
  hits: [],
  nextOffset: null,
  busy: false,
  request: 0,          // newer requests make older answers stale
  detail: -1,          // index of the hit shown in the detail view
  images: null,        // images in the library (from /api/stats)
};
const FACETS = ["camera", "lens", "type", "orientation"];
const STRONG = 0.5;  // the ITM classifier's boundary: what "only strong matches" keeps
// When the first results and the re-ranked ones arrived (ms after the search began): for
// people curious about it, and for the browser tests that measure it.
window.searchTimes = {};

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
  const headers = { ...(options.headers || {}), ...(apiKey() ? { "X-API-Key": apiKey() } : {}) };
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
  for (const f of FACETS) state[f] = p.get(f) || "";
  state.only = p.get("only") === "1";
  const ids = (name) => (p.get(name) || "").split(",").filter((x) => /^\d+$/.test(x));
  state.like = ids("like");
  state.unlike = ids("unlike").filter((x) => !state.like.includes(x));
  state.view = p.get("view") === "duplicates" ? "duplicates" : "search";
  $("q").value = state.q;
  $("folder").value = state.folder;
  $("after").value = state.after;
  $("before").value = state.before;
  $("rerank").checked = state.rerank;
  $("match").value = state.match;
  $("min").value = state.min;
  $("only").checked = state.only;
  for (const f of FACETS) setSelect(f, state[f]);
  showMin();
  if (state.folder || state.after || state.before || !state.rerank || state.min || state.match !== "hybrid" || state.only ||
      FACETS.some((f) => state[f])) setFilters(true);
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
  for (const f of FACETS) if (state[f]) p.set(f, state[f]);
  if (state.only) p.set("only", "1");
  if (state.mode === "text" && state.like.length) p.set("like", state.like.join(","));
  if (state.mode === "text" && state.unlike.length) p.set("unlike", state.unlike.join(","));
  if (state.view === "duplicates") p.set("view", "duplicates");
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
  for (const f of FACETS) if (state[f]) p.set(f, state[f]);
  return p;
}

async function fetchPage(offset, rerank = state.rerank) {
  const p = filterParams(new URLSearchParams({ k: PAGE, offset }));
  if (state.mode === "text") {
    p.set("q", state.q);
    p.set("rerank", rerank ? "true" : "false");
    p.set("mode", state.match);
    for (const id of state.like) p.append("like", id);
    for (const id of state.unlike) p.append("unlike", id);
    if (state.only && rerank) p.set("min_itm", String(STRONG));
    return api("/api/search?" + p);
  }
  if (state.mode === "similar") return api(`/api/images/${encodeURIComponent(state.similar)}/similar?` + p);
  const form = new FormData();
  form.append("image", state.upload);
  return api("/api/search/image?" + p, { method: "POST", body: form });
}

function searchable() {
  return state.mode !== "text" || state.q.trim() || state.like.length;
}

async function search() {
  const request = ++state.request;
  state.hits = [];
  state.nextOffset = null;
  state.busy = true;
  banner();
  steerBar();
  if (!searchable()) {
    state.busy = false;
    $("grid").textContent = "";
    render();
    return idle();
  }
  status("Searching…");
  const t0 = performance.now();
  window.searchTimes = {};
  // Results that sharpen: the ITC order first (milliseconds), then the ITM order, which takes
  // seconds on a CPU, replacing it in place. "Only strong matches" needs ITM to know which.
  // (Nor does a minimum score: it is a cut on the final, ITM + ITC, score.)
  const sharpen = state.mode === "text" && state.rerank && !state.only && !state.min && state.match !== "keyword" &&
    state.q.trim();
  try {
    const page = await fetchPage(0, sharpen ? false : state.rerank);
    if (request !== state.request) return;
    window.searchTimes.first = performance.now() - t0;
    state.hits = page.hits;
    state.nextOffset = page.next_offset;
    $("grid").textContent = "";  // a new ranking: no tile of the last one may stay
    render();
    if (!page.hits.length) {
      state.busy = false;
      return status(noResults());
    }
    if (!sharpen) {
      state.busy = false;
      window.searchTimes.reranked = window.searchTimes.first;
      return status(timings(page));
    }
    status(timings(page) + " · re-ranking with ITM…", "working");
    const sharp = await fetchPage(0, true);
    if (request !== state.request) return;
    window.searchTimes.reranked = performance.now() - t0;
    reorder(sharp.hits);
    state.nextOffset = sharp.next_offset;
    state.busy = false;
    status(timings(sharp));
    // The end of the grid may have come into view while re-ranking held paging back.
    if ($("sentinel").getBoundingClientRect().top < innerHeight + 600) loadMore();
  } catch (e) {
    if (request !== state.request) return;
    state.busy = false;
    render();
    failed(e);
  }
}

function noResults() {
  if (state.only) return "No strong matches. Turn off “Only strong matches” in Filters to see the closest photos.";
  if (state.min) return "No results above the minimum score. Lower it in Filters.";
  const filtered = state.folder || state.after || state.before || FACETS.some((f) => state[f]);
  return filtered ? "No results with these filters." : "No results.";
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
  const strong = page.strong == null ? "" : ` · ${page.strong} strong match${page.strong === 1 ? "" : "es"}`;
  const n = state.hits.length;
  return `${n}${more} result${n === 1 && !more ? "" : "s"} · ${Math.round(t.total)} ms` +
    (page.reranked ? ` · ${page.reranked} re-ranked by ITM` : "") + strong;
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
  for (let i = grid.children.length; i < state.hits.length; i++) grid.append(makeTile(state.hits[i], i));
}

function makeTile(h, i) {
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
  // + / -: steer the next search towards or away from this photo (also in the detail view,
  // as real buttons for the keyboard).
  const steer = document.createElement("span");
  steer.className = "steer";
  for (const [sign, label, list] of [["+", "Steer towards this photo", "like"], ["−", "Steer away from this photo", "unlike"]]) {
    const b = document.createElement("span");
    b.className = "steer-btn " + list;
    b.textContent = sign;
    b.title = label;
    b.setAttribute("aria-hidden", "true");
    b.addEventListener("click", (e) => { e.stopPropagation(); steerBy(String(h.id), list); });
    steer.append(b);
  }
  tile.append(steer);
  tile.addEventListener("click", () => openDetail(Number(tile.dataset.index)));
  return tile;
}

// The re-ranked order replaces the first one in place: each tile slides from where it was
// to where it goes (FLIP); the grid keeps its size, so nothing jumps.
function reorder(hits) {
  const grid = $("grid");
  const was = new Map([...grid.children].map((t) => [t.dataset.id, t.getBoundingClientRect()]));
  const shown = state.detail >= 0 ? state.hits[state.detail].id : null;  // a photo open in the detail view
  state.hits = hits;
  const moved = hits.findIndex((h) => h.id === shown);
  if (moved >= 0) state.detail = moved;  // its arrows go on from where it now ranks
  grid.replaceChildren(...hits.map((h, i) => makeTile(h, i)));
  const still = matchMedia("(prefers-reduced-motion: reduce)").matches;
  for (const tile of grid.children) {
    const from = was.get(tile.dataset.id);
    if (still || !tile.animate) continue;
    if (!from) {
      tile.animate([{ opacity: 0 }, { opacity: 1 }], { duration: 300 });
      continue;
    }
    const to = tile.getBoundingClientRect();
    const dx = from.left - to.left, dy = from.top - to.top;
    if (dx || dy) {
      tile.animate([{ transform: `translate(${dx}px, ${dy}px)` }, { transform: "none" }], { duration: 350, easing: "ease-out" });
    }
  }
}

// -- steering: + / - on results -----------------------------------------------------------

function steerBy(id, list) {
  const other = list === "like" ? "unlike" : "like";
  state[other] = state[other].filter((x) => x !== id);
  state[list] = state[list].includes(id) ? state[list].filter((x) => x !== id) : state[list].concat([id]);
  if (state.match === "keyword") {  // examples steer what the picture shows: words alone cannot take them
    state.match = "hybrid";
    $("match").value = "hybrid";
  }
  if (state.mode !== "text") {  // steering starts a text search from where the user is
    state.mode = "text";
    state.similar = null;
    state.upload = null;
  }
  if (!$("detail").hidden) closeDetailSilently();
  writeURL(true);
  search();
}

function steerBar() {
  const el = $("steer");
  const chips = [];
  if (state.mode === "text") {
    for (const list of ["like", "unlike"]) {
      for (const id of state[list]) {
        const chip = document.createElement("span");
        chip.className = "chip " + list;
        chip.dataset.id = id;
        const sign = document.createElement("b");
        sign.textContent = list === "like" ? "+" : "−";
        const img = document.createElement("img");
        img.src = withKey(`/api/images/${encodeURIComponent(id)}/thumbnail`);
        img.alt = list === "like" ? "more like this" : "less like this";
        const x = document.createElement("button");
        x.textContent = "×";
        x.setAttribute("aria-label", list === "like" ? "Stop steering towards this photo" : "Stop steering away from this photo");
        x.addEventListener("click", () => steerBy(id, list));
        chip.append(sign, img, x);
        chips.push(chip);
      }
    }
  }
  el.replaceChildren(...chips);
  if (chips.length) {
    const clear = document.createElement("button");
    clear.className = "clear";
    clear.textContent = "Clear";
    clear.addEventListener("click", () => { state.like = []; state.unlike = []; writeURL(true); search(); });
    el.append(clear);
  }
  el.hidden = !chips.length;
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
  $("d-like").textContent = state.like.includes(String(h.id)) ? "+ Liked" : "+ Like";
  $("d-unlike").textContent = state.unlike.includes(String(h.id)) ? "− Unliked" : "− Unlike";
  askReset();
  explainReset();
  $("d-prev").disabled = i === 0;
  $("d-next").disabled = i === state.hits.length - 1 && state.nextOffset == null;
  $("detail").hidden = false;
  $("d-close").focus();
  if (i + 1 < state.hits.length) new Image().src = withKey(state.hits[i + 1].preview_url);  // the next arrow key
  if (i >= state.hits.length - 4) loadMore();
}

function closeDetail() {
  const i = state.detail;
  if (state.answering) state.answering.abort();  // no answer is wanted for a closed view
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

// -- where the words match: the map over the photo (ITM Grad-CAM), on request ------------------

function explainReset() {
  const words = state.mode === "text" ? state.q.trim() : "";
  $("d-explain").hidden = !words;
  $("d-explain").setAttribute("aria-pressed", "false");
  $("d-explain").textContent = "Where it matches";
  $("d-explain-note").textContent = "";
  $("d-img").onload = $("d-img").onerror = null;
}

function toggleExplain() {
  const h = state.hits[state.detail];
  const img = $("d-img");
  const on = $("d-explain").getAttribute("aria-pressed") !== "true";
  $("d-explain").setAttribute("aria-pressed", String(on));
  $("d-explain").textContent = on ? "Hide the map" : "Where it matches";
  $("d-explain-note").textContent = on ? "Finding where it matches…" : "";
  const shown = state.detail;
  img.onload = () => { if (state.detail === shown) $("d-explain-note").textContent = on ? `Red to yellow: what matches “${state.q.trim()}”` : ""; };
  img.onerror = () => {
    img.onload = img.onerror = null;  // the preview again, once
    if (state.detail !== shown) return;
    $("d-explain-note").textContent = "The map could not be made.";
    $("d-explain").setAttribute("aria-pressed", "false");
    $("d-explain").textContent = "Where it matches";
    img.src = withKey(h.preview_url);
  };
  img.src = on ? withKey(`/api/images/${h.id}/explain.png?q=${encodeURIComponent(state.q.trim())}`) : withKey(h.preview_url);
}

// -- asking a photo ---------------------------------------------------------------------------

function askReset() {
  const can = state.vqa && state.vqa.available;
  $("d-ask").hidden = !can;
  $("d-ask-note").hidden = can || !state.vqa;
  $("d-ask-note").textContent = can || !state.vqa ? "" :
    "Questions about photos need a BLIP-2 model with a language model (searchengine serve --vqa-model …).";
  $("d-question").value = "";
  state.turns = [];  // the conversation about this photo: the server keeps none
  showTurns();
  $("d-asked").textContent = "";
  $("d-answer").textContent = "";
  $("d-answer").className = "";
  state.asking = (state.asking || 0) + 1;  // an answer for another photo is dropped
  if (state.answering) state.answering.abort();  // and its generation stopped on the server
  state.answering = null;
  $("d-ask-go").disabled = false;
}

// The turns before the latest in the list; the latest question and its answer (as it
// streams) below them.
function turnItem(t) {
  const li = document.createElement("li");
  const q = document.createElement("b");
  q.textContent = t.question;
  const a = document.createElement("span");
  a.textContent = t.answer;
  li.append(q, a);
  return li;
}

function showTurns(earlier = []) {
  $("d-turns").replaceChildren(...earlier.map(turnItem));
  $("d-new-chat").hidden = !state.turns.length;
}

// The answer as server-sent events: `data: {"text"}` per piece, then `done` (or `error`).
async function streamAnswer(url, body, onPiece, signal) {
  const headers = { "Content-Type": "application/json", ...(apiKey() ? { "X-API-Key": apiKey() } : {}) };
  let response;
  try {
    response = await fetch(url, { method: "POST", headers, body: JSON.stringify({ ...body, stream: true }), signal });
  } catch (e) {
    if (e.name === "AbortError") throw e;
    throw new ApiError(0, "cannot reach the search service: is `searchengine serve` running?");
  }
  if (response.status === 401) {
    const key = prompt("This search service needs an API key:");
    if (key) { localStorage.setItem("searchengine.api_key", key); return streamAnswer(url, body, onPiece, signal); }
  }
  if (!response.ok) {
    let message = `the service answered ${response.status}`;
    try { message = (await response.json()).error || message; } catch (e) { /* not JSON */ }
    throw new ApiError(response.status, message);
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const line = block.match(/^data: (.*)$/m);
      if (!line) continue;  // a comment or keep-alive
      const event = (block.match(/^event: (.*)$/m) || [null, "message"])[1];
      const data = JSON.parse(line[1]);
      if (event === "message" && typeof data.text === "string") onPiece(data.text);
      else if (event === "done") return data;
      else if (event === "error") throw new ApiError(500, data.error);
    }
  }
  throw new ApiError(0, "the answer was cut off");
}

async function ask(e) {
  e.preventDefault();
  const question = $("d-question").value.trim();
  const h = state.hits[state.detail];
  if (!question || !h) return;
  const asking = ++state.asking;
  const turns = state.turns.slice();
  showTurns(turns);  // the last turn moves up into the list
  $("d-asked").textContent = question;
  $("d-question").value = "";
  $("d-answer").className = "working";
  $("d-answer").textContent = "Thinking…";
  $("d-ask-go").disabled = true;
  let text = "";
  const controller = new AbortController();
  state.answering = controller;
  try {
    // The server drops the oldest turns that do not fit the model; it takes at most 50.
    const done = await streamAnswer(`/api/images/${h.id}/chat`, { question, turns: turns.slice(-50) }, (piece) => {
      if (asking !== state.asking) return;
      text += piece;
      $("d-answer").className = "answer";
      $("d-answer").textContent = text;
    }, controller.signal);
    if (asking !== state.asking) return;
    $("d-answer").className = "answer";
    $("d-answer").textContent = done.answer || "(no answer)";
    $("d-answer").title = `${done.model} · first words ${Math.round(done.timings_ms.first_piece)} ms · ${Math.round(done.timings_ms.total)} ms`;
    state.turns = turns.concat([{ question, answer: done.answer }]);
    $("d-new-chat").hidden = false;
  } catch (err) {
    if (asking !== state.asking || err.name === "AbortError") return;
    state.turns = turns;
    $("d-answer").className = "error";
    $("d-answer").textContent = err.message;
    if (err.status === 503) { state.vqa = { available: false }; }
  } finally {
    if (asking === state.asking) {
      $("d-ask-go").disabled = false;
      state.answering = null;
    }
  }
}

function moreLikeThis() {
  const h = state.hits[state.detail];
  closeDetail();
  state.mode = "similar";
  state.similar = String(h.id);
  state.q = "";
  state.like = [];
  state.unlike = [];
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
  const key = () => [state.folder, state.after, state.before, state.rerank, state.match, state.min, state.only,
    ...FACETS.map((f) => state[f])].join("\n");
  const before = key();
  state.folder = $("folder").value.trim();
  state.after = $("after").value;
  state.before = $("before").value;
  state.rerank = $("rerank").checked;
  state.match = $("match").value;
  state.min = parseFloat($("min").value) || 0;
  state.only = $("only").checked;
  for (const f of FACETS) state[f] = $(f).value;
  showMin();
  if (key() === before) return;
  writeURL(true);
  loadFacets();
  if (searchable()) search();
}

// -- facets: cameras, lenses, file types and shapes, with how many photos each would give ---

function setSelect(name, value) {
  const select = $(name);
  if (value && ![...select.options].some((o) => o.value === value)) {
    const option = document.createElement("option");  // from the URL, before the counts came
    option.value = value;
    option.textContent = value;
    select.append(option);
  }
  select.value = value;
}

let facetsAsked = 0;

async function loadFacets() {
  const asked = ++facetsAsked;
  let found;
  try {
    found = await api("/api/facets?" + filterParams(new URLSearchParams()));
  } catch (e) {
    return;  // the counts are a help; the filters work without them
  }
  if (asked !== facetsAsked) return;
  for (const f of FACETS) {
    const select = $(f);
    const chosen = state[f];
    const any = document.createElement("option");
    any.value = "";
    any.textContent = "any";
    const options = found[f].map((v) => {
      const option = document.createElement("option");
      option.value = v.value;
      option.textContent = `${v.value} (${v.images})`;
      return option;
    });
    select.replaceChildren(any, ...options);
    setSelect(f, chosen);
    select.closest("label").hidden = !found[f].length && !chosen;  // no lens data: no lens filter
  }
}

// -- near-duplicates: groups side by side, to see which to keep (nothing is deleted) ---------

let dupsOffset = null;

function showView() {
  const dups = state.view === "duplicates";
  $("dups").hidden = !dups;
  for (const id of ["banner", "steer", "status", "grid", "sentinel"]) $(id).style.display = dups ? "none" : "";
  $("dups-link").setAttribute("aria-current", dups ? "page" : "false");
  if (dups) loadDuplicates(true);
}

function kib(n) {
  return n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MB` : `${Math.max(1, Math.round(n / 1024))} KB`;
}

async function loadDuplicates(fresh) {
  if (fresh) {
    dupsOffset = 0;
    $("dups-list").textContent = "";
    $("dups-status").textContent = "Comparing photos…";
  }
  if (dupsOffset == null) return;
  const p = new URLSearchParams({ threshold: $("dups-threshold").value, limit: 20, offset: dupsOffset });
  let found;
  try {
    found = await api("/api/duplicates?" + p);
  } catch (e) {
    $("dups-status").textContent = e.message;
    return;
  }
  for (const group of found.groups) {
    const row = document.createElement("div");
    row.className = "dup-group";
    const biggest = Math.max(...group.images.map((m) => m.width * m.height));
    for (const m of group.images) {
      const card = document.createElement("a");
      card.className = "dup";
      card.href = withKey(m.preview_url);
      card.target = "_blank";
      card.rel = "noopener";
      card.dataset.id = m.id;
      const img = document.createElement("img");
      img.loading = "lazy";
      img.src = withKey(m.thumbnail_url);
      img.alt = basename(m.path);
      const name = document.createElement("span");
      name.className = "n";
      name.append(...pathNodes(basename(m.path)));
      const facts = document.createElement("span");
      facts.className = "facts";
      facts.textContent = `${m.width} × ${m.height} · ${kib(m.bytes)}` + (m.taken_at ? ` · ${m.taken_at.slice(0, 10)}` : "");
      const where = document.createElement("span");
      where.className = "where";
      where.title = m.paths.join("\n");
      where.textContent = m.path.split("/").slice(-2, -1)[0] || "/";
      card.append(img, name, facts, where);
      if (m.width * m.height === biggest) {
        const badge = document.createElement("span");
        badge.className = "badge";
        badge.textContent = "largest";
        card.append(badge);
      }
      row.append(card);
    }
    $("dups-list").append(row);
  }
  dupsOffset = found.next_offset;
  $("dups-more").hidden = dupsOffset == null;
  const secs = (found.timings_ms.total / 1000).toFixed(1);
  $("dups-status").textContent = found.total
    ? `${found.total} group${found.total === 1 ? "" : "s"} of near-duplicates among ${found.images} photos (found in ${secs} s). Nothing is deleted here.`
    : `No near-duplicates among ${found.images} photos at this similarity.`;
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
      if (state.view !== "search") { state.view = "search"; showView(); }
      state.mode = "text";
      state.q = $("q").value.trim();
      writeURL(false);  // typing replaces the history entry; Enter adds one
      search();
    }, 300);
  });
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    clearTimeout(debounce);
    if (state.view !== "search") { state.view = "search"; showView(); }
    state.mode = "text";
    state.q = $("q").value.trim();
    writeURL(true);
    search();
  });
  $("toggle-filters").addEventListener("click", () => setFilters($("filters").hidden));
  for (const id of ["folder", "after", "before", "rerank", "match", "only", ...FACETS]) $(id).addEventListener("change", filtersChanged);
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
  $("d-explain").addEventListener("click", toggleExplain);
  $("d-like").addEventListener("click", () => steerBy(String(state.hits[state.detail].id), "like"));
  $("d-unlike").addEventListener("click", () => steerBy(String(state.hits[state.detail].id), "unlike"));
  $("d-ask").addEventListener("submit", ask);
  $("d-new-chat").addEventListener("click", () => { askReset(); $("d-question").focus(); });
  $("dups-threshold").addEventListener("change", () => loadDuplicates(true));
  $("dups-more").addEventListener("click", () => loadDuplicates(false));
  for (const link of document.querySelectorAll(".dups-link")) {
    link.addEventListener("click", (e) => { e.preventDefault(); state.view = "duplicates"; writeURL(true); showView(); });
  }
  $("dups-back").addEventListener("click", (e) => { e.preventDefault(); state.view = "search"; writeURL(true); showView(); });
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
  window.addEventListener("popstate", () => { closeDetailSilently(); readURL(); showView(); search(); });
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting)) loadMore();
  }, { rootMargin: "600px" }).observe($("sentinel"));
}

function closeDetailSilently() {
  if (state.answering) state.answering.abort();
  $("detail").hidden = true;
  state.detail = -1;
}

async function start() {
  try {
    const stats = await api("/api/stats");
    state.images = stats.images;
  } catch (e) {
    return failed(e);
  }
  api("/api/vqa").then((v) => { state.vqa = v; }, () => { state.vqa = null; });
  loadFacets();
  showView();
  search();
}

wire();
fitPlaceholder();
readURL();
start();
