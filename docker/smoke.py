"""Run inside the image by build-here.sh: tiny models, `serve --watch /photos`, then the
image's own health check, the watcher's indexing and a search must all work, as uid 1000."""

import json
import os
import subprocess
import sys
import time
import urllib.request

PORT = os.environ.get("SMOKE_PORT", "18765")
BASE = f"http://127.0.0.1:{PORT}"


def get(path):
    with urllib.request.urlopen(BASE + path, timeout=10) as r:
        return json.loads(r.read())


assert os.getuid() == 1000, f"runs as uid {os.getuid()}, not the image's unprivileged user"
# The data dir: the image's /data, or the host folder build-here.sh mounts (SEARCHENGINE_DATA_DIR).
DATA = os.environ.get("SEARCHENGINE_DATA_DIR", "/data")
for args in ([f"{DATA}/tiny-blip2"], [f"{DATA}/tiny-captioner", "--kind", "blip"]):
    subprocess.run(["searchengine", "make-tiny-model", *args], check=True, capture_output=True)
env = {**os.environ, "HF_HUB_OFFLINE": "1", "SEARCHENGINE_MODEL": f"{DATA}/tiny-blip2",
       "SEARCHENGINE_CAPTION_MODEL": f"{DATA}/tiny-captioner", "SEARCHENGINE_HOST": "127.0.0.1", "SEARCHENGINE_PORT": PORT}
server = subprocess.Popen(["searchengine", "serve", "--watch", "/photos"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
try:
    for _ in range(180):
        try:
            get("/healthz")
            break
        except OSError:
            time.sleep(1)
    # The image's HEALTHCHECK command, as the runtime would run it.
    subprocess.run([sys.executable, "-c", "import urllib.request; urllib.request.urlopen("
                    f"'http://127.0.0.1:{PORT}/healthz', timeout=4)"], check=True)
    photos = len([f for f in os.listdir("/photos") if f.lower().endswith((".jpg", ".png"))])
    for _ in range(120):
        if get("/api/stats")["images"] >= photos:
            break
        time.sleep(1)
    stats = get("/api/stats")
    hits = get("/api/search?q=a+photo&k=3")["hits"]
    print(f"healthy; {stats['images']} of {photos} photos indexed by the watcher; search: {[h['path'] for h in hits]}")
    assert stats["images"] == photos and len(hits) == min(3, photos)
finally:
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
print("smoke test passed")
