"""The commands that read the index for a person: search, duplicates, ask."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from searchengine.app import wiring
from searchengine.app.cli.options import human
from searchengine.config.settings import Settings, settings_from_args
from searchengine.errors import IndexNotFoundError, SearchEngineError


def _search_filters(args: argparse.Namespace):
    from searchengine.search import Filters

    folder = args.folder
    if folder:
        # A folder that exists here is meant as that folder; anything else (a folder name
        # such as 'Winter 2022') is matched against the index's folders.
        local = os.path.expanduser(folder)
        if os.path.isdir(local):
            folder = os.path.realpath(local)
    return Filters.build(
        folder, args.after, args.before, camera=args.camera, lens=args.lens, file_type=args.file_type,
        orientation=args.orientation,
    )


def cmd_search(args: argparse.Namespace, out, err) -> int:
    from searchengine.search import SearchRequest, Steer, check_examples, check_filters, check_page

    settings = settings_from_args(args)
    query = " ".join(args.query).strip()
    steer = Steer.parse(args.like, args.unlike)
    if args.image and (query or steer.active):
        raise SearchEngineError("search by words (with --like/--unlike) or by --image, not both")
    if not args.image and not query and not steer.like:
        raise SearchEngineError("the query is empty: type some words that describe the picture (or --image PATH, or --like ID)")
    filters = _search_filters(args)
    keyword_only = settings.search_mode == "keyword" and not args.image
    if args.image:
        check_page(args.k, k_name="-k")
        request = None
    else:  # checked here, once, before any model loads
        request = SearchRequest.checked(
            query, settings, k=args.k, rerank=0 if args.no_rerank else None, filters=filters, steer=steer,
            min_itm=args.min_itm, names={"k": "-k", "min_itm": "--min-itm"},
        )
    example = _example_image(args.image, settings) if args.image else None
    def refusals(library) -> None:  # what the index alone answers, before the model loads
        check_filters(library, filters)
        check_examples(library, steer)

    searcher = wiring.open_for_search(settings, keyword_only=keyword_only, before_model=refusals)
    try:
        if example is not None:
            result = searcher.search_image(example, k=args.k, filters=filters)
        else:
            result = searcher.run(request)
    finally:
        searcher.library.close()
    mode = "image" if example is not None else request.mode
    if args.json:
        print(json.dumps(_result_json(result, mode), ensure_ascii=False, indent=2), file=out)
        return 0
    if args.null:
        _write_null_terminated([h.path for h in result.hits], out)
        return 0
    if args.paths:
        for h in result.hits:
            print(shown(h.path), file=out)
        return 0
    if not result.hits:
        why = " with a match probability of at least " + f"{args.min_itm:g}" if args.min_itm is not None else ""
        print("no results" + (" within the filters" if filters.active else "") + why, file=out)
        return 0
    print(f"{'rank':>4}  {'final':>7}  {'itm':>6}  {'itc':>7}  {'words':>5}  {'id':>6}  path", file=out)
    for rank, h in enumerate(result.hits, 1):
        itm = f"{h.itm:6.3f}" if h.itm is not None else f"{'-':>6}"
        itc = f"{h.itc:7.3f}" if h.itc is not None else f"{'-':>7}"
        kw = f"{h.keyword:5.2f}" if h.keyword is not None else f"{'-':>5}"
        print(f"{rank:>4}  {h.score:7.3f}  {itm}  {itc}  {kw}  {h.image_id:>6}  {shown(h.path)}", file=out)
        if h.caption:
            print(f"{'':>47}{shown(h.caption)}", file=out)
    t = result.timings_ms
    strong = ""
    if result.strong is not None:
        threshold = settings.strong_match if args.min_itm is None else args.min_itm
        strong = f"; {result.strong} strong match{'es' if result.strong != 1 else ''} (ITM P(match) >= {threshold:g})"
    print(
        f"{mode}: encode {t['encode']:.0f} ms, candidates {t['ann']:.1f} ms, "
        f"re-rank {t['rerank']:.0f} ms ({result.reranked} images){strong}",
        file=err,
    )
    return 0


def shown(text: str) -> str:
    """A name or caption as a terminal may show it: control characters escaped (a newline as
    `\\n`, ESC as `\\x1b`, as `ls` shows them) and bytes that are not UTF-8 as `\\xNN`, so
    one result is one line and nothing reaches the terminal as a command."""
    out = []
    for ch in text:
        if 0xDC80 <= ord(ch) <= 0xDCFF:  # an undecodable byte of a file name (surrogateescape)
            out.append(f"\\x{ord(ch) - 0xDC00:02x}")
        elif ord(ch) < 0x20 or 0x7F <= ord(ch) <= 0x9F:
            out.append(ch.encode("unicode_escape").decode("ascii"))
        else:
            out.append(ch)
    return "".join(out)


def _write_null_terminated(paths: list[str], out) -> None:
    """The paths as the file system has them (any byte but NUL), each followed by NUL."""
    buffer = getattr(out, "buffer", None)
    if buffer is not None:
        out.flush()
        buffer.write(b"".join(os.fsencode(p) + b"\0" for p in paths))
        buffer.flush()
    else:  # a text stream (in-process callers): the same characters
        out.write("".join(p + "\0" for p in paths))


def _example_image(path: str, settings: Settings):
    from searchengine.errors import BadImageError
    from searchengine.media.imageio import decode_image, read_file

    path = os.path.expanduser(path)
    if not os.path.lexists(path):
        raise SearchEngineError(f"cannot search by {path}: there is no such file")
    try:
        return decode_image(read_file(path), max_pixels=settings.max_image_pixels).image
    except BadImageError as e:
        raise SearchEngineError(f"cannot search by {path}: {e}") from None


def _result_json(result, mode: str) -> dict:
    return {
        "query": result.query,
        "mode": mode,
        "reranked": result.reranked,
        "strong": result.strong,
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        "results": [{"rank": rank, **h.as_json()} for rank, h in enumerate(result.hits, 1)],
    }


def cmd_duplicates(args: argparse.Namespace, out, err) -> int:
    from searchengine.search.duplicates import DEFAULT_THRESHOLD, check_threshold, find_duplicates, with_details
    from searchengine.library import Library

    settings = settings_from_args(args)
    threshold = check_threshold(DEFAULT_THRESHOLD if args.threshold is None else args.threshold)
    library = Library.open(settings)
    try:
        found = find_duplicates(library, threshold)
        groups = with_details(library, found.groups)
    finally:
        library.close()
    if args.json:
        print(json.dumps({
            "threshold": threshold, "images": found.images, "pairs_scored": found.pairs_scored,
            "timings_ms": {k: round(v, 3) for k, v in found.timings_ms.items()},
            "groups": [[{
                "id": m.id, "score": round(m.score, 6), "path": d.files[0].path, "paths": [f.path for f in d.files],
                "bytes": d.files[0].size, "width": d.width, "height": d.height, "taken_at": d.taken_at,
            } for m, d in members] for members in groups],
        }, ensure_ascii=False, indent=2), file=out)
        return 0
    if not groups:
        print(f"no near-duplicates among {found.images} images (threshold {threshold:g})", file=out)
    for n, members in enumerate(groups, 1):
        print(f"group {n}: {len(members)} photos", file=out)
        for m, d in members:
            when = (d.taken_at or "")[:10] or "-"
            print(f"  {human(d.files[0].size):>9}  {f'{d.width}x{d.height}':>11}  {when:>10}  {m.score:.3f}  {d.files[0].path}", file=out)
    t = found.timings_ms
    print(
        f"{len(groups)} group{'' if len(groups) == 1 else 's'} among {found.images} images (threshold {threshold:g}); "
        f"{found.pairs_scored} pairs "
        f"scored; {t['total'] / 1000:.1f} s",
        file=err,
    )
    return 0


def image_file(settings: Settings, image: str, recorded) -> str:
    """PATH_OR_ID -> a readable file: the path as given, or an indexed image's first file
    that is still there."""
    from searchengine.library import Library

    local = os.path.expanduser(image)
    if not (image.isdigit() and not os.path.exists(local)):
        return local
    if recorded is None:
        raise IndexNotFoundError(f"no index in {settings.data_dir} to find image {image} in; give a file's path instead")
    library = Library.open(settings, vectors=False)
    try:
        detail = library.catalog.image_detail(int(image))
    finally:
        library.close()
    paths = [f.path for f in detail.files if os.path.isfile(f.path)] if detail is not None else []
    if detail is None or not detail.files:
        raise SearchEngineError(f"no indexed image has id {image}")
    if not paths:
        raise SearchEngineError(f"image {image}'s files are gone: {', '.join(f.path for f in detail.files)}")
    return paths[0]


def cmd_ask(args: argparse.Namespace, out, err) -> int:
    from searchengine.errors import BadImageError
    from searchengine.media.imageio import decode_image, read_file
    from searchengine.library import Library
    from searchengine.models.conversation import Decoding
    from searchengine.models.vqa import VqaUnavailable, check_question

    settings = settings_from_args(args)
    decoding = Decoding(args.decoding, args.max_new_tokens, args.beams, args.top_p, args.temperature).checked()
    question = check_question(" ".join(args.question)) if args.question else None
    recorded = Library.recorded(settings)
    local = image_file(settings, args.image, recorded)
    name, why = wiring.vqa_model(settings, recorded)
    if name is None:
        raise VqaUnavailable(why)
    try:
        image = decode_image(read_file(local), max_pixels=settings.max_image_pixels).image
    except BadImageError as e:
        raise SearchEngineError(f"cannot read {local}: {e}") from None
    t0 = time.perf_counter()
    answerer = wiring.load_answerer(settings, name)
    load_ms = (time.perf_counter() - t0) * 1000
    if question is None:
        return converse(answerer, image, decoding, out, err)
    answer = answerer.chat(image, [], question, decoding)
    if args.json:
        print(json.dumps({**answer.as_json(), "image": local, "load_ms": round(load_ms, 1)}, ensure_ascii=False), file=out)
        return 0
    print(answer.answer or "(no answer)", file=out)
    print(f"{name}: load {load_ms / 1000:.1f} s, answer {answer.timings_ms['generate']:.0f} ms", file=err)
    return 0


def converse(answerer, image, decoding, out, err) -> int:
    """A conversation in the terminal: a question a line (with the line editor's history in
    a terminal), each answer printed as it is generated; Ctrl-D (or the end of the input) ends
    it. A question that cannot be asked says why and the conversation goes on."""
    import importlib
    import sys

    from searchengine.errors import QueryError
    from searchengine.models.conversation import Turn
    from searchengine.models.vqa import clipped

    interactive = sys.stdin.isatty()
    if interactive:
        importlib.import_module("readline")  # input() gets line editing and history

        print("Ask about the photo; Ctrl-D ends the conversation.", file=err)
    turns: list[Turn] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        if not line.strip():
            continue
        try:
            pieces = []
            print("photo> " if interactive else "", end="", file=out, flush=True)
            for piece in answerer.stream(image, turns, line, decoding):
                pieces.append(piece)
                print(piece, end="", file=out, flush=True)
            print(file=out, flush=True)
        except QueryError as e:
            print(f"\n{e}", file=err, flush=True)
            continue
        turns.append(Turn(" ".join(line.split()), clipped("".join(pieces))))
    if interactive:
        print(file=err)
    print(f"{len(turns)} question{'s' if len(turns) != 1 else ''} answered", file=err)
    return 0


def cmd_explain(args: argparse.Namespace, out, err) -> int:
    import numpy as np
    from PIL import Image

    from searchengine.errors import BadImageError
    from searchengine.library import Library
    from searchengine.media import heatmap
    from searchengine.media.imageio import decode_image, read_file
    from searchengine.search.request import check_query
    from searchengine.util.durable import write_atomic

    settings = settings_from_args(args)
    query = check_query(" ".join(args.query), settings.max_query_chars)
    recorded = Library.recorded(settings)
    local = image_file(settings, args.image, recorded)
    try:
        image = decode_image(read_file(local), max_pixels=settings.max_image_pixels, draft=settings.preview_size).image
    except BadImageError as e:
        raise SearchEngineError(f"cannot read {local}: {e}") from None
    model = wiring.load_model(settings, wiring.retrieval_model(settings, recorded))
    t0 = time.perf_counter()
    size = model.image_size
    heat = model.explain(query, model.vit(model.preprocess([image.resize((size, size), Image.Resampling.BICUBIC)])))
    explain_ms = (time.perf_counter() - t0) * 1000
    image.thumbnail((settings.preview_size, settings.preview_size), Image.Resampling.LANCZOS)
    if args.out:
        png = heatmap.overlay(image, heat.grid)
        write_atomic(Path(args.out).expanduser(), lambda tmp: tmp.write_bytes(png), fsync=False)
    row, column = (int(v) for v in np.unravel_index(int(np.argmax(heat.grid)), heat.grid.shape))
    if args.json:
        print(json.dumps({"image": local, "query": query, "itm": heat.itm, "grid": heat.grid.round(4).tolist(),
                          "peak": [row, column], "out": args.out, "explain_ms": round(explain_ms, 1)}), file=out)
        return 0
    rows, columns = heat.grid.shape
    print(f"P(match) {heat.itm:.3f}; strongest at row {row + 1}, column {column + 1} of {rows} x {columns}"
          + (f"; wrote {args.out} ({image.width} x {image.height})" if args.out else ""), file=out)
    print(f"{model.name}: explained in {explain_ms:.0f} ms", file=err)
    return 0
