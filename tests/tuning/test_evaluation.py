"""`searchengine eval` (issue 15): the paper's protocol in memory equals a plain
re-implementation of it, the product's search path equals it with the exact tier, and a set
whose answers are known scores what it must."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings
from searchengine.tuning import datasets
from searchengine.tuning import evaluation
from tests.trained import COLOURS, colour_picture

NAMES = list(COLOURS)


def colour_set(folder, per_colour: int, seed: int = 0, captions=("a {c} photo", "{c} picture")):
    """per_colour noisy pictures of each colour, each with captions naming its colour."""
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(per_colour):
        for c in NAMES:
            name = f"{c}-{n}.png"
            colour_picture(c, rng).save(folder / name)
            lines += [json.dumps({"image": name, "caption": t.format(c=c)}) for t in captions]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture(scope="module")
def colour(colour_model_dir) -> RetrievalModel:
    return RetrievalModel.load(str(colour_model_dir), device="cpu", dtype="float32")


def settings_for(tmp_path, **kw) -> Settings:
    return Settings(data_dir=tmp_path / "unused", device="cpu", dtype="float32", batch_size=4, **kw)


def reference_recalls(model: RetrievalModel, data: datasets.CaptionedSet, k: int, s: Settings) -> dict:
    """The protocol written out plainly, as LAVIS's compute_sim_matrix does it: full score
    matrices, -100 (plus ITC, to order the rest) off the top k, ranks by argsort."""
    from PIL import Image

    images = [Image.open(p).convert("RGB") for p in data.images]
    emb = model.embed_images(images)
    itc = emb.itc.astype(np.float16).astype(np.float32)  # as the index stores them
    vit = emb.vit.to(torch.float16) if s.writes_feature_cache("cpu") else emb.vit
    texts = model.embed_texts(data.texts)
    sim = np.array([[max(float(q @ t) for q in itc[i]) for t in texts] for i in range(len(itc))])  # [N, T]
    t2i_itc, t2i = sim.T.copy(), np.full(sim.T.shape, -100.0) + sim.T
    for t in range(len(texts)):
        top = np.argsort(-sim[:, t], kind="stable")[:k]
        t2i[t, top] = model.itm(data.texts[t], vit[top]) + sim[top, t]
    i2t_itc, i2t = sim.copy(), np.full(sim.shape, -100.0) + sim
    for i in range(len(itc)):
        top = np.argsort(-sim[i], kind="stable")[:k]
        i2t[i, top] = [model.itm(data.texts[j], vit[i:i + 1])[0] for j in top] + sim[i, top]

    def r(scores, right_of):
        ranks = []
        for row, right in zip(scores, right_of):
            order = np.argsort(-row, kind="stable")
            ranks.append(min(int(np.where(order == g)[0][0]) for g in right))
        ranks = np.array(ranks)
        return {f"R@{n}": round(100 * float(np.mean(ranks < n)), 2) for n in (1, 5, 10)}

    text_right = [[i] for i in data.text_image]
    image_right = [list(x) for x in data.image_texts()]
    return {
        "itc": {"text_to_image": r(t2i_itc, text_right), "image_to_text": r(i2t_itc, image_right)},
        "itm": {"text_to_image": r(t2i, text_right), "image_to_text": r(i2t, image_right)},
    }


def without_means(report: dict) -> dict:
    return {kind: {d: {k: v for k, v in r.items() if k != "mean"} for d, r in dirs.items()} for kind, dirs in report.items()}


@pytest.mark.parametrize("k_test", [3, 20])
def test_in_memory_equals_the_protocol_written_out(tmp_path, colour, k_test):
    data = datasets.load(colour_set(tmp_path, per_colour=4))
    s = settings_for(tmp_path)
    emb = evaluation.embed(colour, data, s)
    got = evaluation.in_memory(colour, emb, k_test)
    assert without_means(got) == reference_recalls(colour, data, k_test, s)
    assert got["itm"]["text_to_image"]["mean"] == pytest.approx(np.mean([got["itm"]["text_to_image"][f"R@{n}"] for n in (1, 5, 10)]), abs=0.01)


@pytest.mark.dtype
def test_a_set_whose_answers_are_known_in_bf16(tmp_path, colour_model_dir):
    """`eval` with the model in bf16 (dtype auto on GPUs and bf16 CPUs): the ViT outputs reach
    ITM in the model's dtype, and the colour model still finds every caption's picture first."""
    model = RetrievalModel.load(str(colour_model_dir), device="cpu", dtype="bfloat16")
    data = datasets.load(colour_set(tmp_path, per_colour=1))
    got = evaluation.in_memory(model, evaluation.embed(model, data, settings_for(tmp_path).model_copy(update={"dtype": "bfloat16"})), 4)
    for kind in ("itc", "itm"):
        assert got[kind]["text_to_image"]["R@1"] == 100.0
        assert got[kind]["image_to_text"]["R@1"] == 100.0


def test_a_set_whose_answers_are_known(tmp_path, colour):
    """One picture of each colour: the colour model finds each caption's picture first."""
    data = datasets.load(colour_set(tmp_path, per_colour=1))
    got = evaluation.in_memory(colour, evaluation.embed(colour, data, settings_for(tmp_path)), 4)
    for kind in ("itc", "itm"):
        assert got[kind]["text_to_image"]["R@1"] == 100.0
        assert got[kind]["image_to_text"]["R@1"] == 100.0


@pytest.mark.parametrize("itm_features", ["auto", "recompute"])
def test_the_search_path_equals_memory_with_the_exact_tier(tmp_path, colour, itm_features):
    data = datasets.load(colour_set(tmp_path, per_colour=4, seed=1))
    s = settings_for(tmp_path, vector_tier="exact", itm_features=itm_features)
    memory = evaluation.in_memory(colour, evaluation.embed(colour, data, s), 5)
    search = evaluation.through_search(colour, data, s, 5, workdir=tmp_path)
    assert search["tier"] == "exact"
    assert (search["images"], search["captions"]) == (16, 32)
    for kind in ("itc", "itm"):
        assert search[kind]["text_to_image"] == memory[kind]["text_to_image"]
    assert not (tmp_path / "unused").exists()  # nothing written where the user's library would be
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("searchengine-eval-")] == []  # removed


def test_an_unreadable_image_is_left_out_with_its_captions(tmp_path, colour):
    folder = colour_set(tmp_path, per_colour=2)
    (folder / "red-1.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    data = datasets.load(folder)
    s = settings_for(tmp_path)
    emb = evaluation.embed(colour, data, s)
    assert len(emb.data) == 7 and len(emb.data.texts) == 14
    assert emb.data.skipped["unreadable_image"] == 1
    search = evaluation.through_search(colour, data, s, 5, workdir=tmp_path)
    assert (search["images"], search["captions"]) == (7, 14)


def test_recall_and_rank_helpers():
    assert evaluation.recalls(np.array([0, 0, 4, 9, 10])) == {"R@1": 40.0, "R@5": 60.0, "R@10": 80.0, "mean": 60.0}
    scores = np.array([0.5, 0.9, 0.5, 0.1])
    assert evaluation.rank_of(scores, np.array([2])) == 2  # behind 0.9 and the tie at a lower index
    assert evaluation.rank_of(scores, np.array([3, 0])) == 1
    top = evaluation.top_by_itc(scores, 2)
    assert top.tolist() == [1, 0]
    itm = np.array([0.1, 0.8])  # ITM puts index 0 first among the top two
    assert evaluation.reranked_rank(scores, np.array([0]), top, itm) == 0
    assert evaluation.reranked_rank(scores, np.array([1]), top, itm) == 1
    assert evaluation.reranked_rank(scores, np.array([2]), top, itm) == 2  # first of the rest
    assert evaluation.reranked_rank(scores, np.array([3]), top, itm) == 3
