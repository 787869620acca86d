"""A conversation about a photo: the prompt BLIP-2 gets for it, and how the answer is decoded.

**The prompt.** As LAVIS and the BLIP-2 model cards prompt multi-turn VQA ("prompting with a
context"): each earlier turn as `Question: {q} Answer: {a}.`, joined by spaces, then the new
question as `Question: {q} Answer:`:

    Question: which city is this? Answer: singapore. Question: why? Answer:

An answer that already ends in `.`, `!` or `?` gets no second full stop. The prompt must
fit the language model's context with the image's query tokens and the answer's new tokens:
where it would not, turns are dropped from the oldest until it does (`fit`), and the answer
says how many were kept. A question that does not fit alone is refused.

**Decoding.** greedy (the default), beam search (`num_beams`), or nucleus sampling (`top_p`,
`temperature`), at most `max_new_tokens`; each within bounds, refused with the reason
otherwise.

Plain data and text, no model: `vqa.Answerer` runs it (tests/models/test_conversation.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from searchengine.errors import QueryError

METHODS = ("greedy", "beam", "nucleus")
MAX_TURNS = 50  # a conversation sent back longer than this is refused (the server keeps none)


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


def turn_text(turn: Turn) -> str:
    answer = turn.answer.strip()
    end = "" if answer.endswith((".", "!", "?")) else "."
    return f"Question: {turn.question.strip()} Answer: {answer}{end}"


def prompt(turns: Sequence[Turn], question: str) -> str:
    """The whole conversation as one prompt (see the module doc)."""
    return " ".join([*(turn_text(t) for t in turns), f"Question: {question.strip()} Answer:"])


def fit(turns: Sequence[Turn], question: str, tokens: Callable[[str], int], budget: int) -> tuple[str, int]:
    """(the prompt, how many of the latest turns it keeps): the oldest turns dropped until
    `tokens(prompt)` is at most `budget`. QueryError when the question alone is too long."""
    turns = list(turns)
    for start in range(len(turns) + 1):
        text = prompt(turns[start:], question)
        if tokens(text) <= budget:
            return text, len(turns) - start
    raise QueryError(f"the question does not fit the model's context beside the answer's new tokens ({max(budget, 0)} tokens "
                     "left for the prompt): ask a shorter question, or fewer max_new_tokens")


@dataclass(frozen=True)
class Decoding:
    method: str = "greedy"
    max_new_tokens: int = 30
    num_beams: int = 3  # beam
    top_p: float = 0.9  # nucleus
    temperature: float = 1.0  # nucleus

    def checked(self) -> "Decoding":
        if self.method not in METHODS:
            raise QueryError(f"decoding is one of {', '.join(METHODS)}, not {self.method!r}")
        if not 1 <= self.max_new_tokens <= 200:
            raise QueryError(f"max_new_tokens is from 1 to 200, not {self.max_new_tokens}")
        if not 2 <= self.num_beams <= 8:
            raise QueryError(f"num_beams is from 2 to 8, not {self.num_beams}")
        if not 0 < self.top_p <= 1:
            raise QueryError(f"top_p is above 0 and at most 1, not {self.top_p}")
        if not 0.05 <= self.temperature <= 2:
            raise QueryError(f"temperature is from 0.05 to 2, not {self.temperature}")
        return self

    def generate_kwargs(self) -> dict:
        """What `generate` is given for it."""
        kwargs: dict = {"max_new_tokens": self.max_new_tokens}
        if self.method == "beam":
            kwargs.update(num_beams=self.num_beams, do_sample=False)
        elif self.method == "nucleus":
            kwargs.update(do_sample=True, top_p=self.top_p, temperature=self.temperature)
        else:
            kwargs.update(do_sample=False, num_beams=1)
        return kwargs

    @property
    def streams(self) -> bool:
        """Whether the answer can come token by token (beam search settles it only at the end)."""
        return self.method != "beam"


def check_turns(turns: Sequence[Turn], check: Callable[[str], str]) -> list[Turn]:
    """The turns with each question checked (`check`: vqa.check_question); answers as sent."""
    if len(turns) > MAX_TURNS:
        raise QueryError(f"the conversation has {len(turns)} turns; at most {MAX_TURNS} are taken")
    return [Turn(check(t.question), " ".join(t.answer.split())) for t in turns]
