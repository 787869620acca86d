"""The `searchengine` command: index, search, caption, stats, watch, serve, make-tiny-model.

This module is the composition root: it builds the settings, the model, the library and the
indexer or searcher, and passes them in. It is the only module of `searchengine` that reaches
into `indexer` (lazily, in the `index` command); the core never does. Errors the core raises
become one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
import time
from datetime import date, datetime
from typing import Sequence

from pydantic import ValidationError

from searchengine import __version__
from searchengine.util import locks
from searchengine.app import wiring
from searchengine.util.nearest import missing_folder
from searchengine.app import tuning_cli as cli_models
from searchengine.models.captioner import CPU_DEFAULT, GPU_DEFAULT
from searchengine.media.imageio import FILE_TYPES, ORIENTATIONS
from searchengine.errors import IndexNotFoundError, SearchEngineError, StoreDamagedError, StoreMissingError
from searchengine.config.settings import DEFAULT_MODEL, Settings, settings_from_args

EXIT_ERROR = 1
EXIT_USAGE = 2
DTYPES = ["auto", "float32", "bfloat16", "float16", "int8"]
DTYPE_HELP = "model dtype (default: auto); int8: the captioner and question model in 8 bits (CUDA, bitsandbytes)"


def _links_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--links", choices=["folders", "none", "all"],
        help="which symlinks to follow: folders (linked folders anywhere; file links only when they lead into "
        "the indexed folders), none (nothing outside the folders), all (anything). Default: as the index was "
        "built; folders for a new index; env SEARCHENGINE_LINKS",
    )


def _common(parser: argparse.ArgumentParser, *, model: bool) -> None:
    g = parser.add_argument_group("common options")
    g.add_argument("--data-dir", help="where the index lives (default: ~/.local/share/searchengine; env SEARCHENGINE_DATA_DIR)")
    g.add_argument(
        "--database", dest="database_url", metavar="URL",
        help="keep the store in a database server, e.g. postgresql+psycopg://user:pass@host/db (default: a SQLite file "
        "in the data dir; env SEARCHENGINE_DATABASE_URL); the data dir still holds this machine's FAISS index and caches",
    )
    g.add_argument("-v", "--verbose", action="store_true", help="log what happens")
    if model:
        g.add_argument(
            "--model",
            help=f"hub id or local directory of a BLIP-2 retrieval model (default: the model the index was built with; "
            f"for a new index {DEFAULT_MODEL}; env SEARCHENGINE_MODEL)",
        )
        g.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
        g.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)
        g.add_argument(
            "--itm-features", choices=["auto", "cache", "cache-int8", "recompute"],
            help="where ITM re-ranking gets ViT features: cache (fp16), cache-int8 (half the disk), recompute (default: auto)",
        )
        g.add_argument(
            "--text-backend", choices=["auto", "torch", "onnx"],
            help="how a CPU encodes queries: torch, or onnx (ONNX Runtime, 3.4x faster; pip install onnxruntime onnx); "
            "default auto: onnx in serve where ONNX Runtime is installed, torch elsewhere",
        )


def _caption_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("captions")
    g.add_argument(
        "--captions", action=argparse.BooleanOptionalAction, default=None,
        help="caption every new image (default: as the index was built; on for a new index; env SEARCHENGINE_CAPTIONS)",
    )
    g.add_argument(
        "--caption-model",
        help=f"hub id or local directory of a BLIP or BLIP-2 captioner (default: the index's captioner; for a new index "
        f"{CPU_DEFAULT} on a CPU, {GPU_DEFAULT} on a GPU; env SEARCHENGINE_CAPTION_MODEL)",
    )


def _vqa_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vqa-model",
        help="hub id or local directory of a BLIP-2 model with a language model that answers questions about photos "
        "(default: the index's captioner when it is one; env SEARCHENGINE_VQA_MODEL)",
    )


def _watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", action="store_true", default=None, help="poll instead of native events (automatic on network mounts)")
    parser.add_argument("--debounce", type=float, default=1.0, metavar="SECONDS", help="quiet time before a changed file is read (default: 1)")


def _filter_options(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("filters")
    g.add_argument("--folder", help="only images below this folder: a path, ~/..., or a folder name such as 'Winter 2022'")
    g.add_argument("--after", type=_date, metavar="DATE", help="only images taken on or after DATE (YYYY-MM-DD or an ISO date-time)")
    g.add_argument("--before", type=_date, metavar="DATE", help="only images taken on or before DATE (YYYY-MM-DD or an ISO date-time)")
    g.add_argument("--camera", help="only images from this camera (as search --json shows it)")
    g.add_argument("--lens", help="only images taken with this lens (EXIF lens model)")
    g.add_argument("--type", dest="file_type", choices=list(FILE_TYPES), help="only images with a file of this type")
    g.add_argument("--orientation", choices=ORIENTATIONS, help="only images of this shape")


def _date(text: str) -> date:
    try:
        return datetime.fromisoformat(text) if "T" in text or " " in text.strip() else date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date: write it as YYYY-MM-DD (or YYYY-MM-DDTHH:MM)") from None


EXAMPLES = {
    "main": """\
examples:
  searchengine index ~/Pictures              index a folder (run again: only what changed)
  searchengine search a dog on a beach       search in words
  searchengine serve                         the web UI and HTTP API on http://127.0.0.1:8000
  searchengine COMMAND --help                what each command takes

Every option is also an environment variable: --data-dir is SEARCHENGINE_DATA_DIR, and so on.""",
    "index": """\
examples:
  searchengine index ~/Pictures /mnt/photos      index these folders (again: only what changed)
  searchengine index                             re-scan every folder the index already has
  searchengine index ~/Pictures --no-captions    faster: no captions (`searchengine caption` adds them later)
  searchengine index ~/Pictures --model DIR      a local model directory (no download)""",
    "search": """\
examples:
  searchengine search a dog on a beach                words (quotes are optional)
  searchengine search 'beach -dog "at sunset"'        -word leaves out, "a phrase" must match
  searchengine search beach --folder 'Winter 2022' --after 2022-12-01
  searchengine search --image ~/query.jpg             photos like this one
  searchengine search beach --like 42 --unlike 17:0.5  steer by indexed images (ids from --json)
  searchengine search a red car --min-itm 0.8         only strong matches (ITM P(match) >= 0.8)
  searchengine search sunset -0 | xargs -0 ls -l      paths only, NUL-ended, for pipes (-f: one a line)
  searchengine search dogs --mode keyword            words in captions and file names only (no model loaded)""",
    "caption": """\
examples:
  searchengine caption                                       caption what has no caption yet
  searchengine caption --caption-model Salesforce/blip2-opt-2.7b-coco --redo""",
    "stats": """\
examples:
  searchengine stats
  searchengine stats --json | jq .failures""",
    "watch": """\
examples:
  searchengine watch                      keep every folder of the index up to date
  searchengine watch ~/Pictures --poll    poll (network mounts are polled anyway)""",
    "serve": """\
examples:
  searchengine serve                           http://127.0.0.1:8000
  searchengine serve --watch ~/Pictures        and keep the index live
  SEARCHENGINE_API_KEY=secret searchengine serve --host 0.0.0.0""",
    "check": """\
examples:
  searchengine check
  searchengine check --json""",
    "backup": """\
examples:
  searchengine backup          (made after every index run that changed something anyway)""",
    "restore": """\
examples:
  searchengine restore --list
  searchengine restore                                  the newest backup
  searchengine restore store-20261123T101500.000000-42.db""",
    "reindex": """\
examples:
  searchengine reindex --model ~/models/catalogue-blip2    re-embed with a fine-tuned model (serve keeps going)
  searchengine reindex --model Salesforce/blip2-itm-vit-g  back to the original""",
    "duplicates": """\
examples:
  searchengine duplicates
  searchengine duplicates --threshold 0.9          looser: more edits count as the same photo
  searchengine duplicates --json | jq '.groups[0]'""",
    "ask": """\
examples:
  searchengine ask ~/Pictures/dog.jpg what breed is the dog?
  searchengine ask 42 is it raining?                         an indexed image, by its id
  searchengine ask 42 how many people are there --vqa-model Salesforce/blip2-opt-2.7b""",
    "make-tiny-model": """\
examples:
  searchengine make-tiny-model /tmp/tiny-blip2
  searchengine make-tiny-model /tmp/tiny-captioner --kind blip
  searchengine index ~/Pictures --model /tmp/tiny-blip2 --caption-model /tmp/tiny-captioner""",
}
EXAMPLES.update(cli_models.EXAMPLES)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="searchengine", description="Semantic image search on BLIP-2: index photo folders, search them in words.",
        epilog=EXAMPLES["main"], formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"searchengine {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, help: str, description: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(name, help=help, description=description, epilog=EXAMPLES[name], formatter_class=fmt)
        return commands[name]

    p = command(
        "index", "index (or update the index of) photo folders",
        "Embed and caption every photo below the folders. Run again, it handles only what changed: new and "
        "changed files are embedded, moved files keep their entry, deleted files leave the index.",
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folders to index (default: every folder the index already has)")
    p.add_argument(
        "--prune", action="store_true",
        help="scan a folder that looks unmounted (empty, or no longer a mount point) as it is, so that its "
        "images leave the index (without it they are kept until it is back)",
    )
    p.add_argument("--batch-size", type=int, help="images per model batch (default: 8 on a CPU, 64 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: one per core)")
    p.add_argument("--max-pixels", type=int, dest="max_image_pixels", help="refuse images larger than this (default: 150M)")
    p.add_argument(
        "--runner", choices=["local", "ray"], default="local",
        help="local: this machine's threads (default); ray: Ray Data on a cluster (pip install 'searchengine[ray]'; "
        "the folders must be at the same path on every node)",
    )
    p.add_argument(
        "--ray-address", metavar="ADDRESS",
        help="with --runner ray: auto (the cluster this machine is in), ray://HOST:PORT, or none to start Ray here",
    )
    _links_option(p)
    _caption_options(p)
    _common(p, model=True)

    p = command(
        "search", "search the index in words, or by an example image",
        "Rank the index's photos for a query in words (or like an example image) and print the best.",
    )
    p.add_argument("query", nargs="*", metavar="WORDS", help="what to look for; words starting with - leave out what they match")
    p.add_argument("--image", metavar="PATH", help="search by this example image instead of words")
    p.add_argument("-k", type=int, default=10, help="how many results (default: 10)")
    p.add_argument("--candidates", type=int, dest="k_candidates", help="ITC candidates taken from FAISS (default: 128)")
    p.add_argument("--rerank", type=int, dest="rerank_top", help="how many candidates ITM re-ranks (default: 20)")
    p.add_argument("--no-rerank", action="store_true", help="ITC only, no ITM re-ranking")
    p.add_argument(
        "--mode", choices=["hybrid", "semantic", "keyword"], dest="search_mode",
        help="hybrid (default): semantic and keyword candidates fused, then ITM re-rank; semantic: ITC then ITM; "
        "keyword: captions and file/folder names only, no model loaded. \"Quoted phrases\" and -word exclusions work in every mode",
    )
    p.add_argument(
        "--like", action="append", default=[], metavar="ID[:WEIGHT]",
        help="steer towards an indexed image (its id from --json or the UI; weight 1 by default); repeatable. "
        "Alone, without words: photos like these",
    )
    p.add_argument(
        "--unlike", action="append", default=[], metavar="ID[:WEIGHT]",
        help="steer away from an indexed image (it and its look-alikes drop); repeatable",
    )
    p.add_argument(
        "--min-itm", type=float, metavar="P",
        help="only matches: keep re-ranked results whose ITM match probability is at least P (0 to 1)",
    )
    _filter_options(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("-f", "--paths", action="store_true",
                     help="print only the paths, one per line; control characters in a name are escaped (\\n, \\x1b)")
    out.add_argument("-0", "--null", action="store_true",
                     help="print only the paths, exactly as they are, each ended by a NUL byte (for xargs -0)")
    _common(p, model=True)

    p = command(
        "caption", "caption the images of an index that have no caption from the caption model",
        "Caption the indexed images that have no caption from the caption model (or whose captioning failed). "
        "Nothing is re-embedded.",
    )
    p.add_argument("--redo", action="store_true", help="caption every image again, even those the model already captioned")
    p.add_argument("--batch-size", type=int, help="images per caption batch (default: 8 on a CPU, 32 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: one per core)")
    _caption_options(p)
    _common(p, model=False)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)

    p = command("stats", "what the index holds", "Images, files, failures by reason, model, captions and sizes on disk.")
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=False)

    p = command(
        "watch", "keep the index in step with folders (runs until stopped)",
        "Catch up with what changed, then follow the folders: new, changed, moved and deleted files are handled "
        "as they settle. Each file handled is logged by name.",
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folders to watch (default: every folder the index has)")
    _watch_options(p)
    _links_option(p)
    _caption_options(p)
    _common(p, model=True)

    p = command(
        "duplicates", "list groups of near-duplicate photos (never deletes anything)",
        "Group the indexed photos that are near-duplicates of each other: resized, re-encoded, lightly cropped "
        "or edited copies, bursts. Each group lists its photos with size, dimensions and date, to see which to "
        "keep. Exact copies are one image already (its paths are listed together). Read-only.",
    )
    p.add_argument(
        "--threshold", type=float, default=None,
        help="image-to-image score (0.5 to 1) at or above which two photos are near-duplicates (default: 0.95)",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=False)

    p = command(
        "ask", "ask a question about a photo (BLIP-2 with a language model answers)",
        "Answer a question about a photo: a file, or an indexed image by its id. The model is --vqa-model, "
        "else the index's captioner when it is BLIP-2 with a language model.",
    )
    p.add_argument("image", metavar="PATH_OR_ID", help="an image file, or an indexed image's id (from search --json or the UI)")
    p.add_argument("question", nargs="+", metavar="QUESTION", help="the question, e.g. what breed is the dog?")
    _vqa_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=False)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)

    p = command("serve", "serve the web UI and the HTTP API", "Serve the search page and the JSON API (OpenAPI at /docs).")
    _vqa_option(p)
    p.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: 8000)")
    p.add_argument("--watch", nargs="+", metavar="FOLDER", default=[], help="also watch these folders (and create the index if there is none)")
    _watch_options(p)
    _links_option(p)
    _caption_options(p)
    _common(p, model=True)

    p = command(
        "check", "check the index: store, vector index, caches and files against each other",
        "Check every part of the index against the store, changing nothing. Exits 1 when something needs "
        "repair: derived files are repaired by the next index, watch or serve; a damaged store by restore.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    _common(p, model=False)

    p = command("backup", "back up the store now", "Make a backup of the store in the data dir's backups/ folder.")
    _common(p, model=False)

    p = command(
        "restore", "put a backup of the store back",
        "Replace the store with a backup (the newest by default), after checking it. Stop `serve` and `watch` "
        "first. The vector index and the caches follow the restored store when it is next opened; "
        "`searchengine index` then adds what came after the backup.",
    )
    p.add_argument("backup", nargs="?", metavar="BACKUP", help="a backup's file name (see `stats`) or path (default: the newest)")
    p.add_argument("--list", action="store_true", help="list the backups and restore nothing")
    _common(p, model=False)

    p = command(
        "reindex", "re-embed every image with another retrieval model",
        "Re-embed the whole index with another BLIP-2 retrieval model (a fine-tuned one, say), in the "
        "background: search and serve go on with the old model until every image is done, then the new "
        "model takes over at once (a running `serve` switches to it). Captions and metadata are kept. "
        "Interrupted, the same command goes on where it stopped; the old index stays in use until the end.",
    )
    p.add_argument("--batch-size", type=int, help="images per model batch (default: 8 on a CPU, 64 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: one per core)")
    _common(p, model=True)

    p = command(
        "make-tiny-model", "write a tiny random BLIP-2 retrieval model or captioner (for tests and trials)",
        "Write a small model with random weights: everything runs with it, in seconds and offline, but its "
        "rankings and captions mean nothing.",
    )
    p.add_argument("directory", help="where to write it (a new or empty folder)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument(
        "--kind", choices=["retrieval", "blip", "blip2"], default="retrieval",
        help="retrieval (default): Blip2ForImageTextRetrieval; blip, blip2: a BLIP or BLIP-2 captioner",
    )
    p.add_argument(
        "--size", choices=["tiny", "real"], default="tiny",
        help="'real': the blip2-itm-vit-g (or blip-image-captioning-base) architecture, random weights",
    )
    cli_models.add_parsers(command, _common)
    parser.commands = commands  # type: ignore[attr-defined]
    return parser


def _dash_words_as_query(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`searchengine search beach -dog`: a word that starts with '-' but is no option of
    `search` is a query word (an exclusion), where argparse would reject it."""
    if not argv or argv[0] != "search":
        return argv
    takes_value: set[str] = set()
    flags: set[str] = set()
    for action in parser.commands["search"]._actions:  # type: ignore[attr-defined]
        (flags if action.nargs == 0 else takes_value).update(action.option_strings)
    options: list[str] = []
    words: list[str] = []
    rest = argv[1:]
    i = 0
    while i < len(rest):
        token = rest[i]
        name = token.split("=", 1)[0]
        if token == "--":
            words.extend(rest[i + 1 :])
            break
        if name in takes_value:
            options.append(token)
            if "=" not in token and i + 1 < len(rest):
                options.append(rest[i + 1])
                i += 1
        elif name in flags or (not token.startswith("--") and token[:2] in takes_value and len(token) > 2):
            options.append(token)  # a flag, or a short option with its value attached (-k5)
        else:
            words.append(token)
        i += 1
    return ["search", *options, "--", *words]


def _quiet_libraries(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Torch's OpenMP threads spin while they wait for work by default, taking the cores the
    # decode threads (and anything else on the machine) need: 5-6x slower indexing measured
    # under load (benchmarks/threads.py). Set before torch loads; an explicit value is kept.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if not verbose:  # the hub client logs every retry of an unreachable host as a warning
        logging.getLogger("huggingface_hub").setLevel(logging.ERROR)


def _folders(args: argparse.Namespace, settings: Settings, recorded, err) -> list[str]:
    """The folders named, or else every folder the index has (those not there now are
    skipped with a word: an unmounted disk must not empty the index)."""
    for folder in args.folders:  # fail before loading a 5 GB model
        path = os.path.expanduser(folder)
        if not os.path.isdir(path):
            raise SearchEngineError(f"{folder!r} is not a folder" if os.path.exists(path) else missing_folder(folder))
    if args.folders:
        return list(args.folders)
    roots = list(recorded.roots) if recorded is not None else []
    if not roots:
        have = "there is no index" if recorded is None else "the index has no folders"
        raise SearchEngineError(f"name a folder: `searchengine {args.command} ~/Pictures` ({have} in {settings.data_dir} yet)")
    present = [r for r in roots if os.path.isdir(r)]
    for r in roots:
        if r not in present:
            print(f"skipping folder {r}: it is not there now (unmounted?); its images stay in the index", file=err)
    if not present:
        raise SearchEngineError("none of the index's folders is there now: " + ", ".join(roots))
    return present


# -- commands -----------------------------------------------------------------------------


def _secs(seconds: float) -> str:
    """A duration as a person reads it: tenths from a second up, hundredths below (a tiny model loads in 0.04 s, not 0.0)."""
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"


def cmd_index(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.indexing.pipeline import Indexer
    from searchengine.library import Library

    started = time.perf_counter()
    settings = settings_from_args(args)
    runner = None
    if args.runner == "ray":
        from searchengine.indexing.ray_runner import Loaders, RayRunner, check_installed

        check_installed()  # before any model loads
        runner = RayRunner(settings, Loaders(wiring.load_model, wiring.load_captioner), args.ray_address)
    recorded = Library.recorded(settings)
    folders = _folders(args, settings, recorded, err)
    parts = wiring.open_for_indexing(settings, recorded)
    library, model, captioner, load_s = parts.library, parts.model, parts.captioner, parts.load_s
    _lock_new_index(args)
    bar = tqdm(total=0, unit="file", file=err, disable=None, dynamic_ncols=True)

    def on_skip(path: str, message: str) -> None:
        bar.write(f"skipping {path}: {message}", file=err)

    def on_caption_error(path: str, message: str) -> None:
        bar.write(f"no caption for {path}: {message}", file=err)

    def on_total(n: int) -> None:
        bar.reset(total=n)

    try:
        indexer = Indexer(
            model, library, settings, on_skip=on_skip, progress=bar.update, on_total=on_total,
            captioner=captioner, on_caption_error=on_caption_error, runner=runner, prune=args.prune,
        )
        library.record_captioner(captioner is not None, captioner.name if captioner else None)
        summary = indexer.run(folders)
        if summary.indexed or summary.linked or summary.moved or summary.removed or summary.skipped:
            library.backup()  # the store is the one thing not rebuilt from the others
    finally:
        bar.close()
        library.close()
    line = f"{summary.indexed} indexed, {summary.linked} duplicates linked, "
    line += f"{summary.moved} moved, " if summary.moved else ""
    line += f"{summary.unchanged} unchanged, {summary.removed} removed, {summary.skipped} skipped"
    if summary.kept_absent:
        line += f", {summary.kept_absent} kept (their folder is absent: --prune drops them)"
    if summary.failed:
        line += " (" + ", ".join(f"{reason}: {n}" for reason, n in sorted(summary.failed.items())) + ")"
    if summary.links_skipped:
        line += f", {summary.links_skipped} folder link{'s' if summary.links_skipped > 1 else ''} not followed (loops or already listed)"
    if summary.links_outside:
        line += f", {summary.links_outside} link{'s' if summary.links_outside > 1 else ''} leading outside the folders not followed (--links all follows them)"
    if captioner is not None:
        line += f"; {summary.captioned} captioned" + (f", {summary.caption_failed} without caption" if summary.caption_failed else "")
    # The rate counts the images embedded, over the time the run took once the models were in.
    rate = f" ({summary.indexed / summary.seconds:.2f} images/s)" if summary.indexed and summary.seconds > 0 else ""
    total = time.perf_counter() - started
    print(f"{line}; {_secs(total)} s: loading models {_secs(load_s)} s, indexing {_secs(summary.seconds)} s{rate}", file=out)
    if summary.time and "cluster" in summary.time:  # --runner ray: the stages ran on the cluster
        t = summary.time
        print(f"time: waiting for the cluster (read, decode, models) {t['cluster']:.1f} s, write {t['write']:.1f} s", file=out)
    elif summary.time:
        t = summary.time
        print(
            f"time: read {t['read']:.1f} s and decode {t['decode']:.1f} s (over {settings.decode_threads} threads, "
            f"alongside), model {t['model']:.1f} s, captions {t['captions']:.1f} s, write {t['write']:.1f} s (alongside the models)",
            file=out,
        )
    return 0


def cmd_caption(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.indexing.recaption import Recaptioner

    settings = settings_from_args(args)
    if settings.captions is False:
        raise SearchEngineError("`caption` with --no-captions has nothing to do")
    # Before the model: a missing or read-only index is reported at once.
    library, captioner = wiring.open_for_captioning(settings)
    try:
        bar = tqdm(total=0, unit="img", file=err, disable=None, dynamic_ncols=True)
        try:
            summary = Recaptioner(
                captioner, library, settings,
                on_error=lambda path, message: bar.write(f"no caption for {path}: {message}", file=err),
                progress=bar.update, on_total=lambda n: bar.reset(total=n),
            ).run(redo=args.redo)
        finally:
            bar.close()
        library.record_captioner(True, captioner.name)
    finally:
        library.close()
    rate = summary.captioned / summary.seconds if summary.seconds > 0 else 0.0
    print(
        f"{summary.captioned} captioned with {captioner.name}, {summary.failed} failed; "
        f"{summary.seconds:.1f} s ({rate:.2f} images/s)",
        file=out,
    )
    return 0


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
    from searchengine.search import Steer, check_examples, check_filters, check_min_itm, check_page, parse_for_mode

    settings = settings_from_args(args)
    query = " ".join(args.query).strip()
    steer = Steer.parse(args.like, args.unlike)
    if args.image and (query or steer.active):
        raise SearchEngineError("search by words (with --like/--unlike) or by --image, not both")
    if not args.image and not query and not steer.like:
        raise SearchEngineError("the query is empty: type some words that describe the picture (or --image PATH, or --like ID)")
    check_page(args.k, k_name="-k")
    check_min_itm(args.min_itm, name="--min-itm")
    filters = _search_filters(args)
    keyword_only = settings.search_mode == "keyword" and not args.image
    if query:
        parse_for_mode(query, settings.search_mode)
    example = _example_image(args.image, settings) if args.image else None
    def refusals(library) -> None:  # what the index alone answers, before the model loads
        check_filters(library, filters)
        check_examples(library, steer)

    searcher = wiring.open_for_search(settings, keyword_only=keyword_only, before_model=refusals)
    try:
        if example is not None:
            result = searcher.search_image(example, k=args.k, filters=filters)
        else:
            result = searcher.search(
                query, k=args.k, rerank=0 if args.no_rerank else None, filters=filters, steer=steer, min_itm=args.min_itm
            )
    finally:
        searcher.library.close()
    mode = "image" if example is not None else settings.search_mode if query else "semantic"
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


def cmd_stats(args: argparse.Namespace, out, err) -> int:
    from searchengine.library import Library

    settings = settings_from_args(args)
    library = Library.open(settings, vectors=False)  # counts come from the store: no FAISS to load
    try:
        data = library.describe()
    finally:
        library.close()
    if args.json:
        print(json.dumps(data, ensure_ascii=False, indent=2), file=out)
        return 0
    print(f"data dir     {data['data_dir']}", file=out)
    print(f"store        {data['store']}", file=out)
    if data["model"]:
        print(f"model        {data['model']} (fingerprint {data['model_fingerprint']})", file=out)
        if data["made_by"]:
            print(f"vectors by   the model in {', '.join(data['made_by'])}", file=out)
    else:
        print("model        -", file=out)
    print(f"images       {data['images']} ({data['files']} files)", file=out)
    print(f"index        {data['index_type']}, {data['vectors']} vectors", file=out)
    print(f"tier         {_describe_tier(data['vector_index'], settings)}", file=out)
    print("on disk      " + ", ".join(f"{k} {_human(v)}" for k, v in data["bytes_on_disk"].items()), file=out)
    models = ", ".join(f"{m}: {n}" for m, n in sorted(data["caption_models"].items()))
    print(
        f"captions     {data['captioned']} of {data['images']}" + (f" ({models})" if models else "")
        + (f", {data['caption_failures']} failed (`searchengine caption` retries them)" if data["caption_failures"] else ""),
        file=out,
    )
    print(f"folders      {', '.join(data['roots']) or '-'}  (links: {data['links']})", file=out)
    backups = data["backups"]
    print(f"backups      {len(backups)}" + (f", newest {backups[0]['name']}" if backups else ""), file=out)
    reasons = ", ".join(f"{r}: {n}" for r, n in sorted(data["failures_by_reason"].items()))
    print(f"failed       {data['failed']}" + (f" ({reasons})" if data["failed"] else ""), file=out)
    for f in data["failures"]:
        print(f"  {f['path']}: {f['error']}", file=out)
    if data["failed"] > len(data["failures"]):
        print(f"  ... and {data['failed'] - len(data['failures'])} more (--json lists the first {len(data['failures'])})", file=out)
    return 0


def _describe_tier(v: dict, settings) -> str:
    """The vector index's tier, for `stats`."""
    per_image = f", {_human(int(v['bytes_per_image']))} an image in RAM" if v.get("bytes_per_image") else ""
    if v["tier"] == "exact":
        when = f"approximate from {settings.ann_threshold} images" if settings.vector_tier == "auto" else f"set to {settings.vector_tier}"
        return f"exact{per_image} ({when})"
    recall = v.get("recall_at_10")
    deep = f", @100 {v['recall_deep']:.3f}" if v.get("recall_deep") is not None else ""
    measured = f", recall@10 {recall:.3f}{deep} against exact on {v['recall_queries']} sample queries" if recall is not None else ""
    return (
        f"approximate: {v['factory']}, {v['reps']} vectors an image, nprobe {v['nprobe']}, {v['overfetch']} candidate"
        f"{'s' if v['overfetch'] > 1 else ''} an image{per_image}{measured}; "
        f"built at {v['trained_on']} images in {v['build_s']:.0f} s"
    )


def cmd_watch(args: argparse.Namespace, out, err) -> int:
    import signal
    import threading

    from searchengine.indexing.pipeline import Indexer
    from searchengine.indexing.watch import Watcher
    from searchengine.library import Library

    settings = settings_from_args(args)
    recorded = Library.recorded(settings)
    folders = _folders(args, settings, recorded, err)
    logging.getLogger("searchengine.indexing").setLevel(logging.INFO)
    parts = wiring.open_for_indexing(settings, recorded)
    library, model, captioner = parts.library, parts.model, parts.captioner
    _lock_new_index(args)
    library.record_captioner(captioner is not None, captioner.name if captioner else None)
    # No on_skip here: the watcher logs every file it handles, skipped ones too, once.
    indexer = Indexer(model, library, settings, captioner=captioner)
    watcher = Watcher(indexer, folders, poll=args.poll, debounce_s=args.debounce)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    summary = watcher.start()
    print(watcher.caught_up_line(summary), file=out, flush=True)
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    finally:
        # Within 2 s: an update in progress ends before its next commit, and a model batch on
        # its way is not waited for (it took 12 s); the next start's catch-up finds its files.
        ended = watcher.stop(timeout_s=1.5)
        if ended:
            library.close()
        print(watcher.stopped_line(ended), file=out, flush=True)
    return 0


def _watch_in_server(settings: Settings, args: argparse.Namespace, captioner):
    """The `serve --watch` hook: a watcher in the server's process, with its loaded model."""

    def on_ready(service):
        from searchengine.indexing.pipeline import Indexer
        from searchengine.indexing.watch import Watcher

        # The server's own Library: one vector index in memory, which the watcher's writes
        # update in place for the queries (no second copy, no re-reading from the store).
        library = service.library
        library.require_writable("--watch writes to it")
        _lock_new_index(args)
        library.record_captioner(captioner is not None, captioner.name if captioner else None)
        service.answerer.share(captioner)  # a BLIP-2 captioner answers questions too, from the same weights
        # service.model is the locked model: indexing and queries take turns on it.
        indexer = Indexer(service.model, library, settings, captioner=captioner)
        watcher = Watcher(indexer, args.watch, poll=args.poll, debounce_s=args.debounce)
        log = logging.getLogger("searchengine.indexing.watch")
        log.info("catching up with %s, then watching", ", ".join(map(str, watcher.roots)))
        summary = watcher.start()
        log.info("%s", watcher.caught_up_line(summary))
        return _ServerWatch(watcher)

    return on_ready


class _ServerWatch:
    """The watcher of `serve --watch`, as the API's companion: stopped with it, and asked by
    /healthz whether it still works."""

    def __init__(self, watcher) -> None:
        self.watcher = watcher

    def stop(self) -> None:
        # The library is the server's, closed by it once this returns: so wait for the thread.
        ended = self.watcher.stop()
        logging.getLogger("searchengine.indexing.watch").info("%s", self.watcher.stopped_line(ended))

    def health(self) -> str | None:
        return self.watcher.health()


def cmd_serve(args: argparse.Namespace, out, err) -> int:
    import functools
    import ipaddress

    import uvicorn

    from searchengine.app.api import create_app
    from searchengine.library import Library
    from searchengine.util.locks import serving_lock

    settings = settings_from_args(args)
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
            raise SearchEngineError(missing_folder(folder))
    if args.watch:
        Library.check_writable(settings)  # a read-only index can be served, not watched
    recorded = Library.recorded(settings)
    if recorded is None and not args.watch:  # only index and watch make a new index
        raise IndexNotFoundError(
            f"no index in {settings.data_dir}: run `searchengine index FOLDER` first, or `searchengine serve --watch FOLDER`, "
            "or point --data-dir at one"
        )
    # Both models are checked to be at hand, and the captioner loaded, before the server
    # starts: one that cannot load stops `serve --watch` with one line, rather than leaving a
    # server that indexes without captions.
    choice = wiring.choose(settings, recorded, captions=bool(args.watch))
    logging.getLogger("searchengine").setLevel(logging.INFO)
    on_ready = _watch_in_server(settings, args, wiring.load_captioner(settings, choice.caption_model)) if args.watch else None
    loader = functools.partial(wiring.open_for_serving, create=bool(args.watch), model=choice.model)
    app = create_app(settings, loader=loader, on_ready=on_ready)
    held = serving_lock(settings.data_dir)  # `restore` waits for this server to stop (held until exit)
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="info")
    finally:
        if held is not None:
            os.close(held)
    return 0


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
            print(f"  {_human(d.files[0].size):>9}  {f'{d.width}x{d.height}':>11}  {when:>10}  {m.score:.3f}  {d.files[0].path}", file=out)
    t = found.timings_ms
    print(
        f"{len(groups)} group{'' if len(groups) == 1 else 's'} among {found.images} images (threshold {threshold:g}); "
        f"{found.pairs_scored} pairs "
        f"scored; {t['total'] / 1000:.1f} s",
        file=err,
    )
    return 0


def cmd_ask(args: argparse.Namespace, out, err) -> int:
    from searchengine.errors import BadImageError
    from searchengine.media.imageio import decode_image, read_file
    from searchengine.library import Library
    from searchengine.models.vqa import VqaUnavailable, check_question

    settings = settings_from_args(args)
    question = check_question(" ".join(args.question))
    local = os.path.expanduser(args.image)
    by_id = args.image.isdigit() and not os.path.exists(local)
    recorded = Library.recorded(settings)
    if by_id:
        if recorded is None:
            raise IndexNotFoundError(f"no index in {settings.data_dir} to find image {args.image} in; give a file's path instead")
        library = Library.open(settings, vectors=False)
        try:
            detail = library.image_detail(int(args.image))
        finally:
            library.close()
        paths = [f.path for f in detail.files if os.path.isfile(f.path)] if detail is not None else []
        if detail is None or not detail.files:
            raise SearchEngineError(f"no indexed image has id {args.image}")
        if not paths:
            raise SearchEngineError(f"image {args.image}'s files are gone: {', '.join(f.path for f in detail.files)}")
        local = paths[0]
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
    answer = answerer.ask(image, question)
    if args.json:
        print(json.dumps({**answer.as_json(), "image": local, "load_ms": round(load_ms, 1)}, ensure_ascii=False), file=out)
        return 0
    print(answer.answer or "(no answer)", file=out)
    print(f"{name}: load {load_ms / 1000:.1f} s, answer {answer.timings_ms['generate']:.0f} ms", file=err)
    return 0


def cmd_check(args: argparse.Namespace, out, err) -> int:
    from searchengine.library import Library

    settings = settings_from_args(args)
    try:
        library = Library.open(settings, writable=False, vectors=False)  # reads only: a check changes nothing
    except (StoreDamagedError, StoreMissingError) as e:
        findings = [(False, str(e))]
    else:
        try:
            findings = library.check()
        finally:
            library.close()
    if args.json:
        print(json.dumps([{"ok": ok, "what": what} for ok, what in findings], ensure_ascii=False, indent=2), file=out)
    else:
        for ok, what in findings:
            print(f"{'ok  ' if ok else 'FIX '} {what}", file=out)
    return 0 if all(ok for ok, _ in findings) else 1


def cmd_backup(args: argparse.Namespace, out, err) -> int:
    from searchengine.library import Library

    settings = settings_from_args(args).model_copy(update={"backups": max(settings_from_args(args).backups, 1)})
    library = Library.open(settings, writable=True, vectors=False)
    try:
        made = library.backup()
    finally:
        library.close()
    print(f"backed up the store to {made.path} ({_human(made.size)})", file=out)
    return 0


def cmd_restore(args: argparse.Namespace, out, err) -> int:
    from searchengine.store import backup
    from searchengine.library import Library
    from searchengine.library.opening import unwritable_path
    from searchengine.util.locks import no_server

    settings = settings_from_args(args)
    if settings.database_url:
        raise SearchEngineError(
            f"the store is in the database {settings.store_location}: restore it with the server's own tools "
            "(pg_restore), then run any command to bring this machine's vector index in line"
        )
    if args.list:
        backups = backup.list_backups(settings.store_path)
        for b in backups:
            print(f"{b.name}  {_human(b.size)}", file=out)
        if not backups:
            print(f"no backups in {backup.backups_dir(settings.store_path)}", file=out)
        return 0
    blocked = unwritable_path(settings)
    if blocked is not None:
        raise SearchEngineError(f"{blocked} is not writable: a backup cannot be restored there")
    chosen = backup.find_backup(settings.store_path, args.backup)
    with no_server(settings.data_dir, "restore"):
        backup.restore(settings.store_path, chosen)
    library = Library.open(settings)  # reconciles the vector index and the caches with it
    try:
        images = library.describe(max_failures=0)["images"]
    finally:
        library.close()
    print(
        f"restored {chosen.name}: {images} images; the vector index and caches now follow it "
        "(`searchengine index` adds what came after the backup)",
        file=out,
    )
    return 0


def cmd_reindex(args: argparse.Namespace, out, err) -> int:
    from tqdm import tqdm

    from searchengine.indexing.reindex import Reindexer
    from searchengine.library import Library

    settings = settings_from_args(args)
    if not settings.model:
        raise SearchEngineError("name the model to re-index with: `searchengine reindex --model DIR_OR_HUB_ID`")
    library = Library.open(settings, writable=True, vectors=False)  # the old vectors are not needed here
    try:
        model = wiring.load_model(settings, settings.model)
        bar = tqdm(total=0, unit="img", file=err, disable=None, dynamic_ncols=True)
        try:
            summary = Reindexer(
                model, library, settings, progress=bar.update, on_total=lambda n: bar.reset(total=n),
                on_skip=lambda what, message: bar.write(f"leaving out {what}: {message}", file=err),
            ).run()
        except KeyboardInterrupt:
            bar.close()
            print("interrupted: the index still uses its old model; run the same command to go on where it stopped", file=err)
            raise
        finally:
            bar.close()
        library.backup()
    finally:
        library.close()
    rate = f" ({summary.embedded / summary.seconds:.2f} images/s)" if summary.embedded and summary.seconds > 0 else ""
    resumed = f" (after {summary.resumed_from} done before)" if summary.resumed_from else ""
    gone = f"; {summary.gone} image{'s' if summary.gone != 1 else ''} with no file left to read left the index" if summary.gone else ""
    print(f"{summary.embedded} images re-embedded{resumed} in {summary.seconds:.1f} s{rate}{gone}; "
          f"the index now uses {model.name} (fingerprint {model.fingerprint})", file=out)
    return 0


def cmd_make_tiny_model(args: argparse.Namespace, out, err) -> int:
    import transformers

    from searchengine.models.tiny import build_tiny_captioner, build_tiny_model

    transformers.logging.disable_progress_bar()  # its "Writing model shards" bars say nothing here

    if args.kind == "retrieval":
        path = build_tiny_model(args.directory, seed=args.seed, size=args.size)
        what = "BLIP-2 retrieval model"
        step = f"searchengine index FOLDER --model {path} --no-captions   (or with a tiny captioner: --caption-model DIR)"
    else:
        path = build_tiny_captioner(args.directory, kind=args.kind, seed=args.seed, size=args.size)
        what = f"{'BLIP' if args.kind == 'blip' else 'BLIP-2'} captioner"
        step = f"searchengine index FOLDER --model RETRIEVAL_DIR --caption-model {path}"
    print(f"wrote a {args.size} random {what} to {path} (its rankings and captions mean nothing)", file=out)
    print(f"next: {step}", file=out)
    return 0


def _disk_full(e: BaseException) -> bool:
    return (isinstance(e, OSError) and e.errno == errno.ENOSPC) or "database or disk is full" in str(e)


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# Commands that write to the index: one at a time per data dir (see `writer_lock`).
WRITERS = set(locks.WRITERS)


def _as_the_writer(args: argparse.Namespace, out, err) -> int:
    """The command, holding the data dir's writer lock. A data dir that does not exist yet is
    not made here (a command that fails first must leave nothing behind): the command takes
    the lock itself, through `_lock_new_index`, once it has made the index."""
    from searchengine.library import Library
    from searchengine.util.locks import writer_lock

    settings = settings_from_args(args)
    if args.command != "restore":
        Library.check_writable(settings)  # a read-only index: that message, not a lock error
    with contextlib.ExitStack() as stack:
        command = " ".join(sys.argv[1:3]) or args.command
        args.lock = lambda: stack.enter_context(writer_lock(settings.data_dir, command))
        if settings.data_dir.is_dir():
            args.lock()
            args.lock = None
        return COMMANDS[args.command](args, out, err)


def _lock_new_index(args: argparse.Namespace) -> None:
    """Take the writer lock of an index this command has just made (see `_as_the_writer`)."""
    if getattr(args, "lock", None) is not None:
        args.lock()
        args.lock = None


COMMANDS = {
    "index": cmd_index,
    "search": cmd_search,
    "caption": cmd_caption,
    "stats": cmd_stats,
    "watch": cmd_watch,
    "serve": cmd_serve,
    "ask": cmd_ask,
    "duplicates": cmd_duplicates,
    "make-tiny-model": cmd_make_tiny_model,
    "reindex": cmd_reindex,
    "check": cmd_check,
    "backup": cmd_backup,
    "restore": cmd_restore,
    **cli_models.COMMANDS,
}


def _store_location(args: argparse.Namespace) -> str:
    """ " (where)", the store as messages name it (no password), or "" if the settings cannot say."""
    try:
        return f" ({settings_from_args(args).store_location})"
    except Exception:  # noqa: BLE001 - only for a message
        return ""


def main(argv: Sequence[str] | None = None, out=None, err=None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    parser = build_parser()
    args = parser.parse_args(_dash_words_as_query(parser, list(sys.argv[1:] if argv is None else argv)))
    try:
        _quiet_libraries(args.__dict__.get("verbose", False))
        if args.command in WRITERS or (args.command == "serve" and args.watch):
            return _as_the_writer(args, out, err)
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
        from searchengine.store.connection import damage, is_unreachable

        if is_unreachable(e):  # `index` died with a raw "OperationalError: consuming input failed"
            where = _store_location(args)
            print(f"searchengine: error: the index store{where} cannot be reached ({damage(e)}); what was committed "
                  "before is kept: run the command again once it is back", file=err)
            return EXIT_ERROR
        if _disk_full(e):  # from the OS, from SQLite, or from FAISS (see vector_index.write_atomic)
            print("searchengine: error: the disk holding the index is full: free some space and run it again; "
                  "what was indexed before is kept", file=err)
            return EXIT_ERROR
        if args.__dict__.get("verbose"):
            raise
        print(f"searchengine: error: {type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''} (run with -v for details)", file=err)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
