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


FAST = Config(epochs=12, batch_size=8, lr=1e-3, held_out=0.2, seed=0, k_test=10, warmup=0.1)


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
def test_an_interrupted_run_resumes_and_trains_as_one_run(tmp_path, colour_model_dir):
    (tmp_path / "set").mkdir()
    data = datasets.load(new_domain(tmp_path / "set", per_colour=3))
    config = Config(epochs=3, batch_size=4, lr=1e-3, held_out=0.25, seed=1, k_test=5, checkpoint_every=2)
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
    total = seen[-1]
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
    c = Config(lr=1.0, warmup=0.1, hard_from=0.3)
    lrs = [finetune.lr_at(s, 100, c) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.001
    hard = [finetune.hard_share(s, 100, c) for s in range(100)]
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
