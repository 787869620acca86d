"""`searchengine finetune`: BLIP-2's retrieval objectives on a user's captioned photos.

What BLIP-2's first stage trains for retrieval, on a checkpoint that already has it: the
Q-Former, its query tokens, its word embeddings and both projections and the ITM head; and,
with `--train-vision N`, the ViT's last N blocks at layer-wise decayed rates (`vision.py`).
The rest of the ViT stays frozen, so its outputs are computed once and kept on disk for the run
(`ViTCache`). The losses and the optimizer: `training.py`.

The run:
1. the frozen part's outputs of the training images into the cache (resumable);
2. the held-out split embedded and measured with `eval`'s code ("before");
3. with `--lr auto` (the default), the peak learning rate chosen by a short sweep measured on
   the held-out split (`lr_sweep.py`);
4. training, the held-out text->image ITC recall measured after each epoch: the best epoch's
   weights are kept (the base model's, where no epoch beats it), and training stops when
   `patience` epochs in a row have not beaten it;
5. the kept weights measured with `eval`'s code ("after") and written out.

The run checkpoints into `OUT/.finetune/` every so many steps and on Ctrl-C: the same command
resumes it, and a resumed run trains exactly as an uninterrupted one (each step's data order,
negatives and dropout come from the seed and the step alone). The result is a `save_pretrained`
folder (model, image processor, tokenizer) that `index --model OUT` loads like any checkpoint,
with `finetune.json` (the before/after recalls, the chosen learning rate, each epoch's recall
and the settings) beside it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from searchengine.errors import Diverged, FinetuneError
from searchengine.util.durable import write_json
from searchengine.config.settings import Settings
from searchengine.tuning import evaluation, lr_sweep
from searchengine.tuning.datasets import CaptionedSet
from searchengine.tuning.training import Schedule, Trainer
from searchengine.tuning.vit_cache import Batches, ViTCache
from searchengine.tuning.vision import VisionSplit

if TYPE_CHECKING:
    import torch

    from searchengine.models.retrieval import RetrievalModel

WORK = ".finetune"  # inside OUT: the ViT caches and the checkpoint, removed when done
REPORT = "finetune.json"
AUTO = "auto"


@dataclass(frozen=True)
class Config:
    epochs: int = 20  # at most: training stops when the held-out recall stops improving
    batch_size: int = 16
    lr: float | str = AUTO  # a peak rate, or chosen by a sweep (LAVIS fine-tunes the real model at 1e-5)
    weight_decay: float = 0.05
    warmup: float = 0.1  # share of the steps
    hard_from: float = 0.3  # share of the steps on random negatives; hard ones then ramp in as long again
    held_out: float = 0.1  # share of the images measured, never trained on
    seed: int = 0
    k_test: int = 20
    checkpoint_every: int = 200  # steps
    label_smoothing: float = 0.1
    temp_init: float = 0.07
    train_vision: int = 0  # the ViT's last blocks trained
    layer_decay: float = 0.95  # each ViT block's rate against the one above it (LAVIS, EVA)
    patience: int = 3  # epochs without a better held-out R@1 before training stops

    def schedule(self, lr: float, total: int) -> Schedule:
        return Schedule(lr=lr, total=total, warmup=self.warmup, hard_from=self.hard_from)


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


@dataclass
class Epoch:
    """What the epoch callback is told when an epoch has been measured."""

    epoch: int
    epochs: int
    recalls: dict[str, float]  # held-out text->image ITC recalls after it
    best_epoch: int  # 0: the base model
    stopping: bool  # patience ran out: this was the last epoch


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Report:
    base: str
    out: str
    train_images: int
    train_captions: int
    held_out_images: int
    held_out_captions: int
    steps: int  # taken, over all the run's sessions (fewer than planned where it stopped early)
    pairs_per_s: float  # image-caption pairs trained per second (the ViT cached), this session
    before: dict
    after: dict
    config: dict
    skipped: dict
    lr: float = 0.0  # the peak learning rate trained with
    lr_trials: list = field(default_factory=list)  # [{"lr", "recalls"}] where --lr auto chose it
    best_epoch: int = 0  # whose weights were kept (0: the base model's)
    epochs_run: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)  # [{"epoch", "recalls"}]: held-out text->image ITC after each

    def table(self) -> str:
        k = self.config["k_test"]
        return evaluation.format_rows([
            ("before: ITC", self.before["itc"]), (f"before: ITC + ITM (top {k})", self.before["itm"]),
            ("after: ITC", self.after["itc"]), (f"after: ITC + ITM (top {k})", self.after["itm"]),
        ])


@dataclass
class Held:
    """The held-out split: as `eval` embedded it, and its outputs of the ViT's frozen part."""

    emb: evaluation.Embedded
    frozen: "torch.Tensor"

    def itc(self, model: "RetrievalModel", split: VisionSplit, settings: Settings) -> dict[str, float]:
        """Text->image ITC recalls with the weights as they are now."""
        import torch

        model.model.eval()
        batch = evaluation.batch_size(model, settings)
        with torch.inference_mode():
            vit = torch.cat([split.tail(self.frozen[s:s + batch].to(model.device, torch.float32)).cpu()
                             for s in range(0, len(self.frozen), batch)])
        return evaluation.itc_recalls(evaluation.from_vit(model, self.emb, settings, vit))["text_to_image"]


def run(
    model: "RetrievalModel", data: CaptionedSet, out: Path, config: Config, settings: Settings, *,
    on_stage: Callable[[str, int], Callable[[int], None]] = lambda what, total: (lambda n: None),
    on_step: Callable[[Step], None] = lambda s: None,
    on_note: Callable[[str], None] = lambda message: None,
    on_epoch: Callable[[Epoch], None] = lambda e: None,
) -> Report:
    """Fine-tune `model` (loaded in float32) on `data`, into `out`. `on_stage(what, total)`
    names each stage and returns its progress callback; `on_step` hears every training step,
    `on_epoch` every epoch's held-out recall; `on_note` is told, in words, what a resumed run
    takes from the one before and which learning rate was chosen."""
    out = Path(out).expanduser()
    work = out / WORK
    split = VisionSplit(model, config.train_vision)  # refused before OUT is claimed
    key = _run_key(model, data, config)
    _claim(out, work, key)
    train, held = data.split(config.held_out, config.seed)
    cache = ViTCache(work, len(train.images), model.vit_shape)
    if 0 < cache.done < cache.n:
        on_note(f"the ViT outputs of {cache.done} of {cache.n} training images were computed before: going on from there")
    cache.fill(model, split.frozen, train.images, settings, on_stage("computing ViT outputs", len(train.images)))
    rows = np.array([i for i in range(len(train.images)) if i not in cache.bad], np.int64)
    train = train.without(cache.bad) if cache.bad else train
    held = _held(model, split, held, work, settings, on_stage)
    if len(train) < 2 or not held.emb.data.texts:
        raise FinetuneError(f"too few readable images to train and measure: {len(train)} to train on, {len(held.emb.data)} held out")
    state = _load_checkpoint(work)
    before = state["before"] if state else _measure(model, held.emb, config, on_stage, "measuring before")
    batches = Batches(cache, rows, train, min(config.batch_size, len(train)), config.seed, model.device)
    total = batches.per_epoch * config.epochs
    base = {n: p.detach().cpu().clone() for n, p in model.model.named_parameters() if split.is_trained(n)}
    lr, trials = _learning_rate(model, split, batches, held, config, settings, work, base, total, on_stage, on_note)
    trainer = Trainer(model, split, config.schedule(lr, total), weight_decay=config.weight_decay, layer_decay=config.layer_decay,
                      temp_init=config.temp_init, smoothing=config.label_smoothing, seed=config.seed)
    progress = _Progress(config, total, batches.per_epoch, on_step, on_epoch)
    if state:
        trainer.load(state)
        on_note(f"resuming from step {state['step']} of {total} (epoch {state['step'] // batches.per_epoch + 1} of {config.epochs}), saved in {work}")
    else:
        state = {"step": 0, "history": [], "best": {"epoch": 0, "recalls": held.itc(model, split, settings), "weights": base}}
    fit = _Fit(trainer, batches, held, settings, work, key, before, lr, trials)
    fit.train(state, total, on_stage("fine-tuning", total), progress)
    if fit.diverged is not None:
        on_note(f"the loss stopped being a number at step {fit.diverged}: training stopped there; "
                f"the best epoch's weights are kept (try a lower --lr)")
    model.model.load_state_dict(fit.best["weights"], strict=False)
    model.model.eval()
    after = (_measure(model, evaluation.from_vit(model, held.emb, settings), config, on_stage, "measuring after") if not split.trained
             else _measure(model, evaluation.embed(model, held.emb.data, settings), config, on_stage, "measuring after"))
    report = Report(
        base=model.name, out=str(out), train_images=len(train), train_captions=len(train.texts),
        held_out_images=len(held.emb.data), held_out_captions=len(held.emb.data.texts), steps=fit.step,
        pairs_per_s=progress.pairs_per_s(batches.batch), before=before, after=after, config=asdict(config),
        skipped=dict(train.skipped + (held.emb.data.skipped - data.skipped)),  # each part counts the set's own skips, and its unreadable images
        lr=lr, lr_trials=trials, best_epoch=fit.best["epoch"], epochs_run=len(fit.history),
        stopped_early=fit.step < total, history=fit.history,
    )
    _save_model(model, out, work, report)
    return report


def _held(model: "RetrievalModel", split: VisionSplit, held: CaptionedSet, work: Path, settings: Settings, on_stage) -> Held:
    """The held-out images as `eval` embeds them, and their outputs of the frozen part (the
    ViT outputs `eval` kept, where the whole ViT is frozen; else a cache of their own)."""
    emb = evaluation.embed(model, held, settings, keep_raw=True, progress=on_stage("embedding the held-out images", len(held)))
    if not split.trained:
        return Held(emb, emb.raw_vit)
    cache = ViTCache(work, len(emb.data.images), model.vit_shape, name="held")
    cache.fill(model, split.frozen, emb.data.images, settings, on_stage("computing the held-out images' ViT outputs", len(emb.data)))
    if cache.bad:  # read once, unreadable the next time
        raise FinetuneError(f"a held-out image changed while it was read: {next(iter(cache.bad.values()))}")
    return Held(emb, cache.rows(np.arange(cache.n)).half())  # as cached: half the memory


def _measure(model: "RetrievalModel", emb: evaluation.Embedded, config: Config, on_stage, what: str) -> dict:
    model.model.eval()
    return evaluation.in_memory(model, emb, config.k_test, progress=on_stage(what, len(emb.data.texts) + len(emb.data)))


def _learning_rate(model, split, batches: Batches, held: Held, config: Config, settings, work: Path, base: dict,
                   total: int, on_stage, on_note) -> tuple[float, list]:
    """The peak rate: the one asked for, or the sweep's choice (kept in the work folder, so a
    resumed run does not sweep again). The trials train with the whole ViT frozen, on the
    cached outputs passed through the blocks `split` would train: a trial step is then the
    frozen one's cost (2.2x less with two ViT-g blocks), and trained ViT blocks follow the
    chosen rate through their layer decay. Short trials that train the ViT too undervalue it:
    its held-out recall rises later in a run (measured: issue 33's note)."""
    if config.lr != AUTO:
        return float(config.lr), []
    saved = work / "lr.json"
    try:
        chosen = json.loads(saved.read_text())
        on_note(f"learning rate {lr_sweep.describe(chosen['lr'])}, chosen before")
        return chosen["lr"], chosen["trials"]
    except (OSError, ValueError, KeyError):
        pass
    steps = lr_sweep.trial_steps(total)
    progress = on_stage("choosing the learning rate", steps * len(lr_sweep.CANDIDATES))

    def trial(lr: float) -> dict[str, float]:
        import torch

        trainer = Trainer(model, VisionSplit(model, 0), config.schedule(lr, steps), weight_decay=config.weight_decay,
                          layer_decay=config.layer_decay, temp_init=config.temp_init, smoothing=config.label_smoothing, seed=config.seed)
        try:
            for step in range(steps):
                cached, texts, rng = batches.at(step)
                with torch.no_grad():
                    vit = split.tail(cached)
                trainer.step(step, vit, texts, rng)
                progress(1)
            recalls = held.itc(model, split, settings)
        except Diverged:  # the worst a trial can do
            recalls = {**{f"R@{k}": 0.0 for k in evaluation.KS}, "mean": 0.0}
            progress(steps - step)
        model.model.load_state_dict(base, strict=False)
        return recalls

    lr, trials = lr_sweep.choose(trial, on_trial=lambda t: on_note(
        f"learning rate {lr_sweep.describe(t.lr)}: held-out R@1 {t.recalls['R@1']:.1f} after {steps} steps"))
    kept = [{"lr": t.lr, "recalls": t.recalls} for t in trials]
    on_note(f"learning rate {lr_sweep.describe(lr)}: the best of {len(trials)} tried on the held-out split")
    write_json(saved, {"lr": lr, "trials": kept})
    return lr, kept


class _Progress:
    """Tells the callbacks of each step and epoch; counts this session's rate."""

    def __init__(self, config: Config, total: int, per_epoch: int, on_step, on_epoch) -> None:
        self.config, self.total, self.per_epoch = config, total, per_epoch
        self.on_step, self.on_epoch = on_step, on_epoch
        self.seconds, self.steps = 0.0, 0

    def step(self, step: int, losses, seconds: float) -> None:
        self.seconds += seconds
        self.steps += 1
        self.on_step(Step(step, self.total, losses.itc, losses.itm, losses.hard, epoch=(step - 1) // self.per_epoch + 1,
                          epochs=self.config.epochs, seconds=seconds))

    def epoch(self, epoch: int, recalls: dict, best_epoch: int, stopping: bool) -> None:
        self.on_epoch(Epoch(epoch, self.config.epochs, recalls, best_epoch, stopping))

    def pairs_per_s(self, batch: int) -> float:
        return round(self.steps * batch / self.seconds, 2) if self.seconds else 0.0


class _Fit:
    """The training loop: steps, each epoch measured, the best weights kept, patience."""

    def __init__(self, trainer: Trainer, batches: Batches, held: Held, settings: Settings, work: Path, key: str,
                 before: dict, lr: float, trials: list) -> None:
        self.trainer, self.batches, self.held, self.settings = trainer, batches, held, settings
        self.work, self.key, self.kept = work, key, {"before": before, "lr": lr, "trials": trials}
        self.step, self.history, self.best = 0, [], {}
        self.diverged: int | None = None  # the step whose loss was not a number, where one was

    def train(self, state: dict, total: int, bar: Callable[[int], None], progress: _Progress) -> None:
        config = progress.config
        self.step, self.history, self.best = state["step"], state["history"], state["best"]
        start, busy = self.step, False
        bar(self.step)
        try:
            while True:
                if self.step // self.batches.per_epoch > len(self.history):  # an epoch ended: measure it
                    epoch = len(self.history) + 1
                    recalls = self.held.itc(self.trainer.model, self.trainer.split, self.settings)
                    self.history.append({"epoch": epoch, "recalls": recalls})
                    if (recalls["R@1"], recalls["mean"]) > (self.best["recalls"]["R@1"], self.best["recalls"]["mean"]):
                        self.best = {"epoch": epoch, "recalls": recalls, "weights": self.trainer.weights()}
                    stopping = epoch - self.best["epoch"] >= config.patience and self.step < total
                    progress.epoch(epoch, recalls, self.best["epoch"], stopping)
                    if stopping:
                        break
                    continue
                if self.step >= total:
                    break
                t0 = time.perf_counter()
                busy = True  # weights and step disagree until the step is counted
                try:
                    losses = self.trainer.step(self.step, *self.batches.at(self.step))
                except Diverged:
                    busy, self.diverged = False, self.step + 1
                    break
                self.step += 1
                busy = False
                bar(1)
                progress.step(self.step, losses, time.perf_counter() - t0)
                if self.step % config.checkpoint_every == 0 and self.step < total:
                    self.save()
        except BaseException:  # Ctrl-C, or anything: what was trained is kept for the next run
            if not busy and self.step > start:
                self.save()
            raise

    def save(self) -> None:
        import torch

        tmp = self.work / "checkpoint.pt.tmp"
        torch.save({"key": self.key, "step": self.step, "history": self.history, "best": self.best, **self.kept,
                    **self.trainer.state()}, tmp)
        os.replace(tmp, self.work / "checkpoint.pt")


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
