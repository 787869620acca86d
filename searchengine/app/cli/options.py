"""What several commands share: their options, their examples, exit codes, and how durations
and sizes are shown."""

from __future__ import annotations

import argparse
from datetime import date, datetime

from searchengine.app import tuning_cli as cli_models
from searchengine.config.settings import DEFAULT_MODEL
from searchengine.media.imageio import FILE_TYPES, ORIENTATIONS
from searchengine.models.captioner import CPU_DEFAULT, GPU_DEFAULT


EXIT_ERROR = 1


EXIT_USAGE = 2


DTYPES = ["auto", "float32", "bfloat16", "float16", "int8"]


DTYPE_HELP = "model dtype (default: auto); int8: the captioner and question model in 8 bits (CUDA, bitsandbytes)"


def links_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--links", choices=["folders", "none", "all"],
        help="which symlinks to follow: folders (linked folders anywhere; file links only when they lead into "
        "the indexed folders), none (nothing outside the folders), all (anything). Default: as the index was "
        "built; folders for a new index; env SEARCHENGINE_LINKS",
    )


def common(parser: argparse.ArgumentParser, *, model: bool) -> None:
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


def caption_options(parser: argparse.ArgumentParser) -> None:
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


def vqa_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--vqa-model",
        help="hub id or local directory of a BLIP-2 model with a language model that answers questions about photos "
        "(default: the index's captioner when it is one; env SEARCHENGINE_VQA_MODEL)",
    )


def watch_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--poll", action="store_true", default=None, help="poll instead of native events (automatic on network mounts)")
    parser.add_argument("--debounce", type=float, default=1.0, metavar="SECONDS", help="quiet time before a changed file is read (default: 1)")


def filter_options(parser: argparse.ArgumentParser) -> None:
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
    "explain": """\
examples:
  searchengine explain 42 a red umbrella on the left --out map.png   an indexed image, by its id
  searchengine explain ~/Pictures/beach.jpg dog --json                 a file; the grid and its peak as JSON""",
    "make-tiny-model": """\
examples:
  searchengine make-tiny-model /tmp/tiny-blip2
  searchengine make-tiny-model /tmp/tiny-captioner --kind blip
  searchengine index ~/Pictures --model /tmp/tiny-blip2 --caption-model /tmp/tiny-captioner""",
}


EXAMPLES.update(cli_models.EXAMPLES)


def secs(seconds: float) -> str:
    """A duration as a person reads it: tenths from a second up, hundredths below (a tiny model loads in 0.04 s, not 0.0)."""
    return f"{seconds:.1f}" if seconds >= 1 else f"{seconds:.2f}"


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def lock_new_index(args: argparse.Namespace) -> None:
    """Take the writer lock of an index this command has just made (see `as_the_writer`)."""
    if getattr(args, "lock", None) is not None:
        args.lock()
        args.lock = None
