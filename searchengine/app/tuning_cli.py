"""The commands about models rather than photos: `eval` (how well a model retrieves a
captioned set) and `finetune` (make it better at one). `cli` registers them next to the
others."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

EXAMPLES = {
    "eval": """\
examples:
  searchengine eval ~/datasets/catalogue               captions.jsonl in that folder: {"image": ..., "caption": ...}
  searchengine eval dataset_flickr30k.json --images ~/flickr30k-images --k-test 128
  searchengine eval DATA --model DIR --json            another model (a fine-tuned one), as JSON""",
    "finetune": """\
examples:
  searchengine finetune ~/datasets/catalogue --out ~/models/catalogue-blip2
  searchengine finetune DATA --out DIR --epochs 10 --lr 2e-5     (run it again after Ctrl-C: it resumes)
  searchengine finetune DATA --out DIR --train-vision 2           photos that look unlike the model's: train the ViT's top too
  searchengine index ~/Pictures --model ~/models/catalogue-blip2 --data-dir ~/.local/share/searchengine-catalogue""",
}


def add_parsers(command, common) -> None:
    """Add the commands through `command(name, help, description)` (see `cli.build_parser`)."""
    p = command(
        "eval", "measure retrieval recall on a captioned image set",
        "Text->image and image->text Recall@1/5/10 on a captioned set, by the BLIP-2 paper's protocol: ITC "
        "candidates re-ranked by ITM, score ITM + ITC; and ITC alone. Measured twice: in memory, as LAVIS does, "
        "and through the product's own indexing and search (text->image) in a temporary index. The library "
        "in --data-dir is not touched (its model is the default one).",
    )
    p.add_argument("data", metavar="DATA", help="a captions file (JSON lines, or Karpathy's COCO/Flickr30k JSON) or its folder")
    p.add_argument("--images", metavar="DIR", help="where the images are (default: the captions file's folder)")
    p.add_argument("--split", help="only this split (Karpathy files: test by default; JSON lines: their \"split\" field)")
    p.add_argument("--k-test", type=int, metavar="K", help="ITC candidates ITM re-ranks (default: rerank_top, 20; the paper: 128)")
    p.add_argument("--only", choices=["memory", "search"], help="run one of the two measurements")
    p.add_argument("--batch-size", type=int, help="images per model batch (default: 8 on a CPU, 64 on a GPU)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    common(p, model=True)

    from searchengine.tuning.finetune import Config

    d = Config()
    p = command(
        "finetune", "fine-tune the retrieval model on captioned images",
        "Train the Q-Former, its query tokens and projections and the ITM head (and with --train-vision the "
        "ViT's last blocks; the frozen part's outputs are computed once) with BLIP-2's ITC and ITM objectives "
        "on a captioned set; measure a held-out split before and after, as `eval` does, and after each epoch "
        "(the best epoch is kept); write a model folder that `index --model` loads. Interrupted, the same "
        "command resumes from the last checkpoint.",
    )
    p.add_argument("data", metavar="DATA", help="a captions file (JSON lines, or Karpathy's COCO/Flickr30k JSON) or its folder")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write the fine-tuned model (a new or empty folder)")
    p.add_argument("--images", metavar="DIR", help="where the images are (default: the captions file's folder)")
    p.add_argument("--split", help="only this split (Karpathy files: train by default)")
    p.add_argument("--epochs", type=int, default=d.epochs, help=f"passes over the training images, at most: training stops when the held-out R@1 stops improving (default: {d.epochs})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"images per step, one caption each (default: {d.batch_size})")
    p.add_argument("--lr", type=learning_rate, default=d.lr,
                   help="peak learning rate, or auto: the best of a short sweep measured on the held-out split (default: auto)")
    p.add_argument("--train-vision", type=int, default=d.train_vision, metavar="N",
                   help=f"also train the ViT's last N blocks, at layer-wise decayed rates; 0 keeps it frozen (default: {d.train_vision})")
    p.add_argument("--layer-decay", type=float, default=d.layer_decay,
                   help=f"with --train-vision: each ViT block's rate against the one above (default: {d.layer_decay})")
    p.add_argument("--patience", type=int, default=d.patience,
                   help=f"stop after this many epochs without a better held-out R@1; the best epoch's weights are kept (default: {d.patience})")
    p.add_argument("--held-out", type=float, default=d.held_out, help=f"share of the images measured and never trained on (default: {d.held_out})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"decides the split, the order and the negatives (default: {d.seed})")
    p.add_argument("--k-test", type=int, default=d.k_test, help=f"ITC candidates ITM re-ranks when measuring (default: {d.k_test})")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, help=f"steps between checkpoints (default: {d.checkpoint_every})")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    common(p, model=True)


def learning_rate(text: str) -> float | str:
    """--lr: a number above 0, or auto."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor auto") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0, or auto; got {text}")
    return value


def _stages(bar):
    """`stage(what, total)` -> a progress callback: one bar, named and reset for each stage."""

    def stage(what: str, total: int):
        bar.set_description(what)
        bar.reset(total=total)
        return bar.update

    return stage


class TrainingLog:
    """Training progress: the bar's losses in a terminal (tqdm shows the rate and the time
    left); elsewhere (a log file, a pipe: the bar is off) a line at each epoch's end and at
    least every `every_s` seconds, with the losses, the rate and the time left. The rate is
    this run's own, so a resumed run does not count the steps it found done."""

    def __init__(self, bar, err, every_s: float = 30.0) -> None:
        self.bar, self.err, self.every_s = bar, err, every_s
        self.steps = 0  # taken in this run
        self.seconds = 0.0
        self.last_line = float("-inf")

    def step(self, s) -> None:
        self.steps += 1
        self.seconds += s.seconds
        self.bar.set_postfix(itc=f"{s.loss_itc:.3f}", itm=f"{s.loss_itm:.3f}", hard=f"{s.hard:.2f}", refresh=False)
        if not self.bar.disable:
            return
        now = time.monotonic()
        end_of_epoch = s.step % max(1, s.total // s.epochs) == 0
        if not end_of_epoch and now - self.last_line < self.every_s:
            return
        self.last_line = now
        rate = self.steps / self.seconds if self.seconds > 0 else 0.0
        left = f", {duration((s.total - s.step) / rate)} left" if rate > 0 and s.step < s.total else ""
        print(f"step {s.step}/{s.total} (epoch {s.epoch}/{s.epochs}): loss itc {s.loss_itc:.3f}, itm {s.loss_itm:.3f}; "
              f"{rate:.2f} steps/s{left}", file=self.err, flush=True)

    def epoch(self, e) -> None:
        """Each epoch's held-out recall, in a terminal above the bar too."""
        best = "the best so far" if e.best_epoch == e.epoch else (
            f"best: epoch {e.best_epoch}" if e.best_epoch else "no better than before training")
        line = f"epoch {e.epoch}/{e.epochs}: held-out R@1 {e.recalls['R@1']:.1f} (text->image, ITC; {best})"
        if e.stopping:
            line += f"; stopping: no better R@1 for {e.epoch - e.best_epoch} epochs"
        if self.bar.disable:
            print(line, file=self.err, flush=True)
        else:
            self.bar.write(line, file=self.err)


def duration(seconds: float) -> str:
    """under 1 s, 12 s, 4 min 05 s, 2 h 07 min."""
    if seconds < 0.5:
        return "under 1 s"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def cmd_eval(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.app import wiring
    from searchengine.config.settings import settings_from_args
    from searchengine.errors import SearchEngineError
    from searchengine.library import Library
    from searchengine.tuning import datasets
    from searchengine.tuning import evaluation

    settings = settings_from_args(args)
    k_test = args.k_test if args.k_test is not None else settings.rerank_top
    if k_test < 1:
        raise SearchEngineError("--k-test must be at least 1")
    data = datasets.load(Path(args.data), images=Path(args.images) if args.images else None, split=args.split)
    for message in data.messages:
        print(f"skipping {message}", file=err)
    name = wiring.retrieval_model(settings, Library.recorded(settings))
    model = wiring.load_model(settings, name)
    bar = tqdm(total=len(data), unit="img", file=err, disable=None, dynamic_ncols=True)
    stage = _stages(bar)

    report: dict = {"model": name, "k_test": k_test}
    try:
        if args.only != "search":
            emb = evaluation.embed(model, data, settings, progress=stage("embedding images", len(data)))
            data = emb.data
            report["memory"] = evaluation.in_memory(
                model, emb, k_test, progress=stage("ranking in memory", len(data.texts) + len(data)),
            )
            del emb
        if args.only != "memory":
            progress = stage("indexing", len(data))
            report["search"] = evaluation.through_search(
                model, data, settings, k_test, progress=progress,
                on_indexed=lambda: stage("searching", len(data.texts)),
            )
    finally:
        bar.close()
    report["data"] = {
        "source": str(data.source), "images": len(data), "captions": len(data.texts), "skipped": dict(data.skipped),
    }
    if args.json:
        print(json.dumps(report, indent=2), file=out)
    else:
        print(f"{data.summary()}; model {name}", file=out)
        print(evaluation.table(report), file=out)
    return 0


def cmd_finetune(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.app import wiring
    from searchengine.config.settings import settings_from_args
    from searchengine.errors import SearchEngineError
    from searchengine.library import Library
    from searchengine.tuning import datasets
    from searchengine.tuning import finetune

    settings = settings_from_args(args)
    for name, value, low in (("--epochs", args.epochs, 1), ("--batch-size", args.batch_size, 2), ("--k-test", args.k_test, 1),
                             ("--checkpoint-every", args.checkpoint_every, 1)):
        if value < low:
            raise SearchEngineError(f"{name} must be at least {low}")
    if args.train_vision < 0 or args.patience < 1:
        raise SearchEngineError("--train-vision must be 0 or more, and --patience at least 1")
    if not 0 < args.held_out < 1 or not 0 < args.layer_decay <= 1:
        raise SearchEngineError("--held-out must be between 0 and 1, and --layer-decay above 0 and at most 1")
    config = finetune.Config(
        epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, held_out=args.held_out, seed=args.seed,
        k_test=args.k_test, checkpoint_every=args.checkpoint_every, train_vision=args.train_vision,
        layer_decay=args.layer_decay, patience=args.patience,
    )
    data = datasets.load(Path(args.data), images=Path(args.images) if args.images else None, split=args.split, default_split="train")
    for message in data.messages:
        print(f"skipping {message}", file=err)
    finetune.check_out(Path(args.out))  # before the model loads
    name = wiring.retrieval_model(settings, Library.recorded(settings))
    model = wiring.load_model(settings.model_copy(update={"dtype": "float32"}), name)  # trained in float32
    bar = tqdm(total=0, file=err, disable=None, dynamic_ncols=True)
    stage = _stages(bar)

    log = TrainingLog(bar, err)
    try:
        report = finetune.run(
            model, data, Path(args.out), config, settings, on_stage=stage, on_step=log.step, on_epoch=log.epoch,
            on_note=lambda message: bar.write(message, file=err),
        )
    except KeyboardInterrupt:
        bar.close()
        print(f"interrupted: what was trained is kept in {Path(args.out) / finetune.WORK}; the same command resumes it", file=err)
        raise
    finally:
        bar.close()
    if args.json:
        from dataclasses import asdict

        print(json.dumps(asdict(report), indent=2), file=out)
        return 0
    print(
        f"trained on {report.train_images} images ({report.train_captions} captions), {report.steps} steps, "
        f"{report.pairs_per_s:.1f} pairs/s; held out: {report.held_out_images} images ({report.held_out_captions} captions)",
        file=out,
    )
    chosen = "chosen by the sweep" if report.lr_trials else "as asked"
    vision = f"the ViT's last {config.train_vision} blocks trained" if config.train_vision else "the ViT frozen"
    kept = f"epoch {report.best_epoch}'s weights kept" if report.best_epoch else "no epoch beat the base model: its weights kept"
    stopped = f", stopped early after {report.epochs_run} of {config.epochs} epochs" if report.stopped_early else ""
    print(f"learning rate {report.lr:.0e} ({chosen}), {vision}; {kept}{stopped}", file=out)
    print(report.table(), file=out)
    print(f"wrote {report.out}; index with it: searchengine index FOLDER --model {report.out} --data-dir NEW_DIR", file=out)
    return 0


COMMANDS = {"eval": cmd_eval, "finetune": cmd_finetune}
