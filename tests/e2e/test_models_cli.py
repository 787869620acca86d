"""`searchengine eval` and `finetune` as a user runs them (issue 15): a table or JSON, bad
lines reported and skipped, what cannot be used refused, the library left alone, and a
fine-tuned model that `index` and `eval` load."""

from __future__ import annotations

import json

import pytest

from tests.inprocess import run_cli
from tests.tuning.test_evaluation import colour_set

pytestmark = pytest.mark.slow  # the real commands, end to end


def test_eval_prints_both_measurements_and_skips_bad_lines(tmp_path, colour_model_dir):
    data = colour_set(tmp_path, per_colour=2)
    with (data / "captions.jsonl").open("a") as f:
        f.write('{"image": "nowhere.png", "caption": "a red photo"}\nnot json\n{"image": "red-0.png", "caption": ""}\n')
    home = tmp_path / "library"
    env = {"SEARCHENGINE_DATA_DIR": str(home)}
    proc = run_cli("eval", data, "--model", colour_model_dir, "--device", "cpu", "--k-test", "4", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "8 images, 16 captions; skipped: the caption is empty: 1, the image is not there: 1, not a JSON object: 1" in proc.stdout
    assert "skipping captions.jsonl line 17: nowhere.png: the image is not there" in proc.stderr
    lines = proc.stdout.splitlines()
    assert any(line.startswith("in memory: ITC + ITM (top 4)") for line in lines)
    assert any(line.startswith("search (exact): ITC + ITM (top 4)") for line in lines)
    assert not home.exists()  # eval writes nothing to the library

    proc = run_cli("eval", data, "--model", colour_model_dir, "--device", "cpu", "--json", "--only", "memory", env=env)
    report = json.loads(proc.stdout)
    assert report["k_test"] == 20 and "search" not in report
    assert report["data"]["images"] == 8 and report["data"]["skipped"] == {"missing_image": 1, "not_json": 1, "empty_caption": 1}
    assert set(report["memory"]["itm"]) == {"text_to_image", "image_to_text"}
    assert set(report["memory"]["itm"]["text_to_image"]) == {"R@1", "R@5", "R@10", "mean"}


def test_eval_refuses_what_it_cannot_use(tmp_path, colour_model_dir, tiny_captioner_dir):
    data = colour_set(tmp_path, per_colour=1)
    env = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "library")}
    proc = run_cli("eval", tmp_path / "nothing", "--model", colour_model_dir, env=env)
    assert proc.returncode == 1 and "does not exist" in proc.stderr
    proc = run_cli("eval", data, "--model", tiny_captioner_dir, "--device", "cpu", env=env)
    assert proc.returncode == 1 and "not BLIP-2" in proc.stderr
    proc = run_cli("eval", data, "--model", colour_model_dir, "--k-test", "0", env=env)
    assert proc.returncode == 1 and "--k-test must be at least 1" in proc.stderr
    assert not (tmp_path / "library").exists()


def test_finetune_writes_a_model_that_index_and_eval_load(tmp_path, colour_model_dir):
    from tests.tuning.test_finetune import new_domain

    (tmp_path / "set").mkdir()
    data = new_domain(tmp_path / "set", per_colour=3)
    out = tmp_path / "tuned"
    env = {"SEARCHENGINE_DATA_DIR": str(tmp_path / "library")}
    args = ("finetune", data, "--out", out, "--model", colour_model_dir, "--device", "cpu", "--epochs", "2",
            "--batch-size", "4", "--lr", "1e-3", "--held-out", "0.25", "--k-test", "5")
    proc = run_cli(*args, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "trained on 16 images (32 captions), 8 steps" in proc.stdout
    assert "held out: 5 images (10 captions)" in proc.stdout
    for row in ("before: ITC", "before: ITC + ITM (top 5)", "after: ITC", "after: ITC + ITM (top 5)"):
        assert any(line.startswith(row + " ") for line in proc.stdout.splitlines()), row
    assert f"index with it: searchengine index FOLDER --model {out}" in proc.stdout
    assert not (tmp_path / "library").exists()

    again = run_cli(*args, env=env)  # the folder is taken now
    assert again.returncode == 1 and "already holds a fine-tuned model" in again.stderr

    # The output is a model like any other: index with it, search, evaluate it.
    proc = run_cli("index", data, "--model", out, "--no-captions", "--device", "cpu", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "21 indexed" in proc.stdout
    hits = json.loads(run_cli("search", "purple", "--json", "--device", "cpu", env=env).stdout)
    assert len(hits["results"]) == 10
    proc = run_cli("eval", data, "--device", "cpu", "--only", "memory", "--json", env=env)  # the index's model
    assert json.loads(proc.stdout)["model"] == str(out)


def test_finetune_refuses_bad_options_before_loading_anything(tmp_path, colour_model_dir):
    from tests.tuning.test_finetune import new_domain

    (tmp_path / "set").mkdir()
    data = new_domain(tmp_path / "set", per_colour=1)
    for flags, message in (
        (("--epochs", "0"), "--epochs must be at least 1"),
        (("--batch-size", "1"), "--batch-size must be at least 2"),
        (("--held-out", "1.5"), "--held-out must be between 0 and 1"),
    ):
        proc = run_cli("finetune", data, "--out", tmp_path / "out", "--model", colour_model_dir, *flags)
        assert proc.returncode == 1 and message in proc.stderr, proc.stderr
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    proc = run_cli("finetune", data, "--out", tmp_path / "full", "--model", "/nonexistent/model")
    assert proc.returncode == 1 and "not empty" in proc.stderr  # before the (missing) model is looked for
    assert not (tmp_path / "out").exists()
