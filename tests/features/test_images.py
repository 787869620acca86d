"""The container images' recipes, read (no containers needed): the GPU image takes one CUDA
line from pinned wheels that the project's own requirements admit, builds where a proxy
re-signs TLS and on a base that has uid 1000 already, as the CPU image does."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from packaging.requirements import Requirement

tomllib = pytest.importorskip("tomllib")  # Python 3.11+, as CI runs

ROOT = Path(__file__).resolve().parents[2]
GPU = (ROOT / "docker" / "Dockerfile.gpu").read_text()
CPU = (ROOT / "docker" / "Dockerfile").read_text()


def pins() -> dict[str, str]:
    out = {}
    for line in (ROOT / "docker" / "gpu-requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"not pinned: {line}"
            out[name] = version
    return out


def instructions(dockerfile: str) -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n\s*", " ", dockerfile)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_the_gpu_image_takes_its_cuda_from_pinned_wheels_on_a_plain_base():
    assert set(pins()) == {"torch", "faiss-gpu", "bitsandbytes"}
    base = next(i for i in instructions(GPU) if i.startswith("ARG BASE="))
    assert "nvidia/cuda" not in base and "cuda" not in base.lower(), base  # the wheels bring CUDA, once
    runs = [i for i in instructions(GPU) if i.startswith("RUN")]
    installs = [r for r in runs if "pip install" in r]
    assert "pip install -r /src/docker/gpu-requirements.txt" in installs[0]
    assert '-c /src/docker/gpu-requirements.txt' in installs[1]  # the project cannot move a pin
    assert not any(re.search(r"pip install[^&]*\btorch\b(?!==)", r) and "-r" not in r for r in installs), installs


def test_the_pins_are_what_the_project_asks_for():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gpu"]]
    by_name = {r.name: r for r in wanted}
    for name, version in pins().items():
        assert name in by_name, f"{name} is pinned but not a requirement"
        assert by_name[name].specifier.contains(version), (name, version, str(by_name[name].specifier))


def test_both_images_take_a_ca_bundle_and_keep_an_existing_uid_1000():
    for dockerfile in (CPU, GPU):
        steps = instructions(dockerfile)
        assert "ARG PIP_CERT=" in steps
        user = next(s for s in steps if "useradd" in s)
        assert "getent passwd 1000 >/dev/null ||" in user, user
        assert "USER 1000" in steps


def ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore leaves `path` out of the build context: the last pattern that
    matches the path or a folder above it decides; `!` lets it back in."""
    import fnmatch

    parts = path.split("/")
    out = False
    for pattern in patterns:
        keep = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        for i in range(1, len(parts) + 1):
            here = "/".join(parts[:i])
            if fnmatch.fnmatch(here, pattern) or (pattern.startswith("**/") and fnmatch.fnmatch(parts[i - 1], pattern[3:])):
                out = not keep
    return out


def test_what_the_images_copy_is_in_the_build_context():
    """`.dockerignore` leaves out docker/, and Dockerfile.gpu copies docker/gpu-requirements.txt."""
    patterns = [p.strip() for p in (ROOT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")]
    assert ignored("docker/smoke.py", patterns) and ignored("tests/conftest.py", patterns)  # the matcher works
    for dockerfile in (CPU, GPU):
        for step in instructions(dockerfile):
            if step.startswith("COPY"):
                for source in step.split()[1:-1]:
                    assert (ROOT / source).exists(), source
                    assert not ignored(source, patterns), f"{source} is left out of the build context"
