"""`searchengine eval`: retrieval recall on a captioned set, by the BLIP-2 paper's protocol.

Two measurements of the same set:

(a) *in memory*, as LAVIS's `compute_sim_matrix` computes it: every image's ITC vectors and
    ViT output, every caption's ITC vector; text->image, each caption's `k_test` best images by
    ITC are re-scored by ITM and ranked by ITM + ITC ahead of the rest (ranked by ITC);
    image->text the same way round. Recall@K is the share of captions whose image is in the
    top K (text->image), and of images with one of their captions in the top K
    (image->text). The scores are the product's: ITM is P(match) (`RetrievalModel.itm`), and
    the image vectors are those the index stores (float16 values; within 2e-3 of float32), the
    ViT outputs those ITM reads (float16 where the product keeps a feature cache).
(b) *through the product*: the images indexed into a temporary library by the indexer, each
    caption searched by `Searcher.search` in semantic mode, with the vector index tier the
    settings choose, `k_candidates` and `rerank_top` at `k_test`. The product has no
    image->text search, so (b) is text->image only. With the exact tier, (b) equals (a).

Each measurement reports ITC alone and ITC + ITM re-rank.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np

from searchengine.config.settings import Settings
from searchengine.tuning.datasets import CaptionedSet

if TYPE_CHECKING:
    import torch

    from searchengine.indexing.stages import Decoded

    from searchengine.models.retrieval import RetrievalModel

KS = (1, 5, 10)
Progress = Callable[[int], None]


def recalls(ranks: np.ndarray) -> dict[str, float]:
    """R@1/5/10 (percent) and their mean, from 0-based ranks of the first right answer."""
    out = {f"R@{k}": round(100.0 * float(np.mean(ranks < k)), 2) if len(ranks) else 0.0 for k in KS}
    out["mean"] = round(sum(out.values()) / len(KS), 2)
    return out


# -- (a) in memory ----------------------------------------------------------------------------


@dataclass
class Embedded:
    data: CaptionedSet  # without the images that could not be read
    itc: np.ndarray  # [N, Q, D] the images' ITC vectors, float16 values as the index stores them
    vit: "torch.Tensor"  # [N, P, W] ViT outputs, as ITM re-ranking reads them
    texts: np.ndarray  # [U, D] the ITC vectors of the distinct captions
    text_of: np.ndarray  # [T]: each caption's row in `texts` (equal captions score equally)
    raw_vit: "torch.Tensor | None" = None  # the ViT outputs as computed, where asked to keep them


def embed(
    model: "RetrievalModel", data: CaptionedSet, settings: Settings, *, progress: Progress = lambda n: None,
    keep_raw: bool = False,
) -> Embedded:
    """Every image through the indexer's own read, decode and embed stages (so the pixels are
    those the index would get), every caption through the text encoder. `keep_raw`: keep the
    ViT outputs as computed too (`from_vit` then embeds the images again with new weights
    after the ViT, exactly as this did)."""
    import torch

    from searchengine.indexing.batches import batched
    from searchengine.indexing.stages import EmbedStage

    decode = decoder(model, settings)
    embed_stage = EmbedStage(model, keep_vit=True)
    batch = batch_size(model, settings)
    itc, vit, bad = [], [], {}
    for chunk in batched(range(len(data.images)), batch):
        decoded = []
        for i in chunk:
            item = decode(data.images[i])
            if isinstance(item, str):
                bad[i] = item
            else:
                decoded.append(item)
        for e in embed_stage(decoded):
            itc.append(e.itc.astype(np.float16).astype(np.float32))
            vit.append(torch.from_numpy(e.vit))
        progress(len(chunk))
    kept = data.without(bad) if bad else data
    if not kept.texts:
        from searchengine.tuning.datasets import DatasetError

        raise DatasetError(f"{data.source}: none of its images can be read ({kept.summary()})")
    raw = torch.stack(vit)
    return _with_texts(model, kept, np.stack(itc), raw, settings, raw if keep_raw else None)


def decoder(model: "RetrievalModel", settings: Settings) -> Callable[[Path], "Decoded | str"]:
    """A file's path -> the indexer's read and decode stages' result (the pixels the index
    would get), or why it cannot be read."""
    from searchengine.indexing.scan import FileEntry
    from searchengine.indexing.stages import Failed, ReadStage, decode_stage
    from searchengine.media.thumbnails import thumbnail_format

    read = ReadStage()
    decode = decode_stage(model, settings, thumbnail_format(settings))  # as a library made with these settings

    def one(path: Path):
        try:
            st = os.stat(path)
        except OSError as e:
            return f"cannot read it: {e.strerror}"
        item = decode(read(FileEntry(str(path), st.st_size, st.st_mtime_ns)))
        return item.message if isinstance(item, Failed) else item

    return one


def batch_size(model: "RetrievalModel", settings: Settings) -> int:
    """Images per model batch, as indexing takes them."""
    from searchengine.indexing.stages import index_batch_size

    return index_batch_size(model, settings)


def from_vit(model: "RetrievalModel", emb: Embedded, settings: Settings, vit: "torch.Tensor | None" = None) -> Embedded:
    """`emb`'s set embedded again by `model` from the ViT outputs `embed(keep_raw=True)` kept
    (fine-tuning trains everything after the ViT), or from `vit` (a trained ViT's outputs): in
    the batches `embed` used, so the same weights give the same vectors."""
    import torch

    vit = emb.raw_vit if vit is None else vit
    batch = batch_size(model, settings)
    with torch.inference_mode():
        itc = [model.itc_from_vit(vit[s:s + batch].to(model.device, model.vision_dtype)) for s in range(0, len(vit), batch)]
    return _with_texts(model, emb.data, np.concatenate(itc).astype(np.float16).astype(np.float32), vit, settings, vit)


def _with_texts(
    model: "RetrievalModel", data: CaptionedSet, itc: np.ndarray, vit: "torch.Tensor", settings: Settings, raw=None,
) -> Embedded:
    """Embedded, with the captions' vectors, and ViT outputs in the dtype ITM reads them in."""
    import torch

    keeps_fp16 = settings.writes_feature_cache(model.device) and settings.itm_features != "recompute"
    distinct, text_of = np.unique(np.array(data.texts, dtype=object), return_inverse=True)
    distinct = distinct.tolist()
    texts = np.concatenate([model.embed_texts(distinct[s:s + 64]) for s in range(0, len(distinct), 64)])
    itm_vit = vit.to(torch.float16 if keeps_fp16 else model.vision_dtype)
    return Embedded(data, itc, itm_vit, texts, text_of.reshape(-1), raw)


def similarity(itc: np.ndarray, texts: np.ndarray, chunk: int = 256) -> np.ndarray:
    """ITC [N, T]: for each image and text, the best of the image's vectors' dot products. A
    score that is not a number (weights that diverged in training) ranks last, never first."""
    out = np.empty((len(itc), len(texts)), np.float32)
    for s in range(0, len(itc), chunk):
        out[s:s + chunk] = np.einsum("nqd,td->ntq", itc[s:s + chunk], texts, optimize=True).max(axis=2)
    return np.nan_to_num(out, nan=-np.inf)


def rank_of(scores: np.ndarray, right: np.ndarray) -> int:
    """0-based rank of the best-placed of the `right` indices when `scores` is sorted
    descending, ties broken by index (as the product breaks them by id)."""
    best = len(scores)
    for r in right:
        s = scores[r]
        best = min(best, int(np.sum(scores > s) + np.sum(scores[:r] == s)))
    return best


def reranked_rank(itc: np.ndarray, right: np.ndarray, top: np.ndarray, itm: np.ndarray) -> int:
    """Rank of the best-placed right answer when the `top` candidates (by ITC) rank first by
    ITM + ITC, and the rest follow by ITC."""
    final = np.full(len(itc), -np.inf, np.float32)
    final[top] = np.nan_to_num(itm + itc[top], nan=-np.inf)  # not a number: last
    in_top = np.zeros(len(itc), bool)
    in_top[top] = True
    best = len(itc)
    for r in right:
        if in_top[r]:
            f = final[r]
            rank = int(np.sum(final > f) + np.sum(final[:r] == f))
        else:
            rest = np.where(in_top, -np.inf, itc)
            rank = len(top) + int(np.sum(rest > itc[r]) + np.sum(rest[:r] == itc[r]))
        best = min(best, rank)
    return best


def top_by_itc(scores: np.ndarray, k: int) -> np.ndarray:
    """The k best indices by score, ties by index (the order the product's candidates come in)."""
    order = np.lexsort((np.arange(len(scores)), -scores))
    return order[:k]


def itc_recalls(emb: Embedded, sim: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """(a) by ITC alone, without ITM: {"text_to_image": recalls, "image_to_text": recalls};
    `sim`: the [N, T] similarities where the caller has them."""
    sim = similarity(emb.itc, emb.texts)[:, emb.text_of] if sim is None else sim  # [N, T]
    data = emb.data
    per_image = data.image_texts()
    return {
        "text_to_image": recalls(np.array([rank_of(sim[:, t], data.text_image[t:t + 1]) for t in range(len(data.texts))])),
        "image_to_text": recalls(np.array([rank_of(sim[i], per_image[i]) for i in range(len(data.images))])),
    }


def in_memory(
    model: "RetrievalModel", emb: Embedded, k_test: int, *, progress: Progress = lambda n: None,
) -> dict[str, dict[str, dict[str, float]]]:
    """(a): {"itc": {"text_to_image": recalls, "image_to_text": ...}, "itm": {...}}."""
    import torch

    sim = similarity(emb.itc, emb.texts)[:, emb.text_of]  # [N, T]
    data = emb.data
    per_image = data.image_texts()
    t2i_itm, i2t_itm = [], []
    k = min(k_test, len(data.images))
    for t in range(len(data.texts)):
        right = data.text_image[t:t + 1]
        col = sim[:, t]
        top = top_by_itc(col, k)
        itm = model.itm(data.texts[t], emb.vit[torch.from_numpy(top)]) if k else np.zeros(0, np.float32)
        t2i_itm.append(reranked_rank(col, right, top, itm))
        progress(1)
    k = min(k_test, len(data.texts))
    for i in range(len(data.images)):
        row = sim[i]
        right = per_image[i]
        top = top_by_itc(row, k)
        # Each distinct caption scored once: equal captions get equal scores (and ties stay ties).
        rows, which = np.unique(emb.text_of[top], return_inverse=True)
        texts = [data.texts[top[np.flatnonzero(which == n)[0]]] for n in range(len(rows))]
        itm = model.itm_pairs(texts, emb.vit[i:i + 1].expand(len(texts), -1, -1))[which.reshape(-1)]
        i2t_itm.append(reranked_rank(row, right, top, itm))
        progress(1)
    return {
        "itc": itc_recalls(emb, sim),
        "itm": {"text_to_image": recalls(np.array(t2i_itm)), "image_to_text": recalls(np.array(i2t_itm))},
    }


# -- (b) through the product --------------------------------------------------------------------


def through_search(
    model: "RetrievalModel", data: CaptionedSet, settings: Settings, k_test: int, *,
    workdir: Path | None = None, progress: Progress = lambda n: None, on_indexed: Callable[[], Progress] | None = None,
) -> dict:
    """(b): the images indexed into a temporary library, every caption searched as a user's
    query is (`progress` counts images indexed, then captions searched, or what `on_indexed`
    returns does). {"tier", "images", "captions", "itc": {"text_to_image": recalls}, "itm": ...};
    images the indexer could not read are left out with their captions, as in (a)."""
    from searchengine.indexing.pipeline import Indexer
    from searchengine.indexing.report import Report
    from searchengine.indexing.scan import FileEntry
    from searchengine.library import Library
    from searchengine.search import Searcher

    with tempfile.TemporaryDirectory(prefix="searchengine-eval-", dir=workdir) as tmp:
        s = settings.model_copy(update=dict(
            data_dir=Path(tmp), captions=False, search_mode="semantic", k_candidates=max(k_test, max(KS)),
            rerank_top=k_test, itm_features="recompute" if settings.itm_features == "recompute" else "auto",
        ))
        wanted = {str(p): i for i, p in enumerate(data.images)}
        root = Path(os.path.commonpath([str(p.parent) for p in data.images]))

        def only_the_set(folder: Path, **_) -> Iterator[FileEntry]:
            for path in wanted:
                st = os.stat(path)
                yield FileEntry(path, st.st_size, st.st_mtime_ns)

        library = Library.open(s, create=True, writable=True)
        try:
            summary = Indexer(model, library, s, scanner=only_the_set, report=Report(done=progress)).run([root])
            bad = {wanted[path]: message for path, _, message in summary.failures if path in wanted}
            if bad:
                data = data.without(bad)
            progress = on_indexed() if on_indexed is not None else progress
            searcher = Searcher(model, library, s)
            tier = library.vector_index_info().get("tier")
            ranks = {"itc": [], "itm": []}
            for t, text in enumerate(data.texts):
                right = data.text_image[t]
                for kind, rerank in (("itc", 0), ("itm", k_test)):
                    page = searcher.search(text, k=max(KS), rerank=rerank, mode="semantic")
                    found = [j for j, hit in enumerate(page.hits) if any(wanted.get(p) == right for p in hit.paths)]
                    ranks[kind].append(found[0] if found else max(KS))
                progress(1)
        finally:
            library.close()
    return {"tier": tier, "images": len(data), "captions": len(data.texts), **{kind: {"text_to_image": recalls(np.array(r))} for kind, r in ranks.items()}}


def table(report: dict) -> str:
    """The report as the table `eval` prints."""
    k = report["k_test"]
    rows = []
    if "memory" in report:
        rows += [("in memory: ITC", report["memory"]["itc"]), (f"in memory: ITC + ITM (top {k})", report["memory"]["itm"])]
    if "search" in report:
        tier = report["search"]["tier"]
        rows += [(f"search ({tier}): ITC", report["search"]["itc"]), (f"search ({tier}): ITC + ITM (top {k})", report["search"]["itm"])]
    return format_rows(rows)


def format_rows(rows: list[tuple[str, dict]]) -> str:
    """Rows of recalls ({"text_to_image": ..., "image_to_text": ...}) under one header."""
    width = max([34] + [len(name) for name, _ in rows])
    head = f"{'':{width}s} {'text->image':^20s}   {'image->text':^20s}"
    sub = f"{'':{width}s} " + "   ".join(" ".join(f"{k:>6s}" for k in ("R@1", "R@5", "R@10")) for _ in range(2))
    lines = [head, sub]
    for name, got in rows:
        cells = []
        for direction in ("text_to_image", "image_to_text"):
            r = got.get(direction)
            cells.append(" ".join(f"{r[f'R@{k}']:6.2f}" for k in KS) if r else f"{'-':>6s} {'-':>6s} {'-':>6s}")
        lines.append(f"{name:{width}s} " + "   ".join(cells))
    return "\n".join(lines)
