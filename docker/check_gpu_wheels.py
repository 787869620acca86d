"""Resolve the GPU image's packages against PyPI without installing them, and say what they
weigh: `pip install --dry-run` of docker/gpu-requirements.txt plus the project with the
image's extras (as docker/Dockerfile.gpu installs them), in an isolated pip (no local
indexes or wheels). Checks that one CUDA line comes in (every nvidia-* library of one CUDA
major, none of another) and prints the download size of every wheel, summed.

    python docker/check_gpu_wheels.py [--extras gpu,postgres]

Needs PyPI; downloads metadata only (PEP 658), about a minute.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CERT = os.environ.get("PIP_CERT") or "/etc/ssl/certs/ca-certificates.crt"


def resolve(extras: str) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.json"
        cmd = [sys.executable, "-m", "pip", "--isolated", "install", "--dry-run", "--ignore-installed", "--quiet",
               "--report", str(report), "-r", str(ROOT / "docker" / "gpu-requirements.txt"),
               "-c", str(ROOT / "docker" / "gpu-requirements.txt"), f"{ROOT}[{extras}]"]
        if os.path.exists(CERT):
            cmd[3:3] = ["--cert", CERT]
        subprocess.run(cmd, check=True)
        return json.loads(report.read_text())["install"]


def size(url: str) -> int:
    context = None
    if os.path.exists(CERT):
        import ssl

        context = ssl.create_default_context(cafile=CERT)
    request = urllib.request.Request(url, method="HEAD")
    with urllib.request.urlopen(request, timeout=60, context=context) as r:
        return int(r.headers.get("Content-Length") or 0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--extras", default="gpu,postgres")
    args = ap.parse_args()
    installs = resolve(args.extras)
    rows = [(i["metadata"]["name"], i["metadata"]["version"], i["download_info"]["url"]) for i in installs]
    with ThreadPoolExecutor(8) as pool:
        sizes = list(pool.map(lambda r: size(r[2]) if r[2].startswith("http") else 0, rows))
    cuda = sorted({m.group(1) for name, _, _ in rows if (m := re.match(r"nvidia-.*-cu(\d+)$", name.lower()))})
    for (name, version, _), n in sorted(zip(rows, sizes), key=lambda x: -x[1]):
        print(f"{n / 2**20:9.1f} MiB  {name}=={version}")
    total = sum(sizes)
    print(f"{len(rows)} packages, {total / 2**30:.2f} GiB of wheels; CUDA majors among the nvidia libraries: {cuda}")
    pinned = {name.lower(): version for name, version, _ in rows}
    print("torch", pinned.get("torch"), "faiss-gpu", pinned.get("faiss-gpu"), "bitsandbytes", pinned.get("bitsandbytes"))
    if len(cuda) != 1:
        print("more than one CUDA line, or none", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
