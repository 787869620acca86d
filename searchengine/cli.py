"""The `searchengine` command: index, search, caption, stats, watch, serve, make-tiny-model.

This module is the composition root: it builds the settings, the model, the library and the
indexer or searcher, and passes them in. It is the only module of `searchengine` that reaches
into `indexer` (lazily, in the `index` command); the core never does. Errors the core raises
become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Sequence

from pydantic import ValidationError

from searchengine.captions import CPU_DEFAULT, GPU_DEFAULT
from searchengine.errors import SearchEngineError
from searchengine.settings import DEFAULT_MODEL, Settings

EXIT_ERROR = 1
EXIT_USAGE = 2


def _common(parser: argparse.ArgumentParser, *, model: bool) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--data-dir", help="where the store and index files live (default: ~/.local/share/searchengine; env SEARCHENGINE_DATA_DIR)")
    g.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    if model:
        g.add_argument("--model", help=f"hub id or local directory of a BLIP-2 retrieval model (default: {DEFAULT_MODEL}; env SEARCHENGINE_MODEL)")
        g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
        g.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype (default: auto)")
        g.add_argument("--itm-features", choices=["auto", "cache", "recompute"], help="where ITM re-ranking gets ViT features (default: auto)")


def _caption_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("captions")
    g.add_argument(
        "--captions", action=argparse.BooleanOptionalAction, default=None,
        help="caption every new image (default: on; env SEARCHENGINE_CAPTIONS)",
    )
    g.add_argument(
        "--caption-model",
        help=f"hub id or local directory of a BLIP or BLIP-2 captioner (default: {CPU_DEFAULT} on a CPU, "
        f"{GPU_DEFAULT} on a GPU; env SEARCHENGINE_CAPTION_MODEL)",
    )


def _watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", action="store_true", default=None, help="poll instead of native events (automatic on network mounts)")
    parser.add_argument("--debounce", type=float, default=1.0, metavar="SECONDS", help="quiet time before a changed file is read (default: 1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="searchengine", description="Semantic image search on BLIP-2.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("index", help="index (or update the index of) photo folders")
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    p.add_argument("--batch-size", type=int, help="images per model batch (default: 8 on a CPU, 64 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: 2)")
    p.add_argument("--max-pixels", type=int, dest="max_image_pixels", help="refuse images larger than this (default: 150M)")
    _caption_options(p)
    _common(p, model=True)

    p = sub.add_parser("search", help="search the index in words")
    p.add_argument("query")
    p.add_argument("-k", type=int, default=10, help="how many results (default: 10)")
    p.add_argument("--candidates", type=int, dest="k_candidates", help="ITC candidates taken from FAISS (default: 128)")
    p.add_argument("--rerank", type=int, dest="rerank_top", help="how many candidates ITM re-ranks (default: 20)")
    p.add_argument("--no-rerank", action="store_true", help="ITC only, no ITM re-ranking")
    p.add_argument(
        "--mode", choices=["hybrid", "semantic", "keyword"], dest="search_mode",
        help="hybrid (default): semantic and keyword candidates fused, then ITM re-rank; semantic: ITC then ITM; "
        "keyword: captions and file/folder names only. \"Quoted phrases\" and -word exclusions work in every mode",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=True)

    p = sub.add_parser("caption", help="caption the images of an index that have no caption from the caption model")
    p.add_argument("--redo", action="store_true", help="caption every image again, even those the model already captioned")
    p.add_argument("--batch-size", type=int, help="images per caption batch (default: 8 on a CPU, 32 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: 2)")
    _caption_options(p)
    _common(p, model=False)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], help="model dtype (default: auto)")

    p = sub.add_parser("stats", help="what the index holds")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=False)

    p = sub.add_parser("watch", help="keep the index in step with folders (runs until stopped)")
    p.add_argument("folders", nargs="+", metavar="FOLDER")
    _watch_options(p)
    _caption_options(p)
    _common(p, model=True)

    p = sub.add_parser("serve", help="serve the web UI and the HTTP API")
    p.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: 8000)")
    p.add_argument("--watch", nargs="+", metavar="FOLDER", default=[], help="also watch these folders")
    _watch_options(p)
    _caption_options(p)
    _common(p, model=True)

    p = sub.add_parser("make-tiny-model", help="write a tiny random BLIP-2 retrieval model or captioner (for tests and trials)")
    p.add_argument("directory")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kind", choices=["retrieval", "blip", "blip2"], default="retrieval",
        help="retrieval (default): Blip2ForImageTextRetrieval; blip, blip2: a BLIP or BLIP-2 captioner",
    )
    p.add_argument(
        "--size", choices=["tiny", "real"], default="tiny",
        help="'real': the blip2-itm-vit-g (or blip-image-captioning-base) architecture, random weights",
    )
    return parser


def _settings(args: argparse.Namespace) -> Settings:
    keys = ("data_dir", "model", "device", "dtype", "itm_features", "batch_size", "decode_workers",
            "max_image_pixels", "k_candidates", "rerank_top", "host", "port", "captions", "caption_model", "search_mode")
    values = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if values.get("caption_model") and "captions" not in values:
        values["captions"] = True  # naming a captioner asks for captions
    return Settings(**values)


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    if not verbose:  # the hub client logs every retry of an unreachable host as a warning
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _load_model(settings: Settings):
    from searchengine.models import RetrievalModel

    return RetrievalModel.load(
        settings.model, device=settings.device, dtype=settings.dtype, text_max_tokens=settings.text_max_tokens
    )


def _load_captioner(settings: Settings):
    """The captioner the settings ask for (None with --no-captions); fails with one clear line."""
    if not settings.captions:
        return None
    from searchengine.captions import Captioner, default_caption_model
    from searchengine.errors import ModelLoadError
    from searchengine.models import resolve_device

    name = settings.caption_model or default_caption_model(resolve_device(settings.device))
    try:
        return Captioner.load(
            name, device=settings.device, dtype=settings.dtype,
            max_new_tokens=settings.caption_max_tokens, num_beams=settings.caption_beams,
        )
    except ModelLoadError as e:
        raise SearchEngineError(
            f"{e}. Name a captioner that can be loaded with --caption-model, or index without captions with --no-captions"
        ) from e


# -- commands -----------------------------------------------------------------------------


def cmd_index(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from indexer.pipeline import Indexer
    from searchengine.library import Library

    settings = _settings(args)
    for folder in args.folders:  # fail before loading a 5 GB model
        if not os.path.isdir(os.path.expanduser(folder)):
            raise SearchEngineError(f"{folder!r} is not a folder" if os.path.exists(folder) else f"folder {folder!r} does not exist")
    Library.check_writable(settings)
    captioner = _load_captioner(settings)  # before any work: a captioner that cannot load stops the run
    model = _load_model(settings)
    library = Library.open(settings, create=True, writable=True)
    bar = tqdm(total=0, unit="img", file=err, disable=None, dynamic_ncols=True)

    def on_skip(path: str, message: str) -> None:
        bar.write(f"skipping {path}: {message}", file=err)

    def on_caption_error(path: str, message: str) -> None:
        bar.write(f"no caption for {path}: {message}", file=err)

    def on_total(n: int) -> None:
        bar.reset(total=n)

    try:
        indexer = Indexer(
            model, library, settings, on_skip=on_skip, progress=bar.update, on_total=on_total,
            captioner=captioner, on_caption_error=on_caption_error,
        )
        summary = indexer.run(args.folders)
    finally:
        bar.close()
        library.close()
    rate = summary.indexed / summary.seconds if summary.seconds > 0 else 0.0
    line = (
        f"{summary.indexed} indexed, {summary.linked} duplicates linked, {summary.unchanged} unchanged, "
        f"{summary.removed} removed, {summary.skipped} skipped"
    )
    if summary.failed:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(summary.failed.items())) + ")"
    if summary.links_skipped:
        line += f", {summary.links_skipped} folder link{'s' if summary.links_skipped > 1 else ''} not followed (loops or already listed)"
    if captioner is not None:
        line += f"; {summary.captioned} captioned" + (f", {summary.caption_failed} without caption" if summary.caption_failed else "")
    print(f"{line}; {summary.seconds:.1f} s ({rate:.2f} images/s)", file=out)
    return 0


def cmd_caption(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from indexer.captioning import Recaptioner
    from searchengine.library import Library

    settings = _settings(args)
    if not settings.captions:
        raise SearchEngineError("`caption` with --no-captions has nothing to do")
    # Before the model: a missing or read-only index is reported at once.
    library = Library.open(settings, writable=True)
    try:
        captioner = _load_captioner(settings)
        bar = tqdm(total=0, unit="img", file=err, disable=None, dynamic_ncols=True)
        try:
            summary = Recaptioner(
                captioner, library, settings,
                on_error=lambda path, message: bar.write(f"no caption for {path}: {message}", file=err),
                progress=bar.update, on_total=lambda n: bar.reset(total=n),
            ).run(redo=args.redo)
        finally:
            bar.close()
    finally:
        library.close()
    rate = summary.captioned / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.captioned} captioned with {captioner.name}, {summary.failed} failed; "
        f"{summary.seconds:.1f} s ({rate:.2f} images/s)",
        file=out,
    )
    return 0


def cmd_search(args: argparse.Namespace, out, err) -> int:
    from searchengine.library import Library
    from searchengine.search import Searcher, parse_for_mode

    settings = _settings(args)
    if not args.query.strip():
        raise SearchEngineError("the query is empty: type some words that describe the picture")
    if args.k < 1:
        raise SearchEngineError("-k must be at least 1")
    parse_for_mode(args.query, settings.search_mode)
    library = Library.open(settings)  # before the model: a missing index is reported at once
    try:
        searcher = Searcher(_load_model(settings), library, settings)
        result = searcher.search(args.query, k=args.k, rerank=0 if args.no_rerank else None)
    finally:
        library.close()
    if args.json:
        print(json.dumps(_result_json(result, settings.search_mode), ensure_ascii=False, indent=2), file=out)
        return 0
    if not result.hits:
        print("no results" + ("" if len(library.index or ()) else ": the index is empty"), file=out)
        return 0
    print(f"{'rank':>4}  {'final':>7}  {'itm':>6}  {'itc':>7}  {'words':>5}  path", file=out)
    for rank, h in enumerate(result.hits, 1):
        itm = f"{h.itm:6.3f}" if h.itm is not None else f"{'-':>6}"
        kw = f"{h.keyword:5.2f}" if h.keyword is not None else f"{'-':>5}"
        print(f"{rank:>4}  {h.score:7.3f}  {itm}  {h.itc:7.3f}  {kw}  {h.path}", file=out)
        if h.caption:
            print(f"{'':>39}{h.caption}", file=out)
    t = result.timings_ms
    print(
        f"{settings.search_mode}: encode {t['encode']:.0f} ms, candidates {t['ann']:.1f} ms, "
        f"re-rank {t['rerank']:.0f} ms ({result.reranked} images)",
        file=err,
    )
    return 0


def _result_json(result, mode: str) -> dict:
    return {
        "query": result.query,
        "mode": mode,
        "reranked": result.reranked,
        "timings_ms": {k: round(v, 3) for k, v in result.timings_ms.items()},
        "results": [
            {
                "rank": rank,
                "id": h.image_id,
                "path": h.path,
                "paths": h.paths,
                "score": h.score,
                "itm": h.itm,
                "itc": h.itc,
                "keyword": h.keyword,
                "caption": h.caption,
                "width": h.width,
                "height": h.height,
                "taken_at": h.taken_at,
                "camera": h.camera,
            }
            for rank, h in enumerate(result.hits, 1)
        ],
    }


def cmd_stats(args: argparse.Namespace, out, err) -> int:
    from searchengine.library import Library

    settings = _settings(args)
    library = Library.open(settings)
    try:
        data = library.describe()
    finally:
        library.close()
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2), file=out)
        return 0
    print(f"data dir     {data['data_dir']}", file=out)
    if data["model"]:
        print(f"model        {data['model']} (fingerprint {data['model_fingerprint']}, {data['model_dtype']})", file=out)
    else:
        print("model        -", file=out)
    print(f"images       {data['images']} ({data['files']} files)", file=out)
    print(f"index        {data['index_type']}, {data['vectors']} vectors", file=out)
    print("on disk      " + ", ".join(f"{k} {_human(v)}" for k, v in data["bytes_on_disk"].items()), file=out)
    models = ", ".join(f"{m}: {n}" for m, n in sorted(data["caption_models"].items()))
    print(
        f"captions     {data['captioned']} of {data['images']}" + (f" ({models})" if models else "")
        + (f", {data['caption_failures']} failed (`searchengine caption` retries them)" if data["caption_failures"] else ""),
        file=out,
    )
    print(f"folders      {', '.join(data['roots']) or '-'}", file=out)
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(data["failures_by_reason"].items()))
    print(f"failed       {data['failed']}" + (f" ({reasons})" if data["failed"] else ""), file=out)
    for f in data["failures"]:
        print(f"  {f['path']}: {f['error']}", file=out)
    if data["failed"] > len(data["failures"]):
        print(f"  ... and {data['failed'] - len(data['failures'])} more (--json lists the first {len(data['failures'])})", file=out)
    return 0


def cmd_watch(args: argparse.Namespace, out, err) -> int:
    import signal
    import threading

    from indexer.pipeline import Indexer
    from indexer.watch import Watcher
    from searchengine.library import Library

    settings = _settings(args)
    for folder in args.folders:
        if not os.path.isdir(os.path.expanduser(folder)):
            raise SearchEngineError(f"folder {folder!r} does not exist")
    Library.check_writable(settings)
    logging.getLogger("indexer").setLevel(logging.INFO)
    captioner = _load_captioner(settings)
    model = _load_model(settings)
    library = Library.open(settings, create=True, writable=True)
    indexer = Indexer(
        model, library, settings, captioner=captioner,
        on_skip=lambda p, m: print(f"skipping {p}: {m}", file=err, flush=True),
        on_caption_error=lambda p, m: print(f"no caption for {p}: {m}", file=err, flush=True),
    )
    watcher = Watcher(indexer, args.folders, poll=args.poll, debounce_s=args.debounce)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    summary = watcher.start()
    print(f"caught up: {summary.indexed} indexed, {summary.removed} removed; watching "
          + ", ".join(f"{root} ({mode})" for root, mode in watcher.modes.items()), file=out, flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        watcher.stop()
        library.close()
    return 0


def _watch_in_server(settings: Settings, args: argparse.Namespace, captioner):
    """The `serve --watch` hook: a watcher in the server's process, with its loaded model."""

    def on_ready(service):
        from indexer.pipeline import Indexer
        from indexer.watch import Watcher
        from searchengine.library import Library

        library = Library.open(settings, create=True, writable=True)
        # service.model is the locked model: indexing and queries take turns on it.
        indexer = Indexer(service.model, library, settings, captioner=captioner)
        watcher = Watcher(indexer, args.watch, poll=args.poll, debounce_s=args.debounce)
        watcher.start()
        logging.getLogger("indexer.watch").info("watching %s", watcher.modes)

        def stop() -> None:
            watcher.stop()
            library.close()

        return stop

    return on_ready


def cmd_serve(args: argparse.Namespace, out, err) -> int:
    import ipaddress

    import uvicorn

    from searchengine.api import create_app

    settings = _settings(args)
    try:
        loopback = ipaddress.ip_address(settings.host).is_loopback
    except ValueError:
        loopback = settings.host == "localhost"
    if not loopback and settings.api_key is None:
        print(
            f"searchengine: warning: serving on {settings.host} without an API key: anyone who can reach it sees "
            "your photos; set SEARCHENGINE_API_KEY",
            file=err,
        )
    for folder in args.watch:
        if not os.path.isdir(os.path.expanduser(folder)):
            raise SearchEngineError(f"folder {folder!r} does not exist")
    if args.watch:
        from searchengine.library import Library

        Library.check_writable(settings)  # a read-only index can be served, not watched
    logging.getLogger("searchengine").setLevel(logging.INFO)
    logging.getLogger("indexer").setLevel(logging.INFO)
    # The captioner loads before the server starts, so one that cannot load stops `serve --watch`
    # with one line, rather than leaving a server that indexes without captions.
    on_ready = _watch_in_server(settings, args, _load_captioner(settings)) if args.watch else None
    app = create_app(settings, on_ready=on_ready)
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info")
    return 0


def cmd_make_tiny_model(args: argparse.Namespace, out, err) -> int:
    from searchengine.tiny import build_tiny_captioner, build_tiny_model

    if args.kind == "retrieval":
        path = build_tiny_model(args.directory, seed=args.seed, size=args.size)
        what = "BLIP-2 retrieval model"
    else:
        path = build_tiny_captioner(args.directory, kind=args.kind, seed=args.seed, size=args.size)
        what = f"{'BLIP' if args.kind == 'blip' else 'BLIP-2'} captioner"
    print(f"wrote a {args.size} random {what} to {path}", file=out)
    return 0


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
    "caption": cmd_caption,
    "stats": cmd_stats,
    "watch": cmd_watch,
    "serve": cmd_serve,
    "make-tiny-model": cmd_make_tiny_model,
}


def main(argv: Sequence[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    args = build_parser().parse_args(argv)
    try:
        _quiet_libraries(args.__dict__.get("verbose", False))
        return COMMANDS[args.command](args, out, err)
    except SearchEngineError as e:
        print(f"searchengine: error: {e}", file=err)
        return EXIT_ERROR
    except ValidationError as e:  # a setting out of range, from a flag or the environment
        problems = "; ".join(f"{'.'.join(map(str, x['loc']))}: {x['msg']}" for x in e.errors())
        print(f"searchengine: error: invalid setting: {problems}", file=err)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("searchengine: interrupted", file=err)
        return 130
    except BrokenPipeError:  # `searchengine search ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # pydantic validation of settings, and anything unforeseen: one line
        if args.__dict__.get("verbose"):
            raise
        print(f"searchengine: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} (run with -v for details)", file=err)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
