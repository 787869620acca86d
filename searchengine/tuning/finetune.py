"""`searchengine finetune`: BLIP-2's retrieval objectives on a user's captioned photos.

What BLIP-2's first stage trains for retrieval, on a checkpoint that already has it: the
Q-Former, its query tokens, its word embeddings and both projections and the ITM head; the
ViT stays frozen, as in the paper, so its outputs are computed once and kept on disk for the
run (`ViTCache`). Two losses per batch of images, one caption each:

- ITC, contrastive over the batch both ways, image-text similarity the best of the image's
  query vectors (as search scores it) over a learnable temperature (LAVIS: 0.07, kept in
  [0.001, 0.5]; the transformers class has none, and ranking does not need one), label
  smoothing 0.1. Captions equal to each other count as positives of each other's images.
- ITM, binary: every pair, plus one wrong image for each caption and one wrong caption for
  each image. Wrong ones are drawn at random first, then more and more from ITC's own
  mistakes (hard negatives, in proportion to their similarity): ITM learns nothing when it
  starts on hard negatives (MODEL_NOTES.md).

AdamW (no decay on biases, norms and the query tokens), linear warm-up then cosine decay. A
held-out split is measured with `eval`'s code before and after. The run checkpoints into
`OUT/.finetune/` every so many steps and on Ctrl-C: the same command resumes it, and a resumed
run trains exactly as an uninterrupted one (each step's data order, negatives and dropout come
from the seed and the step alone). The result is a `save_pretrained` folder (model, image
processor, tokenizer) that `index --model OUT` loads like any checkpoint, with `finetune.json`
(the before/after recalls and the settings) beside it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from searchengine.config.devices import is_cuda
from searchengine.errors import FinetuneError
from searchengine.util.durable import write_json
from searchengine.config.settings import Settings
from searchengine.tuning import evaluation
from searchengine.tuning.datasets import CaptionedSet

if TYPE_CHECKING:
    import torch

    from searchengine.models.retrieval import RetrievalModel

WORK = ".finetune"  # inside OUT: the ViT cache and the checkpoint, removed when done
REPORT = "finetune.json"


@dataclass(frozen=True)
class Config:
    epochs: int = 5
    batch_size: int = 16
    lr: float = 1e-5  # LAVIS fine-tunes retrieval at 1e-5
    weight_decay: float = 0.05
    warmup: float = 0.1  # share of the steps
    hard_from: float = 0.3  # share of the steps on random negatives; hard ones then ramp in as long again
    held_out: float = 0.1  # share of the images measured, never trained on
    seed: int = 0
    k_test: int = 20
    checkpoint_every: int = 200  # steps
    label_smoothing: float = 0.1
    temp_init: float = 0.07


@dataclass
class Step:
    """What the progress callback is told after each step."""

    step: int
    total: int
    loss_itc: float
    loss_itm: float
    hard: float  # share of negatives drawn from ITC's mistakes
    epoch: int = 1  # the epoch this step belongs to, from 1
    epochs: int = 1
    seconds: float = 0.0  # this step's time


# -- the ViT outputs, computed once ------------------------------------------------------------


class ViTCache:
    """The images' ViT outputs [N, P, W] as float16 in a file, filled in order; `done.json`
    says how far, and which images could not be read, so an interrupted fill goes on."""

    def __init__(self, folder: Path, n: int, shape: tuple[int, int]) -> None:
        self.folder = folder
        self.path = folder / "vit.f16"
        self.state_path = folder / "vit.json"
        self.n, self.shape = n, tuple(shape)
        state = self._state()
        mode = "r+" if self.path.exists() and self.path.stat().st_size == n * shape[0] * shape[1] * 2 else "w+"
        self.array = np.memmap(self.path, dtype=np.float16, mode=mode, shape=(n, *shape))
        if mode == "w+":
            state = {"done": 0, "bad": {}}
        self.done: int = state["done"]
        self.bad: dict[int, str] = {int(k): v for k, v in state["bad"].items()}

    def _state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {"done": 0, "bad": {}}

    def fill(self, model: "RetrievalModel", images: list[Path], settings: Settings, progress: Callable[[int], None]) -> None:
        """The rest of the images through the indexer's read and decode stages and the ViT."""
        import torch

        decode = evaluation.decoder(model, settings)
        batch = evaluation.batch_size(model, settings)
        progress(self.done)
        while self.done < self.n:
            start, end = self.done, min(self.n, self.done + batch)
            rows, pixels = [], []
            for i in range(start, end):
                item = decode(images[i])
                if isinstance(item, str):
                    self.bad[i] = item
                else:
                    rows.append(i)
                    pixels.append(item.pixels)
            if pixels:
                self.array[rows] = model.vit(torch.stack(pixels)).float().cpu().numpy().astype(np.float16)
                self.array.flush()
            self.done = end
            write_json(self.state_path, {"done": self.done, "bad": self.bad})
            progress(end - start)

    def rows(self, index: np.ndarray) -> "torch.Tensor":
        import torch

        return torch.from_numpy(np.asarray(self.array[np.asarray(index)], dtype=np.float32))


# -- one step ------------------------------------------------------------------------------------


def batch_losses(
    model: "RetrievalModel", vit: "torch.Tensor", texts: list[str], temp: "torch.Tensor",
    rng: np.random.Generator, hard: float, smoothing: float,
) -> tuple["torch.Tensor", "torch.Tensor"]:
    """(ITC loss, ITM loss) of a batch: image i [B, P, W] with caption i (see the module doc)."""
    import torch
    from torch.nn import functional as F

    b = len(texts)
    tok = model.tokenize(texts)
    ids, mask = tok["input_ids"].to(model.device), tok["attention_mask"].to(model.device)
    img = model.image_features(vit)  # [B, Q, D]
    txt = model.text_features(ids, mask)  # [B, D]
    sim = torch.einsum("iqd,td->itq", img, txt).amax(dim=-1)  # [B images, B texts]
    same = np.array([[a == c for c in texts] for a in texts])  # equal captions: positives both ways
    targets = torch.from_numpy(same / same.sum(axis=1, keepdims=True)).to(sim)
    targets = (1 - smoothing) * targets + smoothing / b
    logits = sim / temp
    loss_itc = (-(targets * F.log_softmax(logits, dim=1)).sum(1).mean() - (targets * F.log_softmax(logits.t(), dim=1)).sum(1).mean()) / 2

    with torch.no_grad():  # one wrong image per caption, one wrong caption per image
        weights = {"i2t": F.softmax(logits.float(), dim=1).cpu().numpy(), "t2i": F.softmax(logits.t().float(), dim=1).cpu().numpy()}
    neg_img_for, neg_txt_for = [], []
    for row in range(b):
        wrong = ~same[row]
        if not wrong.any():
            continue
        for kind, out in (("t2i", neg_img_for), ("i2t", neg_txt_for)):
            w = weights[kind][row] * wrong if rng.random() < hard else wrong.astype(np.float64)
            w = w / w.sum() if w.sum() > 0 else wrong / wrong.sum()
            out.append((row, int(rng.choice(b, p=w))))
    pairs_text = list(range(b)) + [t for t, _ in neg_img_for] + [j for _, j in neg_txt_for]
    pairs_image = list(range(b)) + [j for _, j in neg_img_for] + [i for i, _ in neg_txt_for]
    labels = torch.tensor([1] * b + [0] * (len(pairs_text) - b), device=model.device)
    itm = model.itm_logits(ids[pairs_text], mask[pairs_text], vit[pairs_image])
    return loss_itc, F.cross_entropy(itm.float(), labels)


def lr_at(step: int, total: int, config: Config) -> float:
    """Linear warm-up over `warmup` of the steps, then cosine decay to 0."""
    warm = max(1, round(config.warmup * total))
    if step < warm:
        return config.lr * (step + 1) / warm
    return config.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def hard_share(step: int, total: int, config: Config) -> float:
    """The share of negatives drawn from ITC's mistakes: none for `hard_from` of the run, then
    rising to all over as many steps again."""
    start = config.hard_from * total
    return float(np.clip((step - start) / max(1.0, start), 0.0, 1.0)) if step >= start else 0.0


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    base: str
    out: str
    train_images: int
    train_captions: int
    held_out_images: int
    held_out_captions: int
    steps: int
    pairs_per_s: float  # image-caption pairs trained per second (the ViT cached), this run
    before: dict
    after: dict
    config: dict
    skipped: dict

    def table(self) -> str:
        k = self.config["k_test"]
        return evaluation.format_rows([
            ("before: ITC", self.before["itc"]), (f"before: ITC + ITM (top {k})", self.before["itm"]),
            ("after: ITC", self.after["itc"]), (f"after: ITC + ITM (top {k})", self.after["itm"]),
        ])


def run(
    model: "RetrievalModel", data: CaptionedSet, out: Path, config: Config, settings: Settings, *,
    on_stage: Callable[[str, int], Callable[[int], None]] = lambda what, total: (lambda n: None),
    on_step: Callable[[Step], None] = lambda s: None,
    on_note: Callable[[str], None] = lambda message: None,
) -> Report:
    """Fine-tune `model` (loaded in float32) on `data`, into `out`. `on_stage(what, total)`
    names each stage and returns its progress callback; `on_step` hears every training step;
    `on_note` is told, in words, what a resumed run takes from the one before."""
    import torch

    out = Path(out).expanduser()
    work = out / WORK
    key = _run_key(model, data, config)
    _claim(out, work, key)
    m = model.model
    train, held = data.split(config.held_out, config.seed)
    cache = ViTCache(work, len(train.images), model.vit_shape)
    if 0 < cache.done < cache.n:
        on_note(f"the ViT outputs of {cache.done} of {cache.n} training images were computed before: going on from there")
    cache.fill(model, train.images, settings, on_stage("computing ViT outputs", len(train.images)))
    train_rows = np.array([i for i in range(len(train.images)) if i not in cache.bad], np.int64)
    if cache.bad:
        train = train.without(cache.bad)
    # The held-out images as `eval` embeds them; after training, embedded again from their
    # ViT outputs (frozen) by the new weights.
    held_emb = evaluation.embed(model, held, settings, keep_raw=True, progress=on_stage("embedding the held-out images", len(held)))
    held = held_emb.data
    if len(train) < 2 or not held.texts:
        raise FinetuneError(f"too few readable images to train and measure: {len(train)} to train on, {len(held)} held out")

    def measure(what: str, emb: evaluation.Embedded) -> dict:
        m.eval()
        return evaluation.in_memory(model, emb, config.k_test, progress=on_stage(what, len(held.texts) + len(held)))

    state = _load_checkpoint(work)
    before = state["before"] if state else measure("measuring before", held_emb)

    params = [(n, p) for n, p in m.named_parameters() if not n.startswith("vision_model.")]
    for p in m.vision_model.parameters():
        p.requires_grad_(False)
    temp = torch.nn.Parameter(torch.tensor(config.temp_init, device=model.device))
    decay = [p for n, p in params if p.ndim >= 2 and n != "query_tokens"]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and n != "query_tokens")] + [temp]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}], lr=config.lr,
    )
    batch = min(config.batch_size, len(train))
    per_epoch = max(1, len(train) // batch)
    total = per_epoch * config.epochs
    step = 0
    if state:
        m.load_state_dict(state["weights"], strict=False)
        temp.data.fill_(state["temp"])
        opt.load_state_dict(state["optimizer"])
        step = state["step"]
        on_note(f"resuming from step {step} of {total} (epoch {step // per_epoch + 1} of {config.epochs}), saved in {work}")
    texts_of = train.image_texts()
    progress = on_stage("fine-tuning", total)
    progress(step)
    trained_s, pairs, updating = 0.0, 0, False
    on_cuda = is_cuda(str(model.device))
    try:
        while step < total:
            t0 = time.perf_counter()
            epoch, at = divmod(step, per_epoch)
            order = np.random.default_rng([config.seed, epoch]).permutation(len(train))
            chosen = order[at * batch:(at + 1) * batch]
            rng = np.random.default_rng([config.seed, 1_000_003, step])
            torch.manual_seed(config.seed * 1_000_003 + step)  # dropout, by step: a resumed run matches
            texts = [train.texts[int(rng.choice(texts_of[i]))] for i in chosen]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, config)
            m.train()
            share = hard_share(step, total, config)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=on_cuda):  # float32 weights, bf16 maths
                loss_itc, loss_itm = batch_losses(
                    model, cache.rows(train_rows[chosen]).to(model.device), texts, temp, rng, share, config.label_smoothing,
                )
            opt.zero_grad(set_to_none=True)
            (loss_itc + loss_itm).backward()
            updating = True  # weights and step disagree until the step is counted
            opt.step()
            with torch.no_grad():
                temp.clamp_(0.001, 0.5)
            step += 1
            updating = False
            trained_s += time.perf_counter() - t0
            pairs += len(chosen)
            progress(1)
            on_step(Step(step, total, float(loss_itc.detach()), float(loss_itm.detach()), share,
                         epoch=(step - 1) // per_epoch + 1, epochs=config.epochs, seconds=time.perf_counter() - t0))
            if step % config.checkpoint_every == 0 and step < total:
                _save_checkpoint(work, key, step, m, temp, opt, before)
    except BaseException:  # Ctrl-C, or anything: what was trained is kept for the next run
        if not updating and step > (state["step"] if state else 0):
            _save_checkpoint(work, key, step, m, temp, opt, before)
        raise
    skipped = dict(train.skipped + (held.skipped - data.skipped))  # each part counts the set's own skips, and its unreadable images
    m.eval()
    after = measure("measuring after", evaluation.from_vit(model, held_emb, settings))
    report = Report(
        base=model.name, out=str(out), train_images=len(train), train_captions=len(train.texts),
        held_out_images=len(held), held_out_captions=len(held.texts), steps=total,
        pairs_per_s=round(pairs / trained_s, 2) if trained_s else 0.0, before=before, after=after,
        config=asdict(config), skipped=skipped,
    )
    _save_model(model, out, work, report)
    return report


# -- files ---------------------------------------------------------------------------------------


def _run_key(model: "RetrievalModel", data: CaptionedSet, config: Config) -> str:
    """What decides the run: the base weights, the set, the settings (a resume must match)."""
    h = hashlib.sha256()
    h.update(model.fingerprint.encode())
    h.update(json.dumps([str(p) for p in data.images]).encode())
    h.update(json.dumps(data.texts).encode())
    h.update(data.text_image.tobytes())
    h.update(json.dumps({k: v for k, v in asdict(config).items() if k != "checkpoint_every"}, sort_keys=True).encode())
    return h.hexdigest()[:16]


def check_out(out: Path) -> None:
    """FinetuneError where OUT cannot take a run: a file, a finished model, a folder with
    other things in it (an interrupted run is fine: it resumes)."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"--out {out} is a file: name a new folder")
    if (out / REPORT).exists():
        raise FinetuneError(f"--out {out} already holds a fine-tuned model: name a new folder")
    if out.is_dir() and not (out / WORK).is_dir() and any(out.iterdir()):
        raise FinetuneError(f"--out {out} is not empty: name a new or empty folder")


def _claim(out: Path, work: Path, key: str) -> None:
    """OUT must be new, empty, or hold an interrupted run of the same key."""
    check_out(out)
    if work.is_dir():
        try:
            had = json.loads((work / "run.json").read_text())["key"]
        except (OSError, ValueError, KeyError):
            had = None
        if had != key:
            raise FinetuneError(
                f"--out {out} holds an interrupted fine-tune of another model, set or settings: run that command "
                f"again to finish it, or delete {work} to start over"
            )
        return
    work.mkdir(parents=True)
    write_json(work / "run.json", {"key": key})


def _save_checkpoint(work: Path, key: str, step: int, m, temp, opt, before: dict) -> None:
    import torch

    weights = {n: p.detach().cpu() for n, p in m.named_parameters() if not n.startswith("vision_model.")}
    tmp = work / "checkpoint.pt.tmp"
    torch.save({"key": key, "step": step, "weights": weights, "temp": float(temp.detach()), "optimizer": opt.state_dict(), "before": before}, tmp)
    os.replace(tmp, work / "checkpoint.pt")


def _load_checkpoint(work: Path) -> dict | None:
    import torch

    path = work / "checkpoint.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception:  # noqa: BLE001 - a damaged checkpoint: start the training again
        return None


def _save_model(model: "RetrievalModel", out: Path, work: Path, report: Report) -> None:
    """The fine-tuned model into OUT: written whole in the work folder first, then moved in;
    the report last (its presence says the folder is complete)."""
    final = work / "final"
    shutil.rmtree(final, ignore_errors=True)
    model.model.save_pretrained(final)
    if model.processor is not None:
        model.processor.save_pretrained(final)
    else:
        model.image_processor.save_pretrained(final)
        model.tokenizer.save_pretrained(final)
    for item in final.iterdir():
        os.replace(item, out / item.name)
    write_json(out / REPORT, asdict(report))
    shutil.rmtree(work, ignore_errors=True)
