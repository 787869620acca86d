"""docker/compose.yaml, read as compose reads it (no containers needed): it refuses to start
without PHOTOS, its Ray head starts without Ray Client, `--profile ray up` starts no second
writer, the driver joins the cluster and indexes with an address form that works, and the
API key it passes when none is set is no key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from searchengine.config.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker" / "compose.yaml"


class Unset(Exception):
    """`${VAR:?message}` with VAR unset or empty: compose stops with the message."""


def interpolate(text: str, env: dict[str, str]) -> str:
    """Compose's variable substitution: $$, ${VAR}, ${VAR:-default}, ${VAR-default} and
    ${VAR:?message}."""

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group("name"), m.group("op"), m.group("arg") or ""
        value = env.get(name)
        if op == ":?":
            if not value:
                raise Unset(f"{name}: {arg}")
            return value
        if op == ":-":
            return value or arg
        if op == "-":
            return arg if value is None else value
        return value or ""

    return re.sub(r"\$\$|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:\?|:-|-)(?P<arg>[^}]*))?\}", one, text)


def compose(env: dict[str, str]) -> dict:
    """The file as compose reads it: parsed, then every string interpolated."""

    def walk(node):
        if isinstance(node, dict):
            return {k: walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return interpolate(node, env) if isinstance(node, str) else node

    return walk(yaml.safe_load(COMPOSE.read_text()))


def test_compose_refuses_to_start_without_photos():
    with pytest.raises(Unset, match="PHOTOS: set PHOTOS to the folder of photos"):
        compose({})
    with pytest.raises(Unset):
        compose({"PHOTOS": ""})
    services = compose({"PHOTOS": "/home/me/Pictures"})["services"]
    mounting = {name: s for name, s in services.items() if any(v.endswith(":/photos:ro") for v in s.get("volumes", []))}
    assert set(mounting) == {"searchengine", "ray-head", "ray-driver"}
    for name, s in mounting.items():
        assert "/home/me/Pictures:/photos:ro" in s["volumes"], name
    # Every mount of the photos is the required variable: none falls back to a folder.
    raw = [line.strip() for line in COMPOSE.read_text().splitlines() if line.strip().endswith(":/photos:ro")]
    assert raw and all(line.startswith("- ${PHOTOS:?") for line in raw), raw


def test_the_ray_head_needs_no_ray_client():
    head = compose({"PHOTOS": "/p"})["services"]["ray-head"]
    start = head["entrypoint"] + head.get("command", [])
    assert start[:3] == ["ray", "start", "--head"] and "--port=6379" in start
    assert not any("client" in part for part in start), start  # the image has ray[data], not ray[client]
    assert "ray" in head["profiles"] and "ray" in head["build"]["args"]["EXTRAS"].split(",")


def test_profile_ray_up_starts_no_second_writer_and_the_driver_joins_then_indexes():
    services = compose({"PHOTOS": "/p"})["services"]
    up = {name for name, s in services.items() if not s.get("profiles") or "ray" in s["profiles"]}
    assert up == {"postgres", "searchengine", "ray-head"}  # `--profile ray up`: one watcher
    driver = services["ray-driver"]
    assert driver["profiles"] == ["ray-driver"]  # `run --rm ray-driver` turns it on for itself
    entry = " ".join(driver["entrypoint"])
    assert "ray start --address=ray-head:6379" in entry and entry.index("ray start") < entry.index("exec searchengine")
    assert '"$@"' in entry  # the command given to `run` (compose's $$ is a $)
    command = driver["command"]
    assert command[0] == "index" and "serve" not in command and "--watch" not in command
    assert command[command.index("--ray-address") + 1] == "auto"
    assert set(driver["depends_on"]) == {"postgres", "ray-head"}


def test_no_ray_client_address_is_shown_anywhere():
    for path in (COMPOSE, ROOT / "README.md", ROOT / "docker" / "Dockerfile"):
        assert not re.search(r"--ray-address[ =]ray://", path.read_text()), path


def test_the_api_key_compose_passes_when_none_is_set_is_no_key(tmp_path):
    server = compose({"PHOTOS": "/p"})["services"]["searchengine"]
    passed = server["environment"]["SEARCHENGINE_API_KEY"]
    assert passed == ""  # ${SEARCHENGINE_API_KEY:-} unset
    assert Settings(data_dir=tmp_path, api_key=passed).api_key is None
    key = compose({"PHOTOS": "/p", "SEARCHENGINE_API_KEY": "k"})["services"]["searchengine"]["environment"]["SEARCHENGINE_API_KEY"]
    assert Settings(data_dir=tmp_path, api_key=key).api_key.get_secret_value() == "k"
