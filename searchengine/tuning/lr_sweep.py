"""`finetune --lr auto`: the peak learning rate chosen by a short, measured sweep.

Each candidate trains from the base weights for a short run of the same shape (warm-up, then
cosine decay, hard negatives ramping in) on the same batches, and the held-out split's
text->image ITC recall is measured after it. The best mean of R@1/5/10 wins (on a small
held-out split R@1 moves in coarse steps, and short trials often tie on it), ties going to the
better R@1 and then to the smaller rate (the safer one). The trial is a fifth of the run's
steps, at least 20 (or the whole run where it is shorter), so the sweep costs about one run
for five candidates.

Why a sweep and not a rule: the right rate moved by two orders of magnitude between the real
model on a large set (1e-5, LAVIS's choice) and a small model on a few thousand images
(5e-4, issue 33's table), and with it whether the ViT trains; one rule from the model and
set sizes would be fitted to two points.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

CANDIDATES = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3)
LEAST_TRIAL_STEPS, MOST_TRIAL_STEPS = 20, 300


def trial_steps(total: int) -> int:
    """Steps of one candidate's run: a fifth of the planned run's, from 20 to 300 (and never
    more than the run)."""
    return min(total, max(LEAST_TRIAL_STEPS, min(MOST_TRIAL_STEPS, total // 5)))


@dataclass(frozen=True)
class Trial:
    lr: float
    recalls: dict[str, float]  # held-out text->image ITC recalls after the trial

    @property
    def score(self) -> tuple[float, float]:
        return self.recalls["mean"], self.recalls["R@1"]


def choose(trial: Callable[[float], dict[str, float]], candidates=CANDIDATES,
           on_trial: Callable[[Trial], None] = lambda t: None) -> tuple[float, list[Trial]]:
    """(the chosen rate, every trial) from `trial(lr) -> held-out recalls`."""
    trials = []
    for lr in sorted(candidates):
        trials.append(Trial(lr, trial(lr)))
        on_trial(trials[-1])
    best = max(trials, key=lambda t: (*t.score, -t.lr))
    return best.lr, trials


def describe(lr: float) -> str:
    """1e-05, 3e-04: as a user types it."""
    return f"{lr:.0e}"
