"""Ask a photo: BLIP-2 with a language model answers questions (a tiny OPT one built from a
config), through the Answerer, the API and the CLI; and what happens when no model can."""

from __future__ import annotations

import json

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from searchengine.indexing.pipeline import Indexer
from searchengine.app import wiring
from searchengine.app.api import create_app
from searchengine.models.captioner import Captioner
from searchengine.errors import ModelLoadError, QueryError
from searchengine.library import Library
from searchengine.models.tiny import build_tiny_captioner
from searchengine.config.settings import Settings
from searchengine.models.vqa import MAX_QUESTION_CHARS, Answerer
from tests.inprocess import run_cli

QUESTIONS = ["what is the dog doing?", "Is it raining?", "how many birds are there"]


@pytest.fixture(scope="module")
def blip2_dir(tmp_path_factory):
    return build_tiny_captioner(tmp_path_factory.mktemp("tiny-blip2-opt"), kind="blip2", seed=3)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vqa-pics") / "pics"
    folder.mkdir()
    rng = np.random.default_rng(5)
    for i in range(4):
        Image.fromarray(rng.integers(0, 255, (48 + 8 * i, 64, 3), dtype=np.uint8)).save(folder / f"p{i}.png")
    return folder


def model_card_answer(model_dir, image: Image.Image, question: str, max_new_tokens: int = 30) -> str:
    """BLIP-2's model card recipe, run on its own: processor(images, text=prompt), generate,
    decode. OPT hands the prompt's tokens back ahead of the answer; they are cut off."""
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    processor = AutoProcessor.from_pretrained(model_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    inputs = processor(images=image, text=f"Question: {question} Answer:", return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=max_new_tokens)
    whole = processor.decode(out[0], skip_special_tokens=True).strip()
    answer = processor.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert whole.endswith(answer)
    return " ".join(answer.split())


def test_answers_equal_the_model_card_recipe(blip2_dir, pictures):
    answerer = Answerer.load(str(blip2_dir), device="cpu", dtype="float32")
    answers = set()
    for i, question in enumerate(QUESTIONS):
        image = Image.open(pictures / f"p{i}.png").convert("RGB")
        got = answerer.ask(image, question)
        assert got.answer == model_card_answer(blip2_dir, image, question)
        assert got.answer and got.question == question and got.timings_ms["generate"] > 0
        answers.add(got.answer)
    assert len(answers) > 1  # the answer depends on the image and the question


@pytest.mark.dtype
def test_answers_in_bf16_equal_the_recipe_in_bf16(blip2_dir, pictures):
    """The question-answering model in bf16 (dtype auto on GPUs and bf16 CPUs): the pixels
    reach it in its dtype, and its answers are the recipe's with the model loaded in bf16."""
    import torch
    from transformers import AutoProcessor, Blip2ForConditionalGeneration

    answerer = Answerer.load(str(blip2_dir), device="cpu", dtype="bfloat16")
    assert answerer.dtype == torch.bfloat16
    processor = AutoProcessor.from_pretrained(blip2_dir)
    model = Blip2ForConditionalGeneration.from_pretrained(blip2_dir, dtype=torch.bfloat16).eval()
    for i, question in enumerate(QUESTIONS[:2]):
        image = Image.open(pictures / f"p{i}.png").convert("RGB")
        inputs = processor(images=image, text=f"Question: {question} Answer:", return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=30)
        want = " ".join(processor.decode(out[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True).split())
        assert answerer.ask(image, question).answer == want


def test_questions_are_checked_and_answers_capped(blip2_dir, pictures):
    answerer = Answerer.load(str(blip2_dir), device="cpu", dtype="float32", max_new_tokens=3)
    image = Image.open(pictures / "p0.png").convert("RGB")
    assert len(answerer.ask(image, "what   is\n it?").answer.split()) <= 3  # max_new_tokens caps it
    for bad in ("", "   ", "x" * (MAX_QUESTION_CHARS + 1)):
        with pytest.raises(QueryError):
            answerer.ask(image, bad)


def test_a_model_that_answers_nothing_is_refused_by_name(tiny_model_dir, tiny_captioner_dir):
    for name in (tiny_model_dir, tiny_captioner_dir):  # the retrieval model, a BLIP captioner
        with pytest.raises(ModelLoadError, match="answers no questions"):
            Answerer.load(str(name), device="cpu")


@pytest.fixture(scope="module")
def indexed(tmp_path_factory, pictures, tiny_model_dir, model, blip2_dir):
    """Indexed with the tiny BLIP-2 OPT captioner: the index's captioner answers questions."""
    root = tmp_path_factory.mktemp("vqa-index")
    settings = Settings(data_dir=root / "data", model=str(tiny_model_dir), device="cpu", dtype="float32", batch_size=4, refresh_interval_s=0)
    library = Library.open(settings, create=True)
    captioner = Captioner.load(str(blip2_dir), device="cpu", dtype="float32", max_new_tokens=5)
    Indexer(model, library, settings, captioner=captioner).run([pictures])
    library.record_captioner(True, str(blip2_dir))  # as `index` does
    ids = {library.catalog.image_detail(i).files[0].path: i for i in library.indexed_ids().tolist()}
    library.close()
    return settings, ids


def test_the_index_s_blip2_captioner_is_the_vqa_model_unless_one_is_named(indexed, blip2_dir, tiny_captioner_dir):
    settings, _ = indexed
    recorded = Library.recorded(settings)
    assert wiring.vqa_model(settings, recorded) == (str(blip2_dir), "")
    named = settings.model_copy(update={"vqa_model": "/some/other"})
    assert wiring.vqa_model(named, recorded)[0] == "/some/other"
    from searchengine.library import Recorded

    blip = Recorded(recorded.model, (True, str(tiny_captioner_dir)))
    name, why = wiring.vqa_model(settings, blip)
    assert name is None and "answers no questions" in why and "--vqa-model" in why
    name, why = wiring.vqa_model(settings, Recorded(recorded.model, (False, None)))
    assert name is None and "--vqa-model" in why


def wait_ready(client):
    from tests.app.test_api import wait_ready as ready

    ready(client)


def test_api_ask_answers_as_the_recipe_does(indexed, model, blip2_dir):
    settings, ids = indexed
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        wait_ready(client)
        status = client.get("/api/vqa").json()
        assert status == {"available": True, "model": str(blip2_dir), "reason": None}
        path, image_id = sorted(ids.items())[1]
        r = client.post(f"/api/images/{image_id}/ask", json={"question": "What colour is the sky?"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["answer"] == model_card_answer(blip2_dir, Image.open(path).convert("RGB"), "What colour is the sky?")
        assert body["model"] == str(blip2_dir) and body["timings_ms"]["generate"] > 0
        for payload, code in (({"question": ""}, 422), ({"question": "x" * 301}, 422), ({}, 422), ({"question": "   "}, 422)):
            r = client.post(f"/api/images/{image_id}/ask", json=payload)
            assert r.status_code == code and r.json()["error"], (payload, r.text)
        assert client.post("/api/images/99999/ask", json={"question": "why?"}).status_code == 404


def test_api_without_a_vqa_model_says_why(indexed, model, tiny_captioner_dir):
    settings, ids = indexed
    from searchengine.library import Recorded

    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        wait_ready(client)
        service = app.state.searchengine.service
        recorded = Library.recorded(settings)
        service.answerer = wiring.lazy_answerer(settings, Recorded(recorded.model, (True, str(tiny_captioner_dir))))
        status = client.get("/api/vqa").json()
        assert status["available"] is False and "--vqa-model" in status["reason"]
        r = client.post(f"/api/images/{next(iter(ids.values()))}/ask", json={"question": "why?"})
        assert r.status_code == 503 and "answers no questions" in r.json()["error"]
        # a named model that fails to load: 503 with the reason, and the status says so afterwards
        broken = settings.model_copy(update={"vqa_model": str(settings.data_dir / "nothing-here")})
        service.answerer = wiring.lazy_answerer(broken, recorded)
        r = client.post(f"/api/images/{next(iter(ids.values()))}/ask", json={"question": "why?"})
        assert r.status_code == 503 and "cannot be loaded" in r.json()["error"]
        assert client.get("/api/vqa").json()["available"] is False


def test_cli_ask_by_path_and_by_id(indexed, blip2_dir, pictures, tiny_captioner_dir):
    settings, ids = indexed
    env = {"SEARCHENGINE_DATA_DIR": str(settings.data_dir)}
    path, image_id = sorted(ids.items())[2]
    expected = model_card_answer(blip2_dir, Image.open(path).convert("RGB"), "is it raining?")
    r = run_cli("ask", image_id, "is", "it", "raining?", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == (expected or "(no answer)")
    r = run_cli("ask", path, "is it raining?", "--json", env=env)
    assert r.returncode == 0 and json.loads(r.stdout)["answer"] == expected
    other = pictures.parent / "elsewhere.png"  # a file outside any index, a model named outright
    Image.open(path).save(other)
    r = run_cli("ask", other, "is it raining?", "--vqa-model", blip2_dir, env={"SEARCHENGINE_DATA_DIR": str(pictures.parent / "none")})
    assert r.returncode == 0 and r.stdout.strip() == (expected or "(no answer)")
    for args, words in (
        (("ask", other, "why?", "--vqa-model", tiny_captioner_dir), "answers no questions"),
        (("ask", "999", "why?"), "no indexed image has id 999"),
        (("ask", other, "   "), "question is empty"),
        (("ask", pictures / "missing.png", "why?"), "cannot read"),
    ):
        r = run_cli(*args, env=env)
        assert r.returncode == 1 and words in r.stderr and "Traceback" not in r.stderr, (args, r.stderr)
    r = run_cli("ask", other, "why?", env={"SEARCHENGINE_DATA_DIR": str(pictures.parent / "none")})
    assert r.returncode == 1 and "--vqa-model" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_a_loaded_blip2_captioner_is_shared_rather_than_loaded_twice(blip2_dir, tiny_captioner_dir):
    """`serve --watch` has its captioner loaded already: questions use the same weights."""
    from searchengine.models.vqa import LazyAnswerer

    def never(name):
        raise AssertionError("loaded a second copy")

    blip2 = Captioner.load(str(blip2_dir), device="cpu", dtype="float32")
    unnamed = LazyAnswerer(None, "no model", never)  # a new index: no captioner recorded when the server started
    unnamed.share(blip2)
    assert unnamed.status() == (True, str(blip2_dir), None) and unnamed.get().model is blip2.model
    named = LazyAnswerer("/another/model", "", never)  # --vqa-model names another: kept
    named.share(blip2)
    assert named.name == "/another/model"
    blip = Captioner.load(str(tiny_captioner_dir), device="cpu", dtype="float32")
    plain = LazyAnswerer(None, "no model", never)  # a BLIP captioner answers nothing
    plain.share(blip)
    assert plain.status()[0] is False


def sse_events(text: str) -> list[tuple[str, dict]]:
    """(event, data) of a server-sent event stream."""
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines.get("event", "message"), json.loads(lines["data"])))
    return out


def test_api_chat_keeps_no_conversation_and_streams_what_it_answers(indexed, model, blip2_dir):
    from searchengine.models.conversation import Turn, prompt

    from tests.models.test_conversation import model_card

    settings, ids = indexed
    app = create_app(settings, loader=lambda s: (model, Library.open(s)))
    with TestClient(app) as client:
        wait_ready(client)
        path, image_id = sorted(ids.items())[2]
        image = Image.open(path).convert("RGB")
        turns = [{"question": "what is the dog doing?", "answer": "running"}, {"question": "where?", "answer": "on a beach"}]
        body = {"question": "is it sunny?", "turns": turns, "decoding": {"max_new_tokens": 8}}
        r = client.post(f"/api/images/{image_id}/chat", json=body)
        assert r.status_code == 200, r.text
        whole = r.json()
        want = model_card(blip2_dir, image, prompt([Turn(**t) for t in turns], "is it sunny?"), max_new_tokens=8, do_sample=False, num_beams=1)
        assert whole["answer"] == want and whole["kept_turns"] == 2 and whole["model"] == str(blip2_dir)
        # Streamed: the same answer, piece by piece, then `done`.
        with client.stream("POST", f"/api/images/{image_id}/chat", json={**body, "stream": True}) as s:
            assert s.status_code == 200 and s.headers["content-type"].startswith("text/event-stream")
            events = sse_events(s.read().decode())
        pieces = [data["text"] for event, data in events if event == "message"]
        assert len(pieces) >= 2 and events[-1][0] == "done", events
        assert events[-1][1]["answer"] == want == " ".join("".join(pieces).split())
        assert 0 < events[-1][1]["timings_ms"]["first_piece"] <= events[-1][1]["timings_ms"]["total"]
        # Refused before anything streams, with the reason.
        for bad, says in (({"decoding": {"method": "top-k"}}, "decoding.method"), ({"decoding": {"max_new_tokens": 0}}, "max_new_tokens"),
                          ({"decoding": {"method": "nucleus", "top_p": 0}}, "top_p"), ({"turns": [{"question": " ", "answer": "x"}]}, "turns"),
                          ({"turns": [{"question": "q?", "answer": "a"}] * 51}, "turns")):
            r = client.post(f"/api/images/{image_id}/chat", json={**body, **bad, "stream": True})
            assert r.status_code == 422 and says in r.json()["error"], (bad, r.text)
        assert client.post("/api/images/99999/chat", json={**body, "stream": True}).status_code == 404


def test_ask_without_a_question_is_a_conversation_in_a_terminal(blip2_dir, pictures, tmp_path):
    """Driven through a pseudo-terminal: three questions, each answered with the ones before
    (as Answerer.chat answers that conversation), then Ctrl-D."""
    import os
    import select
    import subprocess
    import sys
    import time

    from searchengine.models.conversation import Decoding, Turn

    image_path = sorted(pictures.iterdir())[0]
    master, slave = os.openpty()
    env = {**os.environ, "SEARCHENGINE_DATA_DIR": str(tmp_path / "d"), "TERM": "dumb"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "searchengine.app.entry", "ask", str(image_path), "--vqa-model", str(blip2_dir),
         "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "8"],
        stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True,
    )
    os.close(slave)
    seen = b""

    def read_until(marker: bytes, timeout: float = 120) -> None:
        nonlocal seen
        end = time.monotonic() + timeout
        while marker not in seen:
            assert time.monotonic() < end, seen.decode(errors="replace")
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    seen += os.read(master, 4096)
                except OSError:  # the other side closed
                    break

    try:
        read_until(b"you> ")
        for question in QUESTIONS:
            before = seen.count(b"you> ")
            os.write(master, question.encode() + b"\n")
            end = time.monotonic() + 120
            while seen.count(b"you> ") <= before:
                assert time.monotonic() < end, seen.decode(errors="replace")
                ready, _, _ = select.select([master], [], [], 0.5)
                if ready:
                    seen += os.read(master, 4096)
        os.write(master, b"\x04")  # Ctrl-D
        read_until(b"questions answered")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode().replace("\r\n", "\n")
    got = [line[len("photo> "):].strip() for line in text.splitlines() if line.startswith("photo> ")]
    answerer = Answerer.load(str(blip2_dir), device="cpu", dtype="float32")
    image = Image.open(image_path).convert("RGB")
    turns, want = [], []
    for question in QUESTIONS:
        answer = answerer.chat(image, turns, question, Decoding(max_new_tokens=8)).answer
        want.append(answer)
        turns.append(Turn(question, answer))
    assert got == want, text
    assert "Ctrl-D ends the conversation" in text and "3 questions answered" in text
