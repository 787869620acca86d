"""What bfloat16 changes in the ranking, against float32: on the colour-trained tiny model
(tests/trained.py), the same pictures indexed and the same queries searched once in each
dtype, as the engine does it (ITC vectors kept in float16, as the store keeps them; ITM
re-ranking of the top `rerank` from the ViT output as the feature cache keeps it, float16;
final score ITM + ITC). Per query: precision@10 (the share of the right colour), the top-10 overlap (as sets, and identical lists), the
largest ITC |delta| and ITM |delta p| over the pictures. Also the mixed case the engine allows:
an index built in float32 searched in bf16.

    python benchmarks/bf16_quality.py --per-colour 25

tests/models/test_bf16_quality.py holds the bound this measures.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = ["red", "a green dog", "blue car", "yellow", "a red photo", "green", "picture blue", "a yellow tree"]


@dataclass
class Ranked:
    itc: np.ndarray  # [queries, images]
    itm: np.ndarray  # [queries, rerank]: P(match) of the re-ranked candidates, in `order`'s first rows
    order: list[list[int]]  # per query: image indices, best first (the re-ranked ones first)


def pictures(per_colour: int, seed: int = 0):
    from tests.trained import COLOURS, colour_picture

    rng = np.random.default_rng(seed)
    return [colour_picture(c, rng) for _ in range(per_colour) for c in COLOURS]


def index(model, images) -> tuple[np.ndarray, "object"]:
    """The images' ITC vectors as the store keeps them (float16) and ViT outputs as the
    feature cache does (float16)."""
    emb = model.embed_images(images)
    return emb.itc.astype(np.float16).astype(np.float32), emb.vit.to(dtype=__import__("torch").float16)


def rank(model, itc: np.ndarray, vit, queries, rerank: int = 20) -> Ranked:
    text = model.embed_texts(queries)
    scores = np.einsum("qd,nkd->qnk", text, itc).max(axis=2)
    order, itm = [], np.zeros((len(queries), rerank), np.float32)
    for qi, q in enumerate(queries):
        top = np.argsort(-scores[qi], kind="stable")[:rerank]
        p = model.itm(q, vit[top])
        itm[qi] = p
        final = p + scores[qi, top]
        reranked = top[np.argsort(-final, kind="stable")]
        rest = [int(i) for i in np.argsort(-scores[qi], kind="stable") if i not in set(top.tolist())]
        order.append([int(i) for i in reranked] + rest)
    return Ranked(scores, itm, order)


def precision(r: Ranked, queries, k: int = 10) -> float:
    """The share of the top k that are of the query's colour (picture i is colour i % 4)."""
    from tests.trained import COLOURS

    names = list(COLOURS)
    wanted = [next(names.index(w) for w in q.split() if w in names) for q in queries]
    return float(np.mean([sum(i % len(names) == c for i in order[:k]) / k for order, c in zip(r.order, wanted)]))


def compare(a: Ranked, b: Ranked, queries, k: int = 10) -> dict:
    overlap = [len(set(x[:k]) & set(y[:k])) / k for x, y in zip(a.order, b.order)]
    same = [x[:k] == y[:k] for x, y in zip(a.order, b.order)]
    itc_only_a = [list(np.argsort(-s, kind="stable")[:k]) for s in a.itc]
    itc_only_b = [list(np.argsort(-s, kind="stable")[:k]) for s in b.itc]
    return {
        "precision10": (precision(a, queries, k), precision(b, queries, k)),  # float32's, this run's
        "top10_overlap_min": min(overlap),
        "top10_overlap_mean": float(np.mean(overlap)),
        "top10_identical_reranked": f"{sum(same)}/{len(same)}",
        "top10_identical_itc": f"{sum(x == y for x, y in zip(itc_only_a, itc_only_b))}/{len(same)}",
        "itc_max_abs_delta": float(np.abs(a.itc - b.itc).max()),
        # ITM of the same image in both runs: the candidates both re-ranked
        "itm_max_abs_delta": _itm_delta(a, b),
    }


def _itm_delta(a: Ranked, b: Ranked) -> float:
    worst = 0.0
    for qi in range(len(a.order)):
        pa = {i: p for i, p in zip(_reranked_ids(a, qi), a.itm[qi])}
        pb = {i: p for i, p in zip(_reranked_ids(b, qi), b.itm[qi])}
        for i in pa.keys() & pb.keys():
            worst = max(worst, abs(float(pa[i]) - float(pb[i])))
    return worst


def _reranked_ids(r: Ranked, qi: int) -> list[int]:
    """The candidates in the order ITM scored them (ITC order, the first `rerank`)."""
    return [int(i) for i in np.argsort(-r.itc[qi], kind="stable")[: r.itm.shape[1]]]


def measure(model_dir: str, per_colour: int = 10, queries=QUERIES) -> dict[str, dict]:
    from searchengine.models.retrieval import RetrievalModel

    fp32 = RetrievalModel.load(model_dir, device="cpu", dtype="float32")
    bf16 = RetrievalModel.load(model_dir, device="cpu", dtype="bfloat16")
    images = pictures(per_colour)
    itc32, vit32 = index(fp32, images)
    itc16, vit16 = index(bf16, images)
    reference = rank(fp32, itc32, vit32, queries)
    return {
        "bf16 index + bf16 query": compare(reference, rank(bf16, itc16, vit16, queries), queries),
        "fp32 index + bf16 query": compare(reference, rank(bf16, itc32, vit32, queries), queries),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-colour", type=int, default=10)
    args = ap.parse_args()
    from tests.trained import colour_model

    for case, numbers in measure(str(colour_model()), args.per_colour).items():
        print(case)
        for key, value in numbers.items():
            print(f"  {key:28} {value}")


if __name__ == "__main__":
    main()
