"""The commands that look after the index: stats, check, backup, restore, make-tiny-model."""

from __future__ import annotations

import argparse
import json

from searchengine.app.cli.options import human
from searchengine.config.settings import settings_from_args
from searchengine.errors import SearchEngineError, StoreDamagedError, StoreMissingError


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
    print("on disk      " + ", ".join(f"{k} {human(v)}" for k, v in data["bytes_on_disk"].items()), file=out)
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
    per_image = f", {human(int(v['bytes_per_image']))} an image in RAM" if v.get("bytes_per_image") else ""
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
    print(f"backed up the store to {made.path} ({human(made.size)})", file=out)
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
            print(f"{b.name}  {human(b.size)}", file=out)
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
