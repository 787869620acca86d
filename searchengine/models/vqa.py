"""Ask a photo: free-form questions answered by BLIP-2 with a language model (VQA).

The model is a `Blip2ForConditionalGeneration` (OPT or Flan-T5), loaded by hub id or local
directory: `--vqa-model`, else the index's captioner when it is such a model. The question is
put as BLIP-2's model card does (`Question: {q} Answer:`), through the checkpoint's own
processor, `generate` (greedy) and the processor's `decode`. A decoder-only language model
(OPT) hands back the prompt's tokens ahead of the answer; only the new tokens are the answer.

Nothing loads at import time or before the first question; when no model can answer, the
reason says which flag helps (`VqaUnavailable`).
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

from searchengine.errors import ModelLoadError, QueryError, SearchEngineError, VqaUnavailable
from searchengine.models.conversation import Decoding, Turn, check_turns, fit
from searchengine.models.loading import int8_loading, load_config, load_pretrained, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from PIL import Image

log = logging.getLogger(__name__)

MAX_QUESTION_CHARS = 300
MAX_ANSWER_CHARS = 500
ANSWER_TOKENS = 30
EXAMPLE_VQA_MODEL = "Salesforce/blip2-opt-2.7b"


@dataclass
class Answer:
    question: str
    answer: str
    model: str
    timings_ms: dict[str, float]
    kept_turns: int = 0  # of the earlier turns, how many the prompt kept (the oldest are cut to fit)

    def as_json(self) -> dict:
        return {"question": self.question, "answer": self.answer, "model": self.model, "timings_ms": self.timings_ms}


def clipped(text: str) -> str:
    """An answer as shown: whitespace-normalised, at most MAX_ANSWER_CHARS long."""
    answer = " ".join(text.split())
    return answer if len(answer) <= MAX_ANSWER_CHARS else answer[: MAX_ANSWER_CHARS - 1].rstrip() + "…"


def check_question(question: str, limit: int = MAX_QUESTION_CHARS) -> str:
    """The question, whitespace-normalised; QueryError when empty or over `limit` characters."""
    text = " ".join((question or "").split())
    if not text:
        raise QueryError("the question is empty: ask something about the photo, such as 'what is the dog doing?'")
    if len(text) > limit:
        raise QueryError(f"the question is {len(text)} characters long; the limit is {limit}")
    return text


def answers_questions(config) -> bool:
    """Whether a checkpoint's config is BLIP-2 with a language model (not the retrieval model)."""
    architectures = getattr(config, "architectures", None) or []
    return getattr(config, "model_type", None) == "blip-2" and (
        not architectures or "Blip2ForConditionalGeneration" in architectures
    )


class Answerer:
    """A loaded VQA model; `ask` is safe from many threads (one question at a time)."""

    def __init__(self, name: str, model, processor, *, device: str, max_new_tokens: int = ANSWER_TOKENS) -> None:
        self.name = name
        self.model = model.eval()
        self.processor = processor
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.dtype = next(model.parameters()).dtype
        self._lock = threading.Lock()

    @property
    def image_side(self) -> int:
        """The side of the square the processor resizes images to."""
        size = getattr(self.processor.image_processor, "size", None) or {}
        return int(size.get("height") or size.get("shortest_edge") or 224)

    @classmethod
    def load(cls, name: str, *, device: str = "auto", dtype: str = "auto", max_new_tokens: int = ANSWER_TOKENS) -> "Answerer":
        from transformers import Blip2ForConditionalGeneration

        where, config = load_config(name, "question-answering model")
        if not answers_questions(config):
            what = (getattr(config, "architectures", None) or [getattr(config, "model_type", "unknown")])[0]
            raise ModelLoadError(
                f"{name!r} is a {what!r}, which answers no questions; a BLIP-2 model with a language model does "
                f"(such as {EXAMPLE_VQA_MODEL})"
            )
        device = resolve_device(device)
        eight_bit = int8_loading(device) if dtype == "int8" else {}
        model, processor, missing = load_pretrained(
            Blip2ForConditionalGeneration, where, name, "question-answering model", dtype=resolve_dtype(dtype, device),
            **eight_bit,
        )
        if any(k.startswith("language_model") for k in missing):
            raise ModelLoadError(f"{name!r} has no trained language model weights; it cannot answer questions")
        if not eight_bit:  # an 8-bit model is placed by its device_map and cannot be moved
            model.to(device)
        log.info("loaded question-answering model %s on %s%s", name, device, " in int8" if eight_bit else "")
        return cls(name, model, processor, device=device, max_new_tokens=max_new_tokens)

    def ask(self, image: "Image.Image", question: str) -> Answer:
        """The model's answer to `question` about an RGB image, at most MAX_ANSWER_CHARS long
        (greedy, `max_new_tokens`): a conversation of one question."""
        return self.chat(image, [], question, Decoding(max_new_tokens=self.max_new_tokens))

    def chat(self, image: "Image.Image", turns: Sequence[Turn], question: str, decoding: Decoding = Decoding()) -> Answer:
        """The answer to `question` after the earlier `turns` (models/conversation.py)."""
        import torch

        t0 = time.perf_counter()
        inputs, kept, question = self._prepare(image, turns, question, decoding)
        t1 = time.perf_counter()
        with self._lock, torch.inference_mode():
            out = self.model.generate(**inputs, **decoding.generate_kwargs())
        t2 = time.perf_counter()
        tokens = out[0]
        if not self.model.config.text_config.is_encoder_decoder:  # OPT: the prompt comes back first
            tokens = tokens[inputs["input_ids"].shape[1]:]
        answer = clipped(self.processor.decode(tokens, skip_special_tokens=True))
        return Answer(question, answer, self.name, {"prepare": (t1 - t0) * 1000, "generate": (t2 - t1) * 1000}, kept)

    def stream(self, image: "Image.Image", turns: Sequence[Turn], question: str, decoding: Decoding = Decoding()) -> Iterator[str]:
        """The answer's text as it is generated, piece by piece (`clipped("".join(...))` is
        `chat`'s answer). What can be refused is refused here, before the first piece. Beam
        search settles its answer only at the end: it comes in one piece. A reader that stops
        early (closes the iterator: a client gone) stops the generation at its next token."""
        if not decoding.streams:
            return iter([self.chat(image, turns, question, decoding).answer])
        inputs, _, _ = self._prepare(image, turns, question, decoding)
        return self._pieces(inputs, decoding)

    def _pieces(self, inputs: dict, decoding: Decoding) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
        failed: list[BaseException] = []
        gone = threading.Event()

        class ReaderGone(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                return gone.is_set()

        def generate() -> None:
            try:
                with self._lock, torch.inference_mode():
                    self.model.generate(**inputs, **decoding.generate_kwargs(), streamer=streamer,
                                        stopping_criteria=StoppingCriteriaList([ReaderGone()]))
            except BaseException as e:  # noqa: BLE001 - handed to the reader below
                failed.append(e)
                streamer.end()

        thread = threading.Thread(target=generate, name="vqa-stream", daemon=True)
        thread.start()
        try:
            yield from streamer
        finally:
            gone.set()
        thread.join()
        if failed:
            raise failed[0]

    def prompt_tokens(self, text: str) -> int:
        return len(self.processor.tokenizer(text)["input_ids"])

    def prompt_budget(self, decoding: Decoding) -> int:
        """The prompt's tokens that fit the language model's context beside the image's query
        tokens and the answer's."""
        config = self.model.config
        context = getattr(config.text_config, "max_position_embeddings", None) or 512
        return context - int(getattr(config, "num_query_tokens", 32)) - decoding.max_new_tokens

    def _prepare(self, image: "Image.Image", turns: Sequence[Turn], question: str, decoding: Decoding):
        """(the model's inputs, how many turns the prompt keeps, the question as asked)."""
        question = check_question(question)
        turns = check_turns(turns, check_question)
        decoding.checked()
        text, kept = fit(turns, question, self.prompt_tokens, self.prompt_budget(decoding))
        inputs = self.processor(images=image, text=text, return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs, kept, question


class LazyAnswerer:
    """The VQA model of a long-running server: loaded on the first question (a BLIP-2 OPT-2.7b
    takes ~8 GB and a while to load, so a server that is never asked never pays), once, in
    whichever request comes first; later requests wait for it. A failed load is remembered:
    the reason is the answer until the server restarts."""

    def __init__(self, name: str | None, why_none: str, load) -> None:
        self.name = name
        self._why_none = why_none
        self._load = load
        self._answerer: Answerer | None = None
        self._error: str | None = None
        self._lock = threading.Lock()

    def status(self) -> tuple[bool, str | None, str | None]:
        """(whether questions can be asked, the model's name, why not), without loading it."""
        if self.name is None:
            return False, None, self._why_none
        if self._error is not None:
            return False, self.name, self._error
        return True, self.name, None

    def share(self, captioner) -> None:
        """Answer with a captioner already loaded (`serve --watch`'s) when it is the model
        chosen, or when none was and it can answer: one copy of the weights, not two."""
        if captioner is None or not answers_questions(captioner.model.config):
            return
        if self.name is not None and self.name != captioner.name:
            return
        with self._lock:
            self.name, self._error = captioner.name, None
            self._answerer = Answerer(captioner.name, captioner.model, captioner.processor, device=captioner.device)

    def get(self) -> Answerer:
        available, _, why = self.status()
        if not available:
            raise VqaUnavailable(why)
        with self._lock:
            if self._answerer is None and self._error is None:
                try:
                    self._answerer = self._load(self.name)
                except SearchEngineError as e:
                    self._error = f"the question-answering model cannot be loaded: {e}"
                    log.error("%s", self._error)
            if self._answerer is None:
                raise VqaUnavailable(self._error)
            return self._answerer
