"""A conversation about a photo (issue 31): the prompt for 1, 3 and 20 turns in the format
LAVIS and the model cards use, cut from the oldest turn to fit the context; decoding settings
and their bounds; and, on a tiny BLIP-2 OPT, answers equal to the model-card recipe run on
that prompt, streamed or not."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from searchengine.errors import QueryError
from searchengine.models.conversation import Decoding, Turn, fit, prompt
from searchengine.models.tiny import build_tiny_captioner
from searchengine.models.vqa import Answerer, clipped

TURNS = [Turn(f"question {i}?", f"answer {i}") for i in range(20)]


def test_the_prompt_is_the_documented_format():
    assert prompt([], "what breed is the dog?") == "Question: what breed is the dog? Answer:"
    assert prompt([Turn("which city is this?", "singapore")], "why?") == \
        "Question: which city is this? Answer: singapore. Question: why? Answer:"
    three = [Turn("what breed is the dog?", "a beagle"), Turn("is it the same dog?", "yes."), Turn("what is it holding?", "a ball!")]
    assert prompt(three, "what colour is the ball?") == (
        "Question: what breed is the dog? Answer: a beagle. Question: is it the same dog? Answer: yes. "
        "Question: what is it holding? Answer: a ball! Question: what colour is the ball? Answer:"
    )  # an answer that ends a sentence gets no second full stop
    twenty = prompt(TURNS, "and now?")
    assert twenty == " ".join(f"Question: question {i}? Answer: answer {i}." for i in range(20)) + " Question: and now? Answer:"


def test_turns_are_cut_from_the_oldest_until_the_prompt_fits():
    words = lambda text: len(text.split())  # noqa: E731 - a token count for the test: one per word
    one_turn = words(prompt(TURNS[:1], "and now?")) - words(prompt([], "and now?"))  # 5 words a turn
    for budget, kept in ((words(prompt(TURNS, "and now?")), 20), (words(prompt([], "and now?")) + 3 * one_turn, 3),
                         (words(prompt([], "and now?")), 0)):
        text, n = fit(TURNS, "and now?", words, budget)
        assert n == kept and text == prompt(TURNS[20 - kept:], "and now?") and words(text) <= budget
    with pytest.raises(QueryError, match="does not fit the model's context beside the answer's new tokens"):
        fit(TURNS, "and now?", words, 2)


def test_decoding_settings_and_their_bounds():
    assert Decoding().generate_kwargs() == {"max_new_tokens": 30, "do_sample": False, "num_beams": 1}
    assert Decoding("beam", 40, num_beams=4).generate_kwargs() == {"max_new_tokens": 40, "num_beams": 4, "do_sample": False}
    assert Decoding("nucleus", top_p=0.8, temperature=0.7).generate_kwargs() == \
        {"max_new_tokens": 30, "do_sample": True, "top_p": 0.8, "temperature": 0.7}
    for bad, says in ((Decoding("top-k"), "decoding is one of greedy, beam, nucleus"), (Decoding(max_new_tokens=0), "max_new_tokens is from 1 to 200"),
                      (Decoding(max_new_tokens=500), "max_new_tokens"), (Decoding("beam", num_beams=1), "num_beams is from 2 to 8"),
                      (Decoding("nucleus", top_p=0), "top_p is above 0"), (Decoding("nucleus", temperature=5), "temperature is from 0.05 to 2")):
        with pytest.raises(QueryError, match=says):
            bad.checked()


@pytest.fixture(scope="module")
def blip2(tmp_path_factory):
    path = build_tiny_captioner(tmp_path_factory.mktemp("tiny-blip2-chat"), kind="blip2", seed=3)
    return path, Answerer.load(str(path), device="cpu", dtype="float32")


def picture(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8))


def model_card(path, image, text: str, **generate) -> str:
    """The model card's recipe on a prompt: processor, generate, the new tokens decoded."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(path)
    model = Blip2ForConditionalGeneration.from_pretrained(path).eval()
    inputs = processor(images=image, text=text, return_tensors="pt")
    out = model.generate(**inputs, **generate)
    return " ".join(processor.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).split())


def test_a_conversation_is_answered_as_the_model_card_answers_its_prompt(blip2):
    path, answerer = blip2
    turns = [Turn("what is the dog doing?", "running")]
    image = picture()
    got = answerer.chat(image, turns, "is it raining?", Decoding(max_new_tokens=10))
    assert got.kept_turns == 1
    assert got.answer == model_card(path, image, prompt(turns, "is it raining?"), max_new_tokens=10, do_sample=False, num_beams=1)
    beam = answerer.chat(image, turns, "is it raining?", Decoding("beam", 10, num_beams=3))
    assert beam.answer == model_card(path, image, prompt(turns, "is it raining?"), max_new_tokens=10, num_beams=3, do_sample=False)
    # Twenty turns do not fit the tiny OPT's 64 positions: the latest that fit are kept.
    long = answerer.chat(image, TURNS, "and now?", Decoding(max_new_tokens=10))
    assert 0 < long.kept_turns < 20


def test_a_streamed_answer_equals_the_whole_one(blip2):
    _, answerer = blip2
    image = picture(1)
    turns = [Turn("what is the dog doing?", "running"), Turn("where?", "on a beach")]
    for decoding in (Decoding(max_new_tokens=12), Decoding("beam", 12, num_beams=2)):
        whole = answerer.chat(image, turns, "is it sunny?", decoding).answer
        pieces = list(answerer.stream(image, turns, "is it sunny?", decoding))
        assert clipped("".join(pieces)) == whole, (decoding, pieces, whole)
        assert len(pieces) >= (1 if decoding.method == "beam" else 2)  # token by token where it can
    with pytest.raises(QueryError, match="question is empty"):
        list(answerer.stream(image, turns, "   ", Decoding()))


def test_a_reader_that_stops_early_stops_the_generation(blip2):
    """A client gone (the iterator closed after its first piece) ends the generation at its
    next token, and frees the model for the next question."""
    import time

    _, answerer = blip2
    language_model = answerer.model.language_model
    forward, lengths = language_model.forward, []

    def slow(*args, **kwargs):  # 20 ms a token, so that the whole answer would take 0.8 s
        time.sleep(0.02)
        return forward(*args, **kwargs)

    generate = answerer.model.generate

    def counted(*args, **kwargs):
        out = generate(*args, **kwargs)
        lengths.append(out.shape[1])
        return out

    language_model.forward, answerer.model.generate = slow, counted
    try:
        pieces = answerer.stream(picture(2), [], "what is it?", Decoding(max_new_tokens=40))
        next(pieces)
        pieces.close()
        assert answerer._lock.acquire(timeout=5)  # the generation let go of the model
        answerer._lock.release()
        whole = answerer.chat(picture(2), [], "what is it?", Decoding(max_new_tokens=40))
    finally:
        language_model.forward, answerer.model.generate = forward, generate
    assert len(lengths) == 2 and lengths[0] < lengths[1], lengths  # stopped early; the full answer is longer
    assert whole.answer
