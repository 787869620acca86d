"""Results that sharpen, measured in a real browser on the real-size model: time to the first
(ITC) results and to the re-ranked (ITM) results in the web UI.

Indexes `--photos` real photos with the blip2-itm-vit-g architecture (random weights: the
timings are those of the real model; the rankings mean nothing), no captions, the ViT
feature cache on (the CPU default), serves them, and types each query into the page in
Debian's Chromium. The page records when each ranking arrived (`window.searchTimes`, ms
after the search began). Printed per query and as medians, with the ratio: how much sooner
people see results than they would if the page waited for ITM.

    python benchmarks/ui_sharpen.py --photos 24
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import EXE, free_port, model_dir, photos, serve  # noqa: E402

QUERIES = ["a yellow flower", "waves on a beach", "a storm over the sea", "a ladybird on a leaf", "sand dunes in the desert"]
CHROMIUM = os.environ.get("SEARCHENGINE_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", type=int, default=24)
    parser.add_argument("--dir", type=Path, help="work folder (default: a temporary one)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    work = args.dir or Path(tempfile.mkdtemp(prefix="ui-sharpen-"))
    folder = work / "photos"
    if not folder.exists():
        folder.mkdir(parents=True)
        for i, p in enumerate(photos(args.photos)):
            shutil.copy(p, folder / f"{i:03d}-{p.name}")
    env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(work / "data"), "SEARCHENGINE_MODEL": str(model_dir("real")),
           "OMP_WAIT_POLICY": "PASSIVE", "HF_HUB_OFFLINE": "1"}
    if not (work / "data" / "store.db").exists():
        t = time.perf_counter()
        subprocess.run([EXE, "index", str(folder), "--no-captions"], env=env, check=True, capture_output=True)
        print(f"indexed {args.photos} photos with the real-size model in {time.perf_counter() - t:.0f} s", flush=True)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    server = serve(env, port)
    try:
        rows = []
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(120_000)
            page.goto(base + "/")
            page.wait_for_function("document.getElementById('status').textContent.includes('Search')")
            for query in ["a photo"] + QUERIES:  # the first is a warm-up (each query is new to the server)
                page.locator("#q").fill(query)
                page.locator("#q").press("Enter")
                page.wait_for_function("window.searchTimes && window.searchTimes.reranked > 0")
                t = page.evaluate("window.searchTimes")
                rows.append((query, t["first"], t["reranked"]))
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    rows = rows[1:]
    print(f"{'query':28s} {'first results':>14s} {'re-ranked':>10s}")
    for q, first, sharp in rows:
        print(f"{q:28s} {first:11.0f} ms {sharp:7.0f} ms")
    first = statistics.median(r[1] for r in rows)
    sharp = statistics.median(r[2] for r in rows)
    print(f"median: first results {first:.0f} ms, re-ranked {sharp:.0f} ms: results show {sharp / first:.1f}x sooner than ITM's")


if __name__ == "__main__":
    main()
