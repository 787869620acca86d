"""The command line's parser: one function per command, and search's dash words."""

from __future__ import annotations

import argparse

from searchengine import __version__
from searchengine.app import tuning_cli as cli_models
from searchengine.app.cli.options import (
    DTYPES,
    DTYPE_HELP,
    EXAMPLES,
    caption_options,
    common,
    filter_options,
    links_option,
    vqa_option,
    watch_options,
)


def _index_command(command) -> None:
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
        help="with --runner ray: auto (the cluster this machine is a node of), HOST:6379 (the head, from a node), or none to start Ray here",
    )
    links_option(p)
    caption_options(p)
    common(p, model=True)


def _search_command(command) -> None:
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
    filter_options(p)
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print JSON")
    out.add_argument("-f", "--paths", action="store_true",
                     help="print only the paths, one per line; control characters in a name are escaped (\\n, \\x1b)")
    out.add_argument("-0", "--null", action="store_true",
                     help="print only the paths, exactly as they are, each ended by a NUL byte (for xargs -0)")
    common(p, model=True)


def _caption_command(command) -> None:
    p = command(
        "caption", "caption the images of an index that have no caption from the caption model",
        "Caption the indexed images that have no caption from the caption model (or whose captioning failed). "
        "Nothing is re-embedded.",
    )
    p.add_argument("--redo", action="store_true", help="caption every image again, even those the model already captioned")
    p.add_argument("--batch-size", type=int, help="images per caption batch (default: 8 on a CPU, 32 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: one per core)")
    caption_options(p)
    common(p, model=False)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)


def _stats_command(command) -> None:
    p = command("stats", "what the index holds", "Images, files, failures by reason, model, captions and sizes on disk.")
    p.add_argument("--json", action="store_true", help="print JSON")
    common(p, model=False)


def _watch_command(command) -> None:
    p = command(
        "watch", "keep the index in step with folders (runs until stopped)",
        "Catch up with what changed, then follow the folders: new, changed, moved and deleted files are handled "
        "as they settle. Each file handled is logged by name.",
    )
    p.add_argument("folders", nargs="*", metavar="FOLDER", help="folders to watch (default: every folder the index has)")
    watch_options(p)
    links_option(p)
    caption_options(p)
    common(p, model=True)


def _duplicates_command(command) -> None:
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
    common(p, model=False)


def _explain_command(command) -> None:
    p = command(
        "explain", "show where a query matches a photo (a heat map over it)",
        "Which parts of a photo made the image-text matching head match it to the words: Grad-CAM over the "
        "Q-Former's cross-attention (one ITM forward and backward), a grid over the ViT's patches drawn over the "
        "photo (longest side preview_size). A file, or an indexed image by its id.",
    )
    p.add_argument("image", metavar="PATH_OR_ID", help="an image file, or an indexed image's id (from search --json or the UI)")
    p.add_argument("query", nargs="+", metavar="QUERY", help="the words, e.g. a red umbrella on the left")
    p.add_argument("--out", metavar="PNG", help="write the map over the photo to this PNG file")
    p.add_argument("--json", action="store_true", help="print JSON (the grid, its peak, P(match))")
    common(p, model=True)


def _ask_command(command) -> None:
    p = command(
        "ask", "ask a question about a photo (BLIP-2 with a language model answers)",
        "Answer a question about a photo: a file, or an indexed image by its id. With no question, a "
        "conversation: each question is asked with the ones before and their answers (as LAVIS prompts "
        "multi-turn VQA), the answer printed as it is generated; Ctrl-D ends it. The model is --vqa-model, "
        "else the index's captioner when it is BLIP-2 with a language model.",
    )
    p.add_argument("image", metavar="PATH_OR_ID", help="an image file, or an indexed image's id (from search --json or the UI)")
    p.add_argument("question", nargs="*", metavar="QUESTION",
                   help="the question, e.g. what breed is the dog?; none: a conversation, a question a line (Ctrl-D ends it)")
    g = p.add_argument_group("decoding the answer")
    g.add_argument("--decoding", choices=["greedy", "beam", "nucleus"], default="greedy", help="how the answer is chosen (default: greedy)")
    g.add_argument("--max-new-tokens", type=int, default=30, metavar="N", help="longest answer, 1 to 200 tokens (default: 30)")
    g.add_argument("--beams", type=int, default=3, metavar="N", help="beam: beams kept, 2 to 8 (default: 3)")
    g.add_argument("--top-p", type=float, default=0.9, metavar="P", help="nucleus: the share of probability sampled from (default: 0.9)")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T", help="nucleus: 0.05 to 2 (default: 1.0)")
    vqa_option(p)
    p.add_argument("--json", action="store_true", help="print JSON")
    common(p, model=False)
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: auto)")
    p.add_argument("--dtype", choices=DTYPES, help=DTYPE_HELP)


def _serve_command(command) -> None:
    p = command("serve", "serve the web UI and the HTTP API", "Serve the search page and the JSON API (OpenAPI at /docs).")
    vqa_option(p)
    p.add_argument("--host", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, help="port (default: 8000)")
    p.add_argument("--watch", nargs="+", metavar="FOLDER", default=[], help="also watch these folders (and create the index if there is none)")
    watch_options(p)
    links_option(p)
    caption_options(p)
    common(p, model=True)


def _check_command(command) -> None:
    p = command(
        "check", "check the index: store, vector index, caches and files against each other",
        "Check every part of the index against the store, changing nothing. Exits 1 when something needs "
        "repair: derived files are repaired by the next index, watch or serve; a damaged store by restore.",
    )
    p.add_argument("--json", action="store_true", help="print JSON")
    common(p, model=False)


def _backup_command(command) -> None:
    p = command("backup", "back up the store now", "Make a backup of the store in the data dir's backups/ folder.")
    common(p, model=False)


def _restore_command(command) -> None:
    p = command(
        "restore", "put a backup of the store back",
        "Replace the store with a backup (the newest by default), after checking it. Stop `serve` and `watch` "
        "first. The vector index and the caches follow the restored store when it is next opened; "
        "`searchengine index` then adds what came after the backup.",
    )
    p.add_argument("backup", nargs="?", metavar="BACKUP", help="a backup's file name (see `stats`) or path (default: the newest)")
    p.add_argument("--list", action="store_true", help="list the backups and restore nothing")
    common(p, model=False)


def _reindex_command(command) -> None:
    p = command(
        "reindex", "re-embed every image with another retrieval model",
        "Re-embed the whole index with another BLIP-2 retrieval model (a fine-tuned one, say), in the "
        "background: search and serve go on with the old model until every image is done, then the new "
        "model takes over at once (a running `serve` switches to it). Captions and metadata are kept. "
        "Interrupted, the same command goes on where it stopped; the old index stays in use until the end.",
    )
    p.add_argument("--batch-size", type=int, help="images per model batch (default: 8 on a CPU, 64 on a GPU)")
    p.add_argument("--workers", type=int, dest="decode_workers", help="decoding threads (default: one per core)")
    common(p, model=True)


def _make_tiny_model_command(command) -> None:
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

    _index_command(command)
    _search_command(command)
    _caption_command(command)
    _stats_command(command)
    _watch_command(command)
    _duplicates_command(command)
    _ask_command(command)
    _explain_command(command)
    _serve_command(command)
    _check_command(command)
    _backup_command(command)
    _restore_command(command)
    _reindex_command(command)
    _make_tiny_model_command(command)
    cli_models.add_parsers(command, common)
    parser.commands = commands  # type: ignore[attr-defined]
    return parser


def dash_words_as_query(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
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
