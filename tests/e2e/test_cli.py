"""End to end through the real `searchengine` command, as a user runs it."""

from __future__ import annotations

import json
import re
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from searchengine.models.loading import resolve_dtype
from tests.images import write_awkward, write_bad
from tests.inprocess import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.dtype]  # the real CLI over real photos, indexed by a real process, dtype auto

EXE = str(Path(sys.executable).with_name("searchengine"))


def cli(*args, env_extra=None, check_rc=None, process=False) -> subprocess.CompletedProcess:
    """The command; in this process unless `process` (tests/inprocess.py: the same `main`,
    argv and environment, without ~6 s of a fresh transformers import per call)."""
    if process:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
        proc = subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=env, timeout=600)
    else:
        proc = run_cli(*args, env=env_extra, clean=False)
    if check_rc is not None:
        assert proc.returncode == check_rc, proc.stderr
    return proc


@pytest.fixture(scope="module")
def library(tmp_path_factory, photos_dir, tiny_model_dir, tiny_captioner_dir):
    """A real photo folder plus awkward and bad files, indexed and captioned once through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    photos = root / "Pictures"
    shutil.copytree(photos_dir, photos)
    write_awkward(photos / "awkward")
    bad = write_bad(photos / "bad", next(photos.rglob("*.jpg")).read_bytes())
    env = {"SEARCHENGINE_MODEL": str(tiny_model_dir), "SEARCHENGINE_DATA_DIR": str(root / "data"),
           "SEARCHENGINE_CAPTION_MODEL": str(tiny_captioner_dir), "SEARCHENGINE_CAPTION_MAX_TOKENS": "12",
           # dtype auto, as a user's index is made (the stats test checks what auto picked),
           # whatever SEARCHENGINE_DTYPE the suite itself runs under
           "SEARCHENGINE_DTYPE": "auto"}
    first = cli("index", photos, "--device", "cpu", env_extra=env, check_rc=0, process=True)  # the real command
    return {"photos": photos, "env": env, "first": first, "bad": bad, "data": root / "data"}


def _search_json(library, query, *extra):
    proc = cli("search", query, "--json", *extra, env_extra=library["env"], check_rc=0)
    return json.loads(proc.stdout)


def test_index_prints_a_summary_and_skips_bad_files(library):
    out = library["first"].stdout
    n_photos = len([p for p in library["photos"].rglob("*") if p.is_file()]) - len(library["bad"])
    assert f"{n_photos} indexed" in out and f"{len(library['bad'])} skipped" in out
    # Where the time went, stage by stage, and each stage took some.
    split = re.search(r"time: read ([\d.]+) s and decode ([\d.]+) s .* model ([\d.]+) s, captions ([\d.]+) s, write ([\d.]+) s", out)
    assert split and float(split.group(2)) > 0 and float(split.group(3)) > 0 and float(split.group(4)) > 0, out
    for reason in library["bad"]:
        assert f"{reason}: 1" in out
    err = library["first"].stderr
    for path in library["bad"].values():
        assert f"skipping {path}:" in err
    assert "Traceback" not in err


def test_search_returns_ranked_results_with_three_scores(library):
    data = _search_json(library, "a yellow flower", "-k", "5", "--mode", "semantic")
    assert data["mode"] == "semantic" and [r["rank"] for r in data["results"]] == [1, 2, 3, 4, 5]
    assert data["reranked"] == 20
    for r in data["results"]:
        assert Path(r["path"]).exists()
        assert r["score"] == pytest.approx(r["itm"] + r["itc"], abs=1e-6)
        assert 0 <= r["itm"] <= 1 and -1 <= r["itc"] <= 1
    scores = [r["score"] for r in data["results"]]
    assert scores == sorted(scores, reverse=True)
    plain = _search_json(library, "a yellow flower", "-k", "20", "--no-rerank")
    assert len(plain["results"]) == 20 and all(r["itm"] is None for r in plain["results"])
    text = cli("search", "a yellow flower", "-k", "3", env_extra=library["env"], check_rc=0).stdout
    lines = text.strip().splitlines()
    assert "final" in lines[0] and "itm" in lines[0] and "itc" in lines[0] and "words" in lines[0]
    ranked = [line for line in lines[1:] if line.split()[0].isdigit()]
    assert [line.split()[0] for line in ranked] == ["1", "2", "3"]
    captions = [line.strip() for line in lines[1:] if line not in ranked]
    assert len(captions) == 3  # each hit's caption on the line below it


def test_non_ascii_and_awkward_files_are_searchable(library):
    paths = {p for r in _search_json(library, "photo", "-k", "200", "--no-rerank")["results"] for p in r["paths"]}
    for f in (library["photos"] / "awkward").iterdir():
        assert str(f) in paths
    assert any("東京" in p for p in paths)


def test_stats_shows_counts_failures_model_and_sizes(library):
    data = json.loads(cli("stats", "--json", env_extra=library["env"], check_rc=0).stdout)
    assert data["failures_by_reason"] == {reason: 1 for reason in library["bad"]}
    assert {f["path"] for f in data["failures"]} == {str(p) for p in library["bad"].values()}
    # Indexed with dtype auto: what devices.auto_dtype picks for this CPU (bf16 where it has
    # avx512_bf16, or where .ci/run forces it; else float32), and the index says so.
    auto = str(resolve_dtype("auto", "cpu")).replace("torch.", "")
    assert data["model"] == library["env"]["SEARCHENGINE_MODEL"] and data["model_dtype"] == auto
    assert data["made_by"] == [f"{auto} on cpu"]
    assert data["vectors"] == data["images"] * 8  # the tiny model has 8 query tokens
    assert data["bytes_on_disk"]["store"] > 0 and data["bytes_on_disk"]["vector_index"] > 0
    assert data["bytes_on_disk"]["feature_cache"] > 0  # indexed on a CPU: the ViT outputs are kept
    text = cli("stats", env_extra=library["env"], check_rc=0).stdout
    assert "too_large: 1" in text and "exact" in text and f"vectors by   the model in {auto} on cpu" in text


def test_reindex_is_incremental_and_deletions_leave_results(library):
    again = cli("index", library["photos"], env_extra=library["env"], check_rc=0).stdout
    assert again.startswith("0 indexed")
    victim = next(library["photos"].rglob("Dune.jpg"))
    before = {r["path"] for r in _search_json(library, "sand", "-k", "200", "--no-rerank")["results"]}
    assert str(victim) in before
    victim.unlink()
    after_index = cli("index", library["photos"], env_extra=library["env"], check_rc=0).stdout
    assert "1 removed" in after_index
    after = {r["path"] for r in _search_json(library, "sand", "-k", "200", "--no-rerank")["results"]}
    assert after == before - {str(victim)}


@pytest.mark.parametrize(
    "args, message",
    [
        (["index", "{tmp}", "--model", "/no/such/model"], "model directory '/no/such/model' does not exist"),
        (["search", "   "], "query is empty"),
        (["search", "dog", "-k", "0"], "at least 1"),
        (["stats"], "no index in"),
        (["search", "dog"], "no index in"),
        (["index", "/no/such/folder"], "does not exist"),
        (["index", "{tmp}/Pictrues/Trps"], "folder '{tmp}/Pictrues/Trps' does not exist; did you mean '{tmp}/Pictures/Trips'?"),
        (["watch", "{tmp}/pictures"], "does not exist; did you mean '{tmp}/Pictures'?"),
        (["index", "--batch-size", "-3", "."], "batch_size"),
        (["search", "--mode", "keyword", "--", "-cat"], "no words to look for"),
    ],
)
def test_errors_are_one_clear_line(tmp_path, tiny_model_dir, args, message):
    env = {"SEARCHENGINE_MODEL": str(tiny_model_dir), "SEARCHENGINE_DATA_DIR": str(tmp_path / "nothing-here"),
           "SEARCHENGINE_CAPTIONS": "false"}
    (tmp_path / "Pictures" / "Trips").mkdir(parents=True)  # the folder a mistyped one is nearest to
    proc = cli(*(a.replace("{tmp}", str(tmp_path)) for a in args), env_extra=env)
    message = message.replace("{tmp}", str(tmp_path))
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and lines[0].startswith("searchengine: error:"), proc.stderr


@pytest.mark.parametrize("caption_args", [[], ["--caption-model", "/no/such/captioner"]])
def test_a_captioner_that_cannot_load_stops_index_before_any_work(tmp_path, tiny_model_dir, photos_dir, caption_args):
    # No hub here: the default captioner cannot be fetched, which is what a user without a network meets.
    env = {"SEARCHENGINE_MODEL": str(tiny_model_dir), "SEARCHENGINE_DATA_DIR": str(tmp_path / "data")}
    proc = cli("index", photos_dir, *caption_args, env_extra=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert "caption model" in lines[0] and "--caption-model" in lines[0] and "--no-captions" in lines[0]
    assert (caption_args[1] if caption_args else "Salesforce/blip-image-captioning-base") in lines[0]
    assert not (tmp_path / "data").exists()  # nothing was started


def test_wrong_model_type_is_one_clear_line(tmp_path, library):
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8)).save_pretrained(tmp_path / "bert")
    proc = cli("search", "dog", "--model", tmp_path / "bert", env_extra=library["env"])
    assert proc.returncode == 1 and "not BLIP-2" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_opening_with_another_model_is_refused(tmp_path, library):
    cli("make-tiny-model", tmp_path / "other", "--seed", "3", check_rc=0)
    proc = cli("search", "dog", "--model", tmp_path / "other", env_extra=library["env"])
    assert proc.returncode == 1 and "is another checkpoint" in proc.stderr and "Traceback" not in proc.stderr


def test_keyword_search_and_captions_through_the_cli(library):
    data = _search_json(library, "elephants", "--mode", "keyword", "-k", "20")
    assert data["mode"] == "keyword"
    assert {Path(r["path"]).name for r in data["results"]} >= {"Elephants.jpg", "Elephants_3840x2160.jpg"}
    assert all(r["keyword"] > 0 and r["itm"] is None for r in data["results"])
    assert all(r["caption"] for r in data["results"])  # captioned at index time
    stats = json.loads(cli("stats", "--json", env_extra=library["env"], check_rc=0).stdout)
    assert stats["captioned"] == stats["images"] and stats["caption_failures"] == 0
    assert stats["caption_models"] == {library["env"]["SEARCHENGINE_CAPTION_MODEL"]: stats["images"]}


def test_caption_command_recaptions_with_another_model(library, tmp_path):
    nothing = cli("caption", env_extra=library["env"], check_rc=0).stdout
    assert nothing.startswith("0 captioned")  # every image already has a caption from this model
    cli("make-tiny-model", tmp_path / "blip2", "--kind", "blip2", check_rc=0)
    out = cli("caption", "--caption-model", tmp_path / "blip2", env_extra=library["env"], check_rc=0).stdout
    stats = json.loads(cli("stats", "--json", env_extra=library["env"], check_rc=0).stdout)
    assert out.startswith(f"{stats['images']} captioned with {tmp_path / 'blip2'}, 0 failed")
    assert stats["caption_models"] == {str(tmp_path / "blip2"): stats["images"]}
    assert f"captions     {stats['images']} of {stats['images']}" in cli("stats", env_extra=library["env"], check_rc=0).stdout
    proc = cli("caption", "--caption-model", tmp_path / "missing", env_extra=library["env"])
    assert proc.returncode == 1 and "--caption-model" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
