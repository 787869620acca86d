"""`searchengine finetune` (issue 15): a measurable gain on a domain the model has not seen,
a resumed run that trains exactly as an uninterrupted one, an output `index --model` loads,
and what it refuses."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from searchengine.models.retrieval import RetrievalModel
from searchengine.config.settings import Settings
from searchengine.tuning import datasets
from searchengine.tuning import finetune
from searchengine.tuning.finetune import Config, FinetuneError
from tests.trained import COLOURS

# The colour model (tests/trained.py) learned red, green, blue and yellow from plain noisy
# squares. The new domain: other colours, named by words it was never trained on.
NEW = {"orange": (245, 140, 20), "pink": (250, 150, 200), "purple": (140, 40, 180), "white": (235, 235, 235),
       "black": (20, 20, 20), "brown": (120, 70, 30), "grey": (128, 128, 128)}


def new_domain(folder, per_colour: int = 10, seed: int = 0):
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(per_colour):
        for name, rgb in NEW.items():
            pixels = np.clip(np.array(rgb, float) + rng.normal(0, 20, (48, 48, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}-{n}.png")
            lines += [json.dumps({"image": f"{name}-{n}.png", "caption": t.format(c=name)}) for t in ("a {c} photo", "{c} picture")]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def load(model_dir) -> RetrievalModel:
    return RetrievalModel.load(str(model_dir), device="cpu", dtype="float32")


def settings_for(tmp_path, batch_size: int = 8) -> Settings:
    return Settings(data_dir=tmp_path / "unused", device="cpu", dtype="float32", batch_size=batch_size)


FAST = Config(epochs=12, batch_size=8, lr=1e-3, held_out=0.2, seed=0, k_test=10, warmup=0.1, patience=12)


@pytest.mark.slow  # a whole training run, 10 s
def test_fine_tuning_gains_ten_points_of_recall_on_a_new_domain(tmp_path, colour_model_dir):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set"))
    out = tmp_path / "tuned"
    steps = []
    report = finetune.run(load(colour_model_dir), data, out, FAST, settings_for(tmp_path), on_step=steps.append)
    before, after = report.before, report.after
    print(json.dumps({"before": before, "after": after, "pairs_per_s": report.pairs_per_s}))
    gain = after["itc"]["text_to_image"]["R@1"] - before["itc"]["text_to_image"]["R@1"]
    assert gain >= 10, (before, after)
    assert after["itm"]["text_to_image"]["R@1"] - before["itm"]["text_to_image"]["R@1"] >= 10, (before, after)
    assert (report.train_images, report.held_out_images) == (56, 14)
    assert len(steps) == report.steps == 12 * 7
    assert steps[0].hard == 0.0 and steps[-1].hard == 1.0  # random negatives first, then hard ones
    # The output is a checkpoint like any other: loaded by path, it measures what the run did.
    assert not (out / finetune.WORK).exists()
    saved = json.loads((out / finetune.REPORT).read_text())
    assert saved["after"] == after
    tuned = load(out)
    assert tuned.fingerprint != load(colour_model_dir).fingerprint
    from searchengine.tuning import evaluation

    train, held = data.split(FAST.held_out, FAST.seed)
    again = evaluation.in_memory(tuned, evaluation.embed(tuned, held, settings_for(tmp_path)), FAST.k_test)
    assert again == after


@pytest.mark.slow  # whole training runs, interrupted and resumed
@pytest.mark.parametrize("train_vision", [0, 1])
def test_an_interrupted_run_resumes_and_trains_as_one_run(tmp_path, colour_model_dir, train_vision):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=3))
    config = Config(epochs=3, batch_size=4, lr=1e-3, held_out=0.25, seed=1, k_test=5, checkpoint_every=2,
                    train_vision=train_vision, patience=3)
    finetune.run(load(colour_model_dir), data, tmp_path / "whole", config, settings_for(tmp_path))

    class Stop(Exception):
        pass

    def stop_at_5(step):
        if step.step == 5:
            raise Stop

    with pytest.raises(Stop):
        finetune.run(load(colour_model_dir), data, tmp_path / "halves", config, settings_for(tmp_path), on_step=stop_at_5)
    saved = torch.load(tmp_path / "halves" / finetune.WORK / "checkpoint.pt", weights_only=False)
    assert saved["step"] == 5  # kept when it stopped, not only at the last checkpoint (4)
    seen, notes = [], []
    finetune.run(load(colour_model_dir), data, tmp_path / "halves", config, settings_for(tmp_path),
                 on_step=lambda s: seen.append(s.step), on_note=notes.append)
    assert seen[0] == 6
    # It says so (it was silent): from which step, and where that was kept.
    train, _ = data.split(config.held_out, config.seed)
    total = len(train) // 4 * 3
    assert seen[-1] == total
    assert notes == [f"resuming from step 5 of {total} (epoch {5 // (total // 3) + 1} of 3), saved in {tmp_path / 'halves' / finetune.WORK}"]
    whole = load(tmp_path / "whole").model.state_dict()
    halves = load(tmp_path / "halves").model.state_dict()
    assert whole.keys() == halves.keys()
    for name in whole:
        torch.testing.assert_close(halves[name], whole[name], rtol=0, atol=0, msg=name)
    assert json.loads((tmp_path / "halves" / finetune.REPORT).read_text())["after"] == json.loads((tmp_path / "whole" / finetune.REPORT).read_text())["after"]


def test_what_a_run_refuses(tmp_path, colour_model_dir):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=2))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    with pytest.raises(FinetuneError, match="not empty"):
        finetune.check_out(busy)
    with pytest.raises(FinetuneError, match="is a file"):
        finetune.check_out(busy / "notes.txt")
    config = Config(epochs=1, batch_size=4, lr=1e-3, held_out=0.25, k_test=5)
    done = tmp_path / "done"
    finetune.run(load(colour_model_dir), data, done, config, settings_for(tmp_path))
    with pytest.raises(FinetuneError, match="already holds a fine-tuned model"):
        finetune.check_out(done)
    # An interrupted run of other settings is not resumed with these.
    other = tmp_path / "other"
    (other / finetune.WORK).mkdir(parents=True)
    (other / finetune.WORK / "run.json").write_text(json.dumps({"key": "something else"}))
    with pytest.raises(FinetuneError, match="interrupted fine-tune of another"):
        finetune.run(load(colour_model_dir), data, other, config, settings_for(tmp_path))


def test_schedules():
    from searchengine.tuning.training import Schedule

    c = Schedule(lr=1.0, total=100, warmup=0.1, hard_from=0.3)
    lrs = [c.lr_at(s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001
    hard = [c.hard_share(s) for s in range(100)]
    assert hard[29] == 0.0 and hard[30] == 0.0 and hard[45] == pytest.approx(0.5) and hard[60] == 1.0 and hard[99] == 1.0


@pytest.mark.slow  # whole training runs, interrupted and resumed
def test_a_run_says_how_it_goes_and_what_it_resumes(tmp_path, colour_model_dir):
    """`finetune` was silent while it trained, in a log or a pipe. It now prints the losses,
    the rate and the time left at each epoch's end; an interrupted ViT pass goes on from
    where it stopped, and says so."""
    from tests.inprocess import run_cli

    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=3))
    config = Config(epochs=2, batch_size=4, lr=1e-3, held_out=0.25, seed=1, k_test=5)

    class Stop(Exception):
        pass

    def stage(what, total):
        calls = []

        def progress(n):
            calls.append(n)
            if what == "computing ViT outputs" and len(calls) == 2:  # one batch done
                raise Stop
        return progress

    with pytest.raises(Stop):
        finetune.run(load(colour_model_dir), data, tmp_path / "out", config, settings_for(tmp_path, batch_size=4), on_stage=stage)
    notes = []
    finetune.run(load(colour_model_dir), data, tmp_path / "out", config, settings_for(tmp_path, batch_size=4), on_note=notes.append)
    train, _ = data.split(config.held_out, config.seed)
    assert notes == [f"the ViT outputs of 4 of {len(train)} training images were computed before: going on from there"]

    proc = run_cli("finetune", tmp_path / "set", "--out", tmp_path / "cli", "--model", colour_model_dir, "--epochs", "3",
                   "--batch-size", "4", "--held-out", "0.25", "--lr", "1e-3", "--device", "cpu", "--data-dir", tmp_path / "d")
    assert proc.returncode == 0, proc.stderr
    import re

    lines = [line for line in proc.stderr.splitlines() if line.startswith("step ")]
    per_epoch = len(train) // 4
    # The first step (an early rate and time left), then each epoch's end.
    assert [line.split(" (")[0] for line in lines] == [f"step {s}/{per_epoch * 3}" for s in (1, per_epoch, 2 * per_epoch, 3 * per_epoch)], proc.stderr
    pattern = r"step \d+/\d+ \(epoch (\d)/3\): loss itc \d+\.\d{3}, itm \d+\.\d{3}; \d+\.\d\d steps/s(, .+ left)?$"
    for epoch, line in zip((1, 1, 2, 3), lines):
        m = re.match(pattern, line)
        assert m and int(m.group(1)) == epoch and (m.group(2) is None) == (line == lines[-1]), line
    # Each epoch's held-out recall, and what was kept.
    epochs = [line for line in proc.stderr.splitlines() if line.startswith("epoch ")]
    assert [line.split(":")[0] for line in epochs] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], proc.stderr
    assert all(re.match(r"epoch \d/3: held-out R@1 \d+\.\d \(text->image, ITC; .+\)$", line) for line in epochs), epochs
    report = json.loads((tmp_path / "cli" / finetune.REPORT).read_text())
    assert [h["epoch"] for h in report["history"]] == [1, 2, 3]
    kept = f"epoch {report['best_epoch']}'s weights kept" if report["best_epoch"] else "no epoch beat the base model"
    assert f"learning rate 1e-03 (as asked), the ViT frozen; {kept}" in proc.stdout, proc.stdout


def test_what_the_command_refuses_before_it_trains(tmp_path, colour_model_dir):
    from tests.inprocess import run_cli

    (tmp_path / "set").mkdir()
    new_domain(tmp_path / "set", per_colour=2)
    args = ("finetune", tmp_path / "set", "--out", tmp_path / "out", "--model", colour_model_dir, "--device", "cpu",
            "--data-dir", tmp_path / "d")
    for extra, says in ((["--lr", "fast"], "'fast' is neither a number nor auto"), (["--lr", "0"], "must be above 0, or auto"),
                        (["--patience", "0"], "--patience at least 1"), (["--layer-decay", "1.5"], "--layer-decay above 0"),
                        (["--train-vision", "3"], "--train-vision must be between 0 and 2, the ViT's blocks; got 3")):
        proc = run_cli(*args, *extra)
        assert proc.returncode != 0 and says in proc.stderr, (extra, proc.stderr)
        assert not (tmp_path / "out").exists(), extra  # nothing claimed


# -- the vision side (issue 33) ------------------------------------------------------------------


def test_the_vit_splits_where_training_starts_and_computes_the_same(colour_model_dir):
    from searchengine.tuning.vision import VisionSplit

    model = load(colour_model_dir)
    pixels = torch.rand(3, 3, model.image_size, model.image_size)
    whole = model.vit(pixels)
    for n in (0, 1, 2):
        split = VisionSplit(model, n)
        frozen = split.frozen(pixels)
        with torch.no_grad():
            torch.testing.assert_close(split.tail(frozen.clone()), whole, rtol=0, atol=0)
    with pytest.raises(FinetuneError, match="between 0 and 2"):
        VisionSplit(model, 3)
    # What trains, at which share of the rate: the top block at decay, the next at decay², the
    # layer norm after them at decay; the patch and position embeddings never.
    split = VisionSplit(model, 2)
    factors = {name: f for name, _, f in split.groups(0.5)}
    assert factors["vision_model.encoder.layers.1.mlp.fc1.weight"] == 0.5
    assert factors["vision_model.encoder.layers.0.self_attn.qkv.weight"] == 0.25
    assert factors["vision_model.post_layernorm.weight"] == 0.5
    assert factors["qformer.encoder.layer.0.attention.attention.query.weight"] == 1.0
    assert not any(name.startswith("vision_model.embeddings") for name in factors)
    assert not model.model.vision_model.embeddings.patch_embedding.weight.requires_grad
    one = {name for name, _, _ in VisionSplit(model, 1).groups(0.95) if name.startswith("vision_model.")}
    assert one and all(name.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm.")) for name in one)
    assert not model.model.vision_model.encoder.layers[0].mlp.fc1.weight.requires_grad


@pytest.mark.slow  # a whole training run, 5 s
def test_train_vision_trains_the_top_blocks_and_writes_them(tmp_path, colour_model_dir):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=4))
    config = Config(epochs=3, batch_size=4, lr=1e-3, held_out=0.25, k_test=5, train_vision=1, patience=3)
    report = finetune.run(load(colour_model_dir), data, tmp_path / "out", config, settings_for(tmp_path, batch_size=4))
    base, tuned = load(colour_model_dir).model.state_dict(), load(tmp_path / "out").model.state_dict()
    changed = {name for name in base if not torch.equal(base[name], tuned[name])}
    vision = {name for name in changed if name.startswith("vision_model.")}
    assert vision and all(name.startswith(("vision_model.encoder.layers.1.", "vision_model.post_layernorm.")) for name in vision), vision
    assert any(name.startswith("qformer.") for name in changed)
    # "after" is what `eval` measures on the written model: the held-out images through its new ViT.
    from searchengine.tuning import evaluation

    _, held = data.split(config.held_out, config.seed)
    tuned_model = load(tmp_path / "out")
    assert evaluation.in_memory(tuned_model, evaluation.embed(tuned_model, held, settings_for(tmp_path, batch_size=4)), 5) == report.after
    assert json.loads((tmp_path / "out" / finetune.REPORT).read_text())["config"]["train_vision"] == 1


@pytest.mark.slow  # a whole training run
def test_the_best_epoch_is_kept_and_training_stops_when_it_stops_improving(tmp_path, colour_model_dir):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=4))
    config = Config(epochs=10, batch_size=4, lr=3e-3, held_out=0.25, k_test=5, patience=1)
    epochs = []
    report = finetune.run(load(colour_model_dir), data, tmp_path / "out", config, settings_for(tmp_path, batch_size=4),
                          on_epoch=epochs.append)
    r1 = [h["recalls"]["R@1"] for h in report.history]
    print(json.dumps({"history": r1, "best": report.best_epoch}))
    assert report.stopped_early and report.epochs_run < 10, r1
    assert len(epochs) == report.epochs_run == len(r1) and epochs[-1].stopping and not any(e.stopping for e in epochs[:-1])
    assert report.epochs_run - report.best_epoch == 1  # patience 1: the first epoch that does not beat the best
    per_epoch = report.steps // report.epochs_run
    assert report.steps == per_epoch * report.epochs_run
    # The weights written are the best epoch's: "after" measures exactly what that epoch measured.
    best = report.history[report.best_epoch - 1]["recalls"] if report.best_epoch else report.before["itc"]["text_to_image"]
    assert report.after["itc"]["text_to_image"] == best
    assert all(h["recalls"]["R@1"] <= best["R@1"] for h in report.history)


def test_the_sweep_takes_the_best_mean_recall_then_r1_then_the_smaller_rate():
    from searchengine.tuning import lr_sweep

    measured = {1e-5: {"R@1": 10.0, "mean": 30.0}, 3e-5: {"R@1": 20.0, "mean": 40.0}, 1e-4: {"R@1": 30.0, "mean": 40.0},
                3e-4: {"R@1": 30.0, "mean": 40.0}, 1e-3: {"R@1": 40.0, "mean": 35.0}, 3e-3: {"R@1": 0.0, "mean": 5.0}}
    heard = []
    lr, trials = lr_sweep.choose(measured.__getitem__, on_trial=heard.append)
    assert lr == 1e-4 and [t.lr for t in trials] == sorted(measured) and heard == trials
    assert [lr_sweep.trial_steps(n) for n in (5, 40, 240, 5000)] == [5, 20, 48, 300]


# A visual shift: the colour model learned red, green, blue and yellow from saturated squares;
# these photos are washed out (a fifth of the colour's distance from mid-grey), in those four
# colours and seven it has no words for.
FADED = dict(COLOURS, **NEW)


def faded_set(folder, per_colour: int = 20, seed: int = 0):
    rng = np.random.default_rng(seed)
    lines = []
    for n in range(per_colour):
        for name, rgb in FADED.items():
            pixels = 128 + 0.2 * (np.array(rgb, float) - 128) + rng.normal(0, 10, (48, 48, 3))
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(folder / f"{name}-{n}.png")
            lines += [json.dumps({"image": f"{name}-{n}.png", "caption": t.format(c=name)}) for t in ("a {c} photo", "{c} picture")]
    (folder / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return folder


@pytest.mark.slow  # four whole runs with the default settings, a sweep each, 40 s
def test_the_defaults_gain_ten_points_on_photos_that_look_unlike_the_models_and_the_vit_gains_more(tmp_path, colour_model_dir):
    """On two sets of such photos: the defaults gain at least 10 points of held-out text->image
    R@1 on each, and training the ViT's two blocks gains more than keeping them frozen, over
    both, in the ranking search shows (ITC candidates re-ranked by ITM), and no less by ITC
    alone. Two sets, because one caption in 44 moves R@1 by 2.3 points; two held-out images
    of each colour share its captions, so 50 is the most R@1 can reach."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model's steps: one thread is twice as fast as two here
    try:
        _defaults_and_train_vision(tmp_path, colour_model_dir)
    finally:
        torch.set_num_threads(threads)


def _defaults_and_train_vision(tmp_path, colour_model_dir):
    from searchengine.tuning import lr_sweep

    gains: dict[tuple[int, str], float] = {}
    for seed in (0, 1):
        (tmp_path / f"set{seed}").mkdir()
        data = datasets.load(faded_set(tmp_path / f"set{seed}", seed=seed))
        for n in (0, 2):
            notes = []
            out = tmp_path / f"out{seed}-{n}"
            report = finetune.run(load(colour_model_dir), data, out, Config(train_vision=n), settings_for(tmp_path, batch_size=16),
                                  on_note=notes.append)
            for kind in ("itc", "itm"):
                gain = report.after[kind]["text_to_image"]["R@1"] - report.before[kind]["text_to_image"]["R@1"]
                gains[n, kind] = round(gains.get((n, kind), 0.0) + gain, 2)
                assert n or gain >= 10, (seed, kind, report.before, report.after)
            print(json.dumps({"set": seed, "train_vision": n, "lr": report.lr, "best_epoch": report.best_epoch,
                              **{k: [report.before[k]["text_to_image"]["R@1"], report.after[k]["text_to_image"]["R@1"]] for k in ("itc", "itm")},
                              "history": [h["recalls"]["R@1"] for h in report.history]}))
            # The chosen rate: one of the sweep's, said, and kept with the model.
            assert report.lr in lr_sweep.CANDIDATES and [t["lr"] for t in report.lr_trials] == sorted(lr_sweep.CANDIDATES)
            assert notes[-1] == f"learning rate {report.lr:.0e}: the best of {len(lr_sweep.CANDIDATES)} tried on the held-out split"
            assert json.loads((out / finetune.REPORT).read_text())["lr"] == report.lr
    assert gains[2, "itm"] > gains[0, "itm"] and gains[2, "itc"] >= gains[0, "itc"], gains


@pytest.mark.slow  # a sweep and a run, interrupted and resumed
def test_a_resumed_run_keeps_the_learning_rate_it_chose(tmp_path, colour_model_dir):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=3))
    config = Config(epochs=2, batch_size=4, held_out=0.25, k_test=5)  # --lr auto

    class Stop(Exception):
        pass

    def stop_at_3(step):
        if step.step == 3:
            raise Stop

    first = []
    with pytest.raises(Stop):
        finetune.run(load(colour_model_dir), data, tmp_path / "out", config, settings_for(tmp_path, batch_size=4),
                     on_step=stop_at_3, on_note=first.append)
    chosen = json.loads((tmp_path / "out" / finetune.WORK / "lr.json").read_text())["lr"]
    assert first[-1].startswith(f"learning rate {chosen:.0e}: the best of")
    again = []
    report = finetune.run(load(colour_model_dir), data, tmp_path / "out", config, settings_for(tmp_path, batch_size=4),
                          on_note=again.append)
    assert again[0] == f"learning rate {chosen:.0e}, chosen before" and not any("held-out R@1" in n for n in again), again
    assert again[1].startswith("resuming from step 3 of")
    assert report.lr == chosen and len(report.lr_trials) == 6


def test_weights_that_diverge_rank_last_and_stop_the_run(tmp_path, colour_model_dir):
    """A score that is not a number ranked first (every rank 0: R@1 100), so a diverged trial
    or epoch won. Now it ranks last, and a loss that is not a number stops training, the best
    epoch's weights kept."""
    from searchengine.tuning import evaluation

    nan = np.full((3, 2, 4), np.nan, np.float32)
    scores = evaluation.similarity(nan, np.ones((3, 4), np.float32))
    assert [evaluation.rank_of(scores[:, t], np.array([t])) for t in range(3)] == [0, 1, 2]  # by index, as ties
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=3))
    notes = []
    report = finetune.run(load(colour_model_dir), data, tmp_path / "out", Config(epochs=3, batch_size=4, lr=1e9, held_out=0.25, k_test=5),
                          settings_for(tmp_path, batch_size=4), on_note=notes.append)
    assert any(n.startswith("the loss stopped being a number at step") for n in notes), notes
    assert report.stopped_early and report.best_epoch == 0
    assert report.after == report.before  # the base model's weights, measured again
