"""One image: its metadata, thumbnail, preview and original file (read on a pool of their own),
and questions about it."""

from __future__ import annotations

import asyncio
import json
import logging
import mimetypes
import time
from typing import Iterator

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response, StreamingResponse
from starlette.background import BackgroundTask

from searchengine.app.api.deps import Files, ImageId, Service
from searchengine.app.api.schemas import FILE_RESPONSES, AskIn, AskOut, ChatIn, ChatOut, ErrorOut, ImageOut, VqaOut
from searchengine.errors import SearchEngineError
from searchengine.models.vqa import clipped

log = logging.getLogger(__name__)

router = APIRouter()


@router.get("/api/images/{image_id}", response_model=ImageOut, responses={404: {"model": ErrorOut}})
def image(service: Service, image_id: ImageId):
    """An image's metadata and files."""
    return ImageOut.of(service.image(image_id))


@router.get("/api/images/{image_id}/thumbnail", response_class=Response, responses=FILE_RESPONSES)
async def thumbnail(service: Service, files: Files, image_id: ImageId):
    """A small JPEG of the image, made once and kept."""
    jpeg = await files.run(service.thumbnail, image_id)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/api/images/{image_id}/preview", response_class=Response, responses=FILE_RESPONSES)
async def preview(service: Service, files: Files, image_id: ImageId):
    """A screen-sized JPEG of the image (longest side `preview_size`, 1600 px), made on first request and kept."""
    jpeg = await files.run(service.preview, image_id)
    return Response(jpeg, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=86400"})


@router.get("/api/images/{image_id}/file", response_class=FileResponse, responses=FILE_RESPONSES)
async def original(service: Service, files: Files, image_id: ImageId):
    """The original file, with its content type: read from the descriptor it was checked on
    (searchengine/media/indexed_file.py), never opened again by name."""
    opened = await files.run(service.file, image_id)
    media_type = mimetypes.guess_type(opened.path)[0] or "application/octet-stream"

    def body():
        try:
            yield from opened.chunks()
        finally:  # also when the client goes away mid-file
            opened.close()

    headers = {"Cache-Control": "private, max-age=3600", "Content-Length": str(opened.size)}
    return StreamingResponse(body(), media_type=media_type, headers=headers, background=BackgroundTask(opened.close))


@router.post(
    "/api/images/{image_id}/ask", response_model=AskOut,
    responses={404: {"model": ErrorOut}, 503: {"model": ErrorOut, "description": "no model here answers questions (why, in the message)"}},
)
async def ask(service: Service, image_id: ImageId, body: AskIn):
    """Ask a question about the photo ("What breed is the dog?"); BLIP-2 with a language model
    answers, prompted `Question: {question} Answer:`. The model loads on the first question."""
    answer = await asyncio.to_thread(service.ask, image_id, body.question)
    return AskOut(**answer.as_json())


@router.post(
    "/api/images/{image_id}/chat", response_model=ChatOut,
    responses={
        200: {"content": {"text/event-stream": {}}, "description": "the answer; with `stream`, as server-sent events"},
        404: {"model": ErrorOut}, 503: {"model": ErrorOut, "description": "no model here answers questions (why, in the message)"},
    },
)
async def chat(service: Service, image_id: ImageId, body: ChatIn):
    """A conversation about the photo: the turns so far (the server keeps none) and a new
    question, put to BLIP-2 as LAVIS prompts multi-turn VQA ("Question: ... Answer: ...."),
    the oldest turns cut where the model's context is full. With `stream`, the answer comes as
    server-sent events: `data: {"text": ...}` per piece as it is generated, then `event: done`
    with the whole answer, or `event: error`."""
    turns, decoding = body.conversation()
    if not body.stream:
        answer = await asyncio.to_thread(service.chat, image_id, turns, body.question, decoding)
        return ChatOut(**answer.as_json(), kept_turns=answer.kept_turns)
    model, kept, pieces = await asyncio.to_thread(service.chat_stream, image_id, turns, body.question, decoding)
    return StreamingResponse(sse(body.question, model, kept, pieces), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


def sse(question: str, model: str, kept: int, pieces) -> Iterator[str]:
    """Server-sent events of an answer's pieces (run in the thread pool: `pieces` blocks). A
    client that goes away closes this generator, and with it the generation."""
    t0 = time.perf_counter()
    first, text = None, []
    try:
        for piece in pieces:
            if first is None:
                first = (time.perf_counter() - t0) * 1000
            text.append(piece)
            yield f"data: {json.dumps({'text': piece})}\n\n"
    except Exception as e:  # noqa: BLE001 - the status line has gone: say it in the stream
        log.exception("the answer stopped while it streamed")
        said = str(e) if isinstance(e, SearchEngineError) else "the answer could not be finished (the server's log says why)"
        yield f"event: error\ndata: {json.dumps({'error': said})}\n\n"
        return
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            close()
    total = (time.perf_counter() - t0) * 1000
    done = {"question": question, "answer": clipped("".join(text)), "model": model, "kept_turns": kept,
            "timings_ms": {"first_piece": first if first is not None else total, "total": total}}
    yield f"event: done\ndata: {json.dumps(done)}\n\n"


@router.get("/api/vqa", response_model=VqaOut)
def vqa(service: Service):
    """Whether questions about photos can be asked here, with which model, or why not."""
    available, model, reason = service.answerer.status()
    return VqaOut(available=available, model=model, reason=reason)
