"""Two of issue 27's probes from outside, against a real `searchengine serve` (tiny model):

    python benchmarks/hardening_probe.py [--requests 3000]

1. The link race: `race.jpg` flipped between an indexed photo and ../secret/secret.txt by a
   thread while `--requests` requests (half /file, half /preview) ask for it. The photo lies
   outside the folder and links may lead anywhere (`--links all`), so race.jpg is the image's
   only path and only the check of what was opened stands in the way. Counts the responses
   that carry the secret and the protocol errors (before the fix: 229 of 3,000 carried it,
   with 510 Content-Length errors).
2. A 512 MiB body to /api/ask, declared by Content-Length and sent chunked: the server's
   peak RSS (VmHWM) before and after each, and how long the refusal took (before the fix the
   body was read whole: RSS 495 -> 2,031 MiB).
"""

from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.server import EXE, free_port, get  # noqa: E402

MIB = 1 << 20


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def flip(link: Path, target: str) -> None:
    tmp = link.with_name(link.name + ".tmp")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(target)
    os.replace(tmp, link)


def race(base: str, image_id: int, folder: Path, requests: int) -> tuple[int, int, int]:
    stop = threading.Event()

    def flipper() -> None:
        while not stop.is_set():
            flip(folder / "race.jpg", "../secret/secret.txt")
            flip(folder / "race.jpg", "../elsewhere/photo.jpg")

    t = threading.Thread(target=flipper, daemon=True)
    t.start()
    secret = errors = ok = 0
    try:
        for i in range(requests):
            what = "file" if i % 2 == 0 else "preview"
            try:
                status, body = get(f"{base}/api/images/{image_id}/{what}", timeout=10)
            except (http.client.HTTPException, OSError):
                errors += 1
                continue
            secret += b"SECRET" in body
            ok += status == 200
    finally:
        stop.set()
        t.join()
    return secret, errors, ok


def big_body(port: int, pid: int, chunked: bool) -> tuple[float, float, float, int]:
    before = peak_rss_mib(pid)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t = time.perf_counter()
    status = 0
    try:
        conn.putrequest("POST", "/api/images/1/ask")
        conn.putheader("Content-Type", "application/json")
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        else:
            conn.putheader("Content-Length", str(512 * MIB))
        conn.endheaders()
        piece = b'{"question": "' + b"a" * (MIB - 14)
        try:
            for _ in range(512):
                conn.send((b"%x\r\n" % len(piece) + piece + b"\r\n") if chunked else piece)
            if chunked:
                conn.send(b"0\r\n\r\n")
        except OSError:
            pass  # the server stopped reading: refused
        status = conn.getresponse().status
    except (http.client.HTTPException, OSError):
        pass
    finally:
        conn.close()
    took = time.perf_counter() - t
    return before, peak_rss_mib(pid), took, status


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=3000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        folder, secret = tmp / "photos", tmp / "secret"
        folder.mkdir(), secret.mkdir()
        photos = sorted(Path(subprocess.run(["bash", "tests/fetch_photos.sh"], capture_output=True, text=True, check=True).stdout.strip()).rglob("*.jpg"))
        (tmp / "elsewhere").mkdir()
        shutil.copy(photos[0], tmp / "elsewhere" / "photo.jpg")
        (secret / "secret.txt").write_bytes(b"TOP SECRET " * 1000)
        (folder / "race.jpg").symlink_to("../elsewhere/photo.jpg")
        env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(tmp / "data"), "SEARCHENGINE_CAPTIONS": "false", "HF_HUB_OFFLINE": "1",
               "SEARCHENGINE_DEVICE": "cpu", "SEARCHENGINE_LINKS": "all"}
        subprocess.run([EXE, "make-tiny-model", str(tmp / "model")], env=env, check=True, capture_output=True)
        subprocess.run([EXE, "index", str(folder), "--model", str(tmp / "model")], env=env, check=True, capture_output=True)
        out = subprocess.run([EXE, "search", "photo", "--json", "-k", "5"], env=env, check=True, capture_output=True, text=True).stdout
        import json

        (hit,) = json.loads(out)["results"]
        assert hit["paths"] == [str(folder / "race.jpg")], hit
        image_id = hit["id"]
        port = free_port()
        proc = subprocess.Popen([EXE, "serve", "--port", str(port)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    if get(f"{base}/healthz", timeout=2)[0] == 200:
                        break
                except OSError:
                    pass
                assert time.monotonic() < deadline and proc.poll() is None
                time.sleep(0.2)
            secret_n, errors, ok = race(base, image_id, folder, args.requests)
            print(f"link race: {secret_n} of {args.requests} responses carried the secret, {errors} protocol errors, "
                  f"{ok} answered 200 (the photo), the rest refused while the link led to the secret")
            for chunked in (False, True):
                before, after, took, status = big_body(port, proc.pid, chunked)
                how = "chunked" if chunked else "Content-Length"
                print(f"512 MiB /ask body ({how}): answered {status} in {took:.2f} s; server peak RSS {before:.0f} -> {after:.0f} MiB")
        finally:
            proc.terminate()
            proc.wait(timeout=30)


if __name__ == "__main__":
    main()
