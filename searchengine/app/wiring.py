"""The composition root's choices: which retrieval model and which captioner a command loads.

An index remembers the model that made its vectors and how it was captioned, so every
command defaults to those: `search`, `serve`, `watch` and `caption` need no `--model`. A
`--model` that names another model is refused *before* anything is loaded or downloaded
(by the checkpoint's fingerprint where its files are at hand, by name where they are not).
Availability is checked for both models before either loads, so a missing one is reported
in about a second, with the ways forward.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Callable

from searchengine.errors import ModelLoadError, ModelMismatchError, SearchEngineError
from searchengine.models.hub import locate, looks_local
from searchengine.library import Recorded
from searchengine.config.settings import DEFAULT_MODEL, Settings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Choice:
    """The models a command will load: names as `from_pretrained` takes them."""

    model: str
    caption_model: str | None  # None: no captions


def retrieval_model(settings: Settings, recorded: Recorded | None) -> str:
    """--model if given (refused at once if the index was built with another), else the
    index's own model, else the default for a new index."""
    info = recorded.model if recorded is not None else None
    if settings.model is None:
        if info is None:
            return DEFAULT_MODEL
        if looks_local(info.name) and not os.path.isdir(os.path.expanduser(info.name)):
            raise ModelLoadError(
                f"this index was built with the model in {info.name!r}, which is not there any more; "
                "name its new location with --model DIR (the index checks that it is the same model)"
            )
        return info.name
    if info is None or settings.model == info.name:
        return settings.model
    from searchengine.models.retrieval import peek_fingerprints

    seen = peek_fingerprints(settings.model)
    if info.fingerprint in seen:
        return settings.model  # the same weights under another name or path
    if seen or not looks_local(settings.model):
        # A hub id whose files are not at hand could only be compared after downloading it.
        raise ModelMismatchError(
            f"this index was built with model {info.name!r} (fingerprint {info.fingerprint}); "
            f"--model {settings.model!r} is another checkpoint. Leave out --model to use the index's own, "
            f"re-embed the library with the other (searchengine reindex --model {settings.model}), or use another --data-dir"
        )
    return settings.model  # a local checkpoint in another format: loading it checks it


def captions_wanted(settings: Settings, recorded: Recorded | None) -> bool:
    return settings.captions_on(recorded.captioner[0] if recorded is not None and recorded.captioner is not None else None)


def caption_model(settings: Settings, recorded: Recorded | None, *, force: bool = False) -> str | None:
    """The captioner to load (None: no captions): --caption-model, else the index's own, else
    the default for the device. `force`: captions are the point (`searchengine caption`)."""
    if not force and not captions_wanted(settings, recorded):
        return None
    if settings.caption_model:
        return settings.caption_model
    if recorded is not None and recorded.captioner is not None and recorded.captioner[1]:
        return recorded.captioner[1]
    from searchengine.models.captioner import default_caption_model
    from searchengine.models.loading import resolve_device

    return default_caption_model(resolve_device(settings.device))


def choose(settings: Settings, recorded: Recorded | None, *, captions: bool = False) -> Choice:
    """Both models for a command that may caption, each checked to be at hand: the retrieval
    model first (a missing one is the problem to report), then the captioner."""
    model = retrieval_model(settings, recorded)
    locate(model)
    captioner = caption_model(settings, recorded) if captions else None
    return Choice(model, located_captioner(captioner) if captioner is not None else None)


def located_captioner(name: str) -> str:
    """`name`, once its files are known to be at hand (or downloadable)."""
    try:
        locate(name, "caption model")
    except ModelLoadError as e:
        raise _captioner_error(e) from e
    return name


def load_model(settings: Settings, name: str, *, serving: bool = False):
    """The retrieval model. `serving`: for a process that encodes query after query (`serve`),
    where text_backend auto puts the query encoder on ONNX Runtime on a CPU."""
    from searchengine.models.retrieval import RetrievalModel

    def query_encoder(model):
        use_threads(settings, model.device)  # before the race below measures anything
        return choose_text_encoder(settings, model, serving=serving)

    return RetrievalModel.load(
        name, device=settings.device, dtype=settings.dtype, text_max_tokens=settings.text_max_tokens, text_encoder=query_encoder,
    )


def choose_text_encoder(settings: Settings, model, *, serving: bool):
    """What encodes the model's queries: an OnnxTextEncoder, or None for torch (see
    `Settings.text_backend`)."""
    backend = text_backend(settings.text_backend, model.device, serving=serving)
    if backend == "onnx":
        from searchengine.models.onnx_text import OnnxTextEncoder

        try:
            encoder = OnnxTextEncoder(model)
        except ModelLoadError as e:
            if settings.text_backend == "onnx":
                raise
            log.warning("queries are encoded with torch: %s", e)
            return None
        return encoder if settings.text_backend == "onnx" else measured_text_backend(model, encoder)
    if settings.text_backend == "onnx":
        log.info("text_backend onnx is for CPUs; %s encodes queries with torch", model.device)
    return None


def measured_text_backend(model, encoder):
    """`text_backend auto` in a server: the encoder, or None for torch, whichever encoded a
    query faster here (onnx_text.race), with the same vectors."""
    from searchengine.models.onnx_text import race

    result = race(model, encoder)
    log.info("queries are encoded with %s: %s", "ONNX Runtime" if result.winner == "onnx" else "torch", result)
    return encoder if result.winner == "onnx" else None


def text_backend(setting: str, device: str, *, serving: bool) -> str:
    """What encodes queries: "onnx" or "torch" (see `Settings.text_backend`)."""
    if device != "cpu":
        return "torch"
    if setting != "auto":
        return setting
    import importlib.util

    installed = all(importlib.util.find_spec(m) is not None for m in ("onnxruntime", "onnx"))
    return "onnx" if serving and installed else "torch"


def use_threads(settings: Settings, device: str) -> None:
    """Torch's intra-op threads for this device (see devices.py), or as the settings say."""
    import torch

    from searchengine.config.devices import defaults_for

    threads = settings.torch_threads or defaults_for(device).torch_threads
    if threads:
        torch.set_num_threads(threads)


def load_captioner(settings: Settings, name: str | None):
    """The captioner (None for none); a failure is one line naming the flags that help."""
    if name is None:
        return None
    from searchengine.models.captioner import Captioner

    _check_int8(settings)  # its own message, not a captioner's
    try:
        return Captioner.load(
            name, device=settings.device, dtype=settings.dtype,
            max_new_tokens=settings.caption_max_tokens, num_beams=settings.caption_beams,
        )
    except ModelLoadError as e:
        raise _captioner_error(e) from e


def _captioner_error(e: ModelLoadError) -> SearchEngineError:
    text = str(e).rstrip(". ")
    if "--no-captions" in text:
        return e
    return SearchEngineError(
        f"{text}; name a captioner that can be loaded with --caption-model, or index without captions with --no-captions"
    )


def open_for_serving(settings: Settings, *, create: bool = False, model: str | None = None):
    """(model, library) for `serve`: the library first (a missing index is reported before
    any model loads), then `model`, or the one the index was built with."""
    from searchengine.library import Library

    library = Library.open(settings, create=create)
    library.background_rebuilds = True  # a library that outgrows its tier is re-indexed meanwhile
    library.maybe_retier()
    try:
        return load_model(settings, model or retrieval_model(settings, library.built_with()), serving=True), library
    except BaseException:
        library.close()
        raise


# -- what each command opens -----------------------------------------------------------------
# The CLI's commands and the API's app get their parts here, built one way: the library
# first where it exists (a missing index is reported before any model loads), models checked
# to be at hand before either loads, the captioner before the big model.


@dataclass
class ForIndexing:
    library: object  # Library, writable
    model: object  # RetrievalModel
    captioner: object | None  # Captioner, or None for no captions
    load_s: float  # seconds spent loading the models


def open_for_indexing(settings: Settings, recorded: Recorded | None) -> ForIndexing:
    """What `index` and `watch` need: a writable library (created if there is none), the
    retrieval model and the captioner the index is built with, or those the settings name."""
    import time

    from searchengine.library import Library

    Library.check_writable(settings)  # before any model loads
    t0 = time.perf_counter()
    choice = choose(settings, recorded, captions=True)
    captioner = load_captioner(settings, choice.caption_model)
    model = load_model(settings, choice.model)
    load_s = time.perf_counter() - t0
    library = Library.open(settings, create=True, writable=True)
    library.background_rebuilds = True  # the watcher's re-indexing into another tier goes on meanwhile
    return ForIndexing(library, model, captioner, load_s)


def open_for_search(settings: Settings, *, keyword_only: bool, before_model: Callable[[object], None] | None = None):
    """A Searcher for the CLI's `search` (its library: `searcher.library`). Keyword search
    loads no model and no vector index: it answers in well under a second. `before_model`
    is given the library before the model loads: a request the index alone refuses (a liked
    id it does not hold) is refused at once, not after seconds of loading."""
    from searchengine.library import Library
    from searchengine.search import Searcher

    library = Library.open(settings, vectors=not keyword_only)
    try:
        if before_model is not None:
            before_model(library)
        model = None if keyword_only else load_model(settings, retrieval_model(settings, library.built_with()))
        return Searcher(model, library, settings)
    except BaseException:
        library.close()
        raise


def open_for_captioning(settings: Settings):
    """(library, captioner) for `caption`: the index's own captioner unless one is named."""
    from searchengine.library import Library

    library = Library.open(settings, writable=True, vectors=False)
    try:
        name = caption_model(settings, library.built_with(), force=True)
        return library, load_captioner(settings, located_captioner(name))
    except BaseException:
        library.close()
        raise


def vqa_model(settings: Settings, recorded: Recorded | None) -> tuple[str | None, str]:
    """(the model that answers questions about photos, or None; why none): --vqa-model, else
    the index's captioner when it is BLIP-2 with a language model. Reads configs only."""
    from searchengine.models.vqa import EXAMPLE_VQA_MODEL, answers_questions

    if settings.vqa_model:
        return settings.vqa_model, ""
    hint = f"name one with --vqa-model (env SEARCHENGINE_VQA_MODEL), e.g. {EXAMPLE_VQA_MODEL}"
    captioner = recorded.captioner[1] if recorded is not None and recorded.captioner is not None else None
    if not captioner:
        return None, f"no model that answers questions: the index has no BLIP-2 captioner to ask; {hint}"
    from searchengine.models.loading import load_config

    try:
        _, config = load_config(captioner, "caption model")
    except ModelLoadError as e:
        return None, f"the index's captioner cannot be read to answer questions ({e}); {hint}"
    if not answers_questions(config):
        return None, f"the index's captioner {captioner!r} writes captions but answers no questions (it is no BLIP-2 model); {hint}"
    return captioner, ""


def _check_int8(settings: Settings) -> None:
    """`--dtype int8` is refused at once where it cannot run (anything but CUDA)."""
    if settings.dtype == "int8":
        from searchengine.models.loading import int8_loading, resolve_device

        int8_loading(resolve_device(settings.device))


def load_answerer(settings: Settings, name: str):
    from searchengine.models.vqa import Answerer

    return Answerer.load(name, device=settings.device, dtype=settings.dtype)


def lazy_answerer(settings: Settings, recorded: Recorded | None):
    """The server's question answerer: chosen now, loaded on the first question."""
    from searchengine.models.vqa import LazyAnswerer

    name, why = vqa_model(settings, recorded)
    return LazyAnswerer(name, why, lambda n: load_answerer(settings, n))


def query_service(settings: Settings, model, library, metrics=None):
    """The API's query service over a loaded model and library."""
    from searchengine.service import QueryService

    return QueryService(
        settings, model, library, metrics, answerer=lazy_answerer(settings, library.built_with()),
        load_model=lambda name: load_model(settings, name, serving=True),
    )
