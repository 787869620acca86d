"""Captioned sets for `eval` and `finetune` (issue 15): both formats, and every bad line
counted and skipped with a message."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from searchengine.tuning import datasets
from searchengine.tuning.datasets import DatasetError


def picture(path, colour=(200, 30, 30)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), colour).save(path)
    return path


def test_json_lines_with_every_kind_of_bad_line(tmp_path):
    picture(tmp_path / "a.png")
    picture(tmp_path / "sub" / "b.png")
    lines = [
        {"image": "a.png", "caption": "a red square"},
        {"image": "a.png", "caption": "  something   red  "},  # whitespace normalised
        {"image": "sub/b.png", "caption": "another red square"},
        "this is not json",
        {"image": "a.png"},  # no caption
        {"caption": "no image"},
        {"image": "a.png", "caption": "   "},  # empty
        {"image": "missing.png", "caption": "gone"},
        {"image": "a.png", "caption": "a red square"},  # duplicate
        ["a", "list"],
    ]
    (tmp_path / "captions.jsonl").write_text("\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines) + "\n\n")
    got = datasets.load(tmp_path)
    assert [p.name for p in got.images] == ["a.png", "b.png"]
    assert got.texts == ["a red square", "something red", "another red square"]
    assert got.text_image.tolist() == [0, 0, 1]
    assert dict(got.skipped) == {"not_json": 2, "no_image_or_caption": 2, "empty_caption": 1, "missing_image": 1, "duplicate": 1}
    assert got.messages[0] == "captions.jsonl line 4: not a JSON object"
    assert len(got.messages) == datasets.EXAMPLES_KEPT and "missing.png: the image is not there" in got.messages[-1]
    assert [t.tolist() for t in got.image_texts()] == [[0, 1], [2]]
    assert "2 images, 3 captions; skipped:" in got.summary()


def test_karpathy_json_takes_the_test_split_and_looks_under_filepath(tmp_path):
    picture(tmp_path / "val2014" / "x.jpg")
    picture(tmp_path / "y.jpg")
    picture(tmp_path / "z.jpg")
    doc = {"images": [
        {"filepath": "val2014", "filename": "x.jpg", "split": "test", "sentences": [{"raw": "one"}, {"raw": "two"}]},
        {"filename": "y.jpg", "split": "test", "sentences": [{"raw": "three"}, {"tokens": ["no", "raw"]}]},
        {"filename": "z.jpg", "split": "train", "sentences": [{"raw": "four"}]},
    ]}
    (tmp_path / "dataset_coco.json").write_text(json.dumps(doc))
    got = datasets.load(tmp_path / "dataset_coco.json")
    assert [p.name for p in got.images] == ["x.jpg", "y.jpg"]
    assert got.texts == ["one", "two", "three"]
    assert got.skipped["no_image_or_caption"] == 1
    train = datasets.load(tmp_path, split="train")
    assert train.texts == ["four"]


def test_images_elsewhere(tmp_path):
    picture(tmp_path / "pics" / "a.png")
    (tmp_path / "c.jsonl").write_text(json.dumps({"image": "a.png", "caption": "red"}) + "\n")
    assert len(datasets.load(tmp_path / "c.jsonl", images=tmp_path / "pics")) == 1
    with pytest.raises(DatasetError, match="no usable image and caption"):
        datasets.load(tmp_path / "c.jsonl")  # a.png is not next to it


def test_what_cannot_be_read_at_all(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        datasets.load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no captions file"):
        datasets.load(tmp_path / "empty")
    (tmp_path / "two").mkdir()
    (tmp_path / "two" / "a.jsonl").write_text("")
    (tmp_path / "two" / "b.json").write_text("{}")
    with pytest.raises(DatasetError, match="several captions files"):
        datasets.load(tmp_path / "two")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "captions.jsonl").write_bytes(b"\xff\xfe\x00 not text")
    with pytest.raises(DatasetError, match="cannot read"):
        datasets.load(tmp_path / "bad")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "captions.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no usable"):
        datasets.load(tmp_path / "blank")


def test_split_and_without(tmp_path):
    for i in range(10):
        picture(tmp_path / f"{i}.png", (i * 20, 0, 0))
    (tmp_path / "captions.jsonl").write_text("".join(
        json.dumps({"image": f"{i}.png", "caption": f"picture {i} take {j}"}) + "\n" for i in range(10) for j in range(2)
    ))
    data = datasets.load(tmp_path)
    train, held = data.split(0.3, seed=1)
    assert len(train) == 7 and len(held) == 3
    assert not set(train.images) & set(held.images)
    for part in (train, held):  # each text still points at its own image
        for t, i in zip(part.texts, part.text_image):
            assert t.startswith(f"picture {part.images[i].stem} ")
    assert data.split(0.3, seed=1)[1].images == held.images  # the seed decides
    fewer = data.without({0: "broken", 3: "broken"})
    assert len(fewer) == 8 and len(fewer.texts) == 16
    assert fewer.skipped["unreadable_image"] == 2
    assert np.all(fewer.text_image < 8)
    with pytest.raises(DatasetError, match="at least 2"):
        data.subset(np.array([0])).split(0.5)
