"""Training steps on cached ViT outputs: BLIP-2's ITC and ITM losses, the schedules, and a
`Trainer` that owns the optimizer, the temperature and which weights train.

- ITC, contrastive over the batch both ways, image-text similarity the best of the image's
  query vectors (as search scores it) over a learnable temperature (LAVIS: 0.07, kept in
  [0.001, 0.5]; the transformers class has none, and ranking does not need one), label
  smoothing 0.1. Captions equal to each other count as positives of each other's images.
- ITM, binary: every pair, plus one wrong image for each caption and one wrong caption for
  each image. Wrong ones are drawn at random first, then more and more from ITC's own
  mistakes (hard negatives, in proportion to their similarity): ITM learns nothing when it
  starts on hard negatives (MODEL_NOTES.md).

AdamW (no decay on biases, norms and the query tokens), linear warm-up then cosine decay;
trained ViT blocks at their layer-wise share of the rate (`vision.py`). Each step's data order,
negatives and dropout come from the seed and the step alone, so a resumed run, or a run of
another learning rate, sees the same batches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from searchengine.config.devices import is_cuda
from searchengine.errors import Diverged
from searchengine.tuning.vision import VisionSplit

if TYPE_CHECKING:
    import torch

    from searchengine.models.retrieval import RetrievalModel


@dataclass(frozen=True)
class Schedule:
    lr: float  # the peak
    total: int  # steps
    warmup: float = 0.1  # share of the steps
    hard_from: float = 0.3  # share of the steps on random negatives; hard ones then ramp in as long again

    def lr_at(self, step: int) -> float:
        """Linear warm-up over `warmup` of the steps, then cosine decay to 0."""
        warm = max(1, round(self.warmup * self.total))
        if step < warm:
            return self.lr * (step + 1) / warm
        return self.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, self.total - warm)))

    def hard_share(self, step: int) -> float:
        """The share of negatives drawn from ITC's mistakes: none for `hard_from` of the run,
        then rising to all over as many steps again."""
        start = self.hard_from * self.total
        return float(np.clip((step - start) / max(1.0, start), 0.0, 1.0)) if step >= start else 0.0


def batch_order(step: int, per_epoch: int, batch: int, n: int, seed: int) -> np.ndarray:
    """The training rows of a step: each epoch a permutation of the set, by seed and epoch."""
    epoch, at = divmod(step, per_epoch)
    order = np.random.default_rng([seed, epoch]).permutation(n)
    return order[at * batch:(at + 1) * batch]


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


@dataclass
class Losses:
    itc: float
    itm: float
    hard: float  # share of negatives drawn from ITC's mistakes


class Trainer:
    """The weights a fine-tune trains (everything after the ViT, and the ViT's last blocks
    where `split` says), an AdamW over them with its schedule, and the ITC temperature."""

    def __init__(
        self, model: "RetrievalModel", split: VisionSplit, schedule: Schedule, *,
        weight_decay: float, layer_decay: float, temp_init: float, smoothing: float, seed: int,
    ) -> None:
        import torch

        self.model, self.split, self.schedule = model, split, schedule
        self.smoothing, self.seed = smoothing, seed
        self.temp = torch.nn.Parameter(torch.tensor(temp_init, device=model.device))
        groups: dict[tuple[float, bool], list] = {}
        self.names: list[str] = []
        for name, p, factor in split.groups(layer_decay):
            decays = p.ndim >= 2 and name != "query_tokens"
            groups.setdefault((factor, decays), []).append(p)
            self.names.append(name)
        groups.setdefault((1.0, False), []).append(self.temp)
        self.opt = torch.optim.AdamW(
            [{"params": ps, "weight_decay": weight_decay if decays else 0.0, "scale": factor}
             for (factor, decays), ps in sorted(groups.items(), key=lambda kv: (-kv[0][0], kv[0][1]))],
            lr=schedule.lr,
        )

    def step(self, step: int, vit: "torch.Tensor", texts: list[str], rng: np.random.Generator) -> Losses:
        """One update on cached outputs `vit` (the frozen part's) with caption i for row i."""
        import torch

        torch.manual_seed(self.seed * 1_000_003 + step)  # dropout, by step: a resumed run matches
        for group in self.opt.param_groups:
            group["lr"] = self.schedule.lr_at(step) * group["scale"]
        m = self.model.model
        m.train()
        share = self.schedule.hard_share(step)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=is_cuda(str(self.model.device))):  # float32 weights, bf16 maths
            loss_itc, loss_itm = batch_losses(self.model, self.split.tail(vit), texts, self.temp, rng, share, self.smoothing)
        loss = loss_itc + loss_itm
        if not bool(torch.isfinite(loss.detach())):
            raise Diverged(step)  # before the update: the weights are those of the step before
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            self.temp.clamp_(0.001, 0.5)
        return Losses(float(loss_itc.detach()), float(loss_itm.detach()), share)

    def weights(self) -> dict[str, "torch.Tensor"]:
        """The trained weights, copied to the CPU."""
        params = dict(self.model.model.named_parameters())
        return {n: params[n].detach().cpu().clone() for n in self.names}

    def state(self) -> dict:
        return {"weights": self.weights(), "temp": float(self.temp.detach()), "optimizer": self.opt.state_dict()}

    def load(self, state: dict) -> None:
        self.model.model.load_state_dict(state["weights"], strict=False)
        self.temp.data.fill_(state["temp"])
        self.opt.load_state_dict(state["optimizer"])
