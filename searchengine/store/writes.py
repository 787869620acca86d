"""The metadata store: the one source of truth (SQLAlchemy 2.x Core; SQLite in WAL mode).

Two tables carry the library:
- `images`: one row per distinct *content* (sha256). Its integer id is stable (never reused)
  and is the id its vectors have in the FAISS index. Its ITC vectors are kept in `vectors`,
  so the FAISS index can always be rebuilt from here without the model.
- `files`: one row per path. An indexed file points at its image; two paths with the same
  content point at the same image (embedded once, both listed). A file that could not be read
  has no image and carries its failure reason and message.

`meta` holds the schema version and the model (name + fingerprint + shapes) that made the
vectors; opening with another model is refused.

Every image also has a row in the full-text index (`searchengine.store.textindex`): its caption and
the words of its file and folder names. Every write that changes an image's caption or paths
rewrites that row in the same transaction.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
from sqlalchemy import (
    Integer,
    Text,
    bindparam,
    cast,
    create_engine,
    delete,
    event,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.engine import Connection, URL
from sqlalchemy.exc import DatabaseError, IntegrityError

from searchengine.errors import (
    ReadOnlyIndexError,
    SchemaError,
    SearchEngineError,
    StoreDamagedError,
)
from searchengine.media.keywords import path_words
from searchengine.store.catalog import Catalog, chunks, ids_by_hash
from searchengine.store.connection import (
    damage,
    hold_to_file,
    is_damage,
    sqlite_pragmas,
    sqlite_readonly_pragmas,
)
from searchengine.store.records import NewImage, ModelInfo, recorded_as
from searchengine.store.schema import (
    SCHEMA_VERSION,
    VECTOR_DTYPE,
    files,
    images,
    meta,
    metadata,
    next_vectors,
    roots,
    vectors,
)
from searchengine.util.durable import disk_full

log = logging.getLogger(__name__)


class Store(Catalog):

    @classmethod
    def open(cls, url: str | URL, *, read_only: bool = False, location: str = "") -> "Store":
        """Open (and create or upgrade) the store; with `read_only`, open it as it is.

        A read-only store is never created, upgraded or written: its schema must be the one
        this program writes. `location` names the store in messages (the URL may hold a secret).
        """
        engine = create_engine(url)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", sqlite_readonly_pragmas if read_only else sqlite_pragmas)
        store = cls(engine, read_only=read_only)
        where = location or engine.url.render_as_string(hide_password=True)
        try:
            if read_only:
                store._check_schema(where)
            else:
                store._migrate()
            if not read_only and engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
                hold_to_file(engine, Path(engine.url.database))
        except DatabaseError as e:
            engine.dispose()
            if is_damage(e):
                raise StoreDamagedError(f"the store {where} is damaged: {damage(e)}") from e
            if location and disk_full(Path(location).parent):  # SQLite says "disk I/O error"
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), location) from e
            raise
        except BaseException:
            engine.dispose()
            raise
        return store

    def close(self) -> None:
        self.engine.dispose()

    def _migrate(self) -> None:
        """Create the schema, or upgrade an older one step by step, in one transaction: the
        Alembic migrations of `searchengine.store.migrations`, from the version the store records."""
        from searchengine.store import migrations

        with self.engine.begin() as conn:
            version = None
            if self.engine.dialect.has_table(conn, "meta"):
                version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
            if version is not None and int(version) > SCHEMA_VERSION:
                raise SchemaError(
                    f"this index has schema version {version}, newer than this program knows "
                    f"({SCHEMA_VERSION}); upgrade searchengine"
                )
            if version is None and self.engine.dialect.has_table(conn, "images"):
                version = 1  # tables, but no version recorded: as version 1 left them
            if version is not None and int(version) < SCHEMA_VERSION:
                log.info("upgrading the store from schema %s to %s", version, SCHEMA_VERSION)
            if not migrations.current(conn, SCHEMA_VERSION, version):
                migrations.upgrade(conn, int(version) if version is not None else None)
                metadata.create_all(conn)  # nothing to do on a store the migrations made; a net for older ones
            if version is None or int(version) < SCHEMA_VERSION:
                self._set_meta(conn, "schema_version", str(SCHEMA_VERSION))
            if self._get_meta(conn, "revision") is None:
                self._set_meta(conn, "revision", "0")
            # The text index is derived from images + files: rebuilt whenever it is out of
            # step (after the upgrade above, or if it was ever damaged).
            n_images = conn.execute(select(func.count()).select_from(images)).scalar()
            if self.text.count(conn) != n_images:
                self.text.clear(conn)
                ids = list(conn.execute(select(images.c.id)).scalars())
                for chunk in chunks(ids, 500):
                    self._refresh_text(conn, chunk)

    def _check_schema(self, location: str) -> None:
        """What `_migrate` would do, as checks only: the read-only path."""
        with self.engine.connect() as conn:
            version = None
            if self.engine.dialect.has_table(conn, "meta"):
                version = conn.execute(select(meta.c.value).where(meta.c.key == "schema_version")).scalar()
            if version is None:
                raise SchemaError(f"{location} holds no index (no schema version); it cannot be created read-only")
            if int(version) > SCHEMA_VERSION:
                raise SchemaError(
                    f"this index has schema version {version}, newer than this program knows "
                    f"({SCHEMA_VERSION}); upgrade searchengine"
                )
            # Schema 2 differs only in its vectors' precision, which `iter_vectors` reads from
            # their length: a read-only index of schema 2 is read as it is.
            if int(version) < 2:
                raise ReadOnlyIndexError(
                    f"the index in {location} has schema version {version} and this program needs "
                    f"{SCHEMA_VERSION}; it cannot be upgraded while it is read-only: run a write command "
                    "(`searchengine index FOLDER`) once where it can be written"
                )
            n_images = conn.execute(select(func.count()).select_from(images)).scalar()
            if self.text.count(conn) != n_images:
                log.warning(
                    "the keyword index of %s is out of step with its images and cannot be rebuilt read-only; "
                    "keyword results may miss images until a write command runs", location,
                )

    def _set_meta(self, conn: Connection, key: str, value: str) -> None:
        if self._get_meta(conn, key) is None:
            conn.execute(insert(meta).values(key=key, value=value))
        else:
            conn.execute(update(meta).where(meta.c.key == key).values(value=value))

    def _refresh_text(self, conn: Connection, ids: Iterable[int]) -> None:
        """Rewrite the full-text rows of these images from their caption and current paths."""
        ids = sorted(set(ids))
        if not ids:
            return
        root_paths = list(conn.execute(select(roots.c.path)).scalars())
        for chunk in chunks(ids, 500):
            captions = dict(conn.execute(select(images.c.id, images.c.caption).where(images.c.id.in_(chunk))).all())
            paths: dict[int, list[str]] = {i: [] for i in captions}
            for image_id, path in conn.execute(select(files.c.image_id, files.c.path).where(files.c.image_id.in_(chunk))):
                paths[image_id].append(path)
            self.text.put(conn, [(i, captions[i], path_words(paths[i], root_paths)) for i in captions])

    def _bump_revision(self, conn: Connection) -> None:
        # One UPDATE, so that two writers at once (PostgreSQL lets them run side by side) each
        # add one: a read-then-write would let one of them lose its bump, and a reader its
        # notice of that writer's change.
        bumped = conn.execute(
            update(meta).where(meta.c.key == "revision").values(value=cast(cast(meta.c.value, Integer) + 1, Text))
        )
        if bumped.rowcount == 0:
            self._set_meta(conn, "revision", "1")

    def record_link_policy(self, policy: str) -> None:
        with self.engine.begin() as conn:
            self._set_meta(conn, "links", policy)

    def record_captioner(self, captions: bool, model: str | None) -> None:
        with self.engine.begin() as conn:
            self._set_meta(conn, "captioner", json.dumps({"captions": captions, "model": model}))

    def bind_model(self, info: ModelInfo, former: Iterable[str] = ()) -> None:
        """Record the model on first use; refuse a different one afterwards.

        The same weights are the same model whatever the path, dtype or device they are loaded
        with. `former`: fingerprints earlier versions took of these weights in bf16 or fp16 (see
        `models.former_fingerprints`); an index that recorded one of them is this model, and its
        record is brought up to date where the store can be written.

        A read-only store with no model yet has no vectors either: nothing is recorded, and
        there is nothing the model could be mixed with.
        """
        with self.engine.begin() as conn:
            raw = self._get_meta(conn, "model")
            have = ModelInfo(**json.loads(raw)) if raw else None
            standing = recorded_as(have, info, former)
            if self.read_only or standing == "same":
                return
            if standing == "nothing":
                self._set_meta(conn, "model", json.dumps(info.__dict__))
                return
            self._set_meta(conn, "model", json.dumps(dict(json.loads(raw), fingerprint=info.fingerprint)))
            log.info("the index's model fingerprint %s (taken in %s by an earlier version) is now %s, "
                     "taken from the weights as stored", have.fingerprint, have.dtype or "bf16", info.fingerprint)

    def record_mount(self, root: str, mounted: bool) -> None:
        with self.engine.begin() as conn:
            have = set(json.loads(self._get_meta(conn, "mounted_roots") or "[]"))
            self._set_meta(conn, "mounted_roots", json.dumps(sorted(have | {root} if mounted else have - {root})))

    def record_made_by(self, made_by: str) -> None:
        """Note that vectors in this index were made by the model run as `made_by` ("bfloat16 on
        cpu"): an index may hold vectors from several dtypes and devices, which mix (the store
        keeps float16), and `stats` lists them."""
        with self.engine.begin() as conn:
            raw = self._get_meta(conn, "made_by")
            seen = json.loads(raw) if raw else self._made_before_it_was_recorded(conn)
            if made_by not in seen:
                self._set_meta(conn, "made_by", json.dumps([*seen, made_by]))

    def add_root(self, path: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(select(roots.c.id).where(roots.c.path == path)).first() is None:
                conn.execute(insert(roots).values(path=path, added_at=time.time()))

    def write_batch(
        self,
        new_images: Sequence[NewImage] = (),
        links: Sequence[tuple[str, int, int, str]] = (),
        failures: Sequence[tuple[str, int, int, str, str]] = (),
    ) -> tuple[list[int], list[int]]:
        """Commit one batch in one transaction.

        new_images: embedded images (their hash, metadata, ITC vectors [Q, D] and file)
        links: (path, size, mtime_ns, sha256) of files whose content is already indexed
        failures: (path, size, mtime_ns, reason, error)
        Returns (ids of the new images, ids of images left with no file, now deleted). A new
        image whose content another writer committed first (two indexers sharing a database
        server, each with a copy of one photo) is linked to that one instead: its id is None.
        """
        taken: set[str] = set()
        for attempt in range(3):
            kept = [n for n in new_images if n.sha256 not in taken]
            extra = [(*n.file, n.sha256) for n in new_images if n.sha256 in taken]
            try:
                ids, orphans = self._write_batch(kept, [*links, *extra], failures)
            except IntegrityError:
                now_taken = self.indexed_hashes(n.sha256 for n in new_images)
                if attempt == 2 or not (now_taken - taken):
                    raise
                log.info("%d images of a batch were indexed by another writer meanwhile: linked to theirs", len(now_taken))
                taken = now_taken
                continue
            made = iter(ids)
            return [None if n.sha256 in taken else next(made) for n in new_images], orphans
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _write_batch(self, new_images: Sequence[NewImage], links, failures) -> tuple[list[int], list[int]]:
        # A handful of statements a batch, not four an image: the single writer has to keep up
        # with a GPU (benchmarks/store_backends.py).
        now = time.time()
        linked: set[int] = set()  # images that gained a path
        with self.engine.begin() as conn:
            new_ids: list[int] = []
            if new_images:
                # Many rows in one statement, then their ids by content (unique): an INSERT ...
                # RETURNING that keeps the rows' order runs one row at a time on SQLite.
                conn.execute(insert(images), [dict(sha256=n.sha256, created_at=now, **n.meta.__dict__) for n in new_images])
                made = self._ids_of(conn, [n.sha256 for n in new_images])
                new_ids = [made[n.sha256] for n in new_images]
                conn.execute(insert(vectors), [
                    dict(image_id=i, data=np.ascontiguousarray(n.itc, VECTOR_DTYPE).tobytes())
                    for i, n in zip(new_ids, new_images)
                ])
            rows = [(*n.file, "indexed", i, None, None) for i, n in zip(new_ids, new_images)]
            if links:
                by_sha = self._ids_of(conn, [sha for *_, sha in links])
                rows += [(path, size, mtime_ns, "indexed", by_sha[sha], None, None) for path, size, mtime_ns, sha in links]
                linked = set(by_sha.values())
            rows += [(path, size, mtime_ns, "failed", None, reason, error) for path, size, mtime_ns, reason, error in failures]
            touched = self._put_files(conn, rows, now)
            orphans = self._delete_orphans(conn, touched)
            self._refresh_text(conn, (set(new_ids) | linked | touched) - set(orphans))
            self._bump_revision(conn)
        return new_ids, orphans

    @staticmethod
    def _ids_of(conn, hashes: Sequence[str]) -> dict[str, int]:
        """The image id of each of these contents, which must all be indexed."""
        found = ids_by_hash(conn, hashes)
        missing = [sha for sha in hashes if sha not in found]
        if missing:
            raise LookupError(f"no indexed image has the content {missing[0]}")
        return found

    def _put_files(self, conn, rows, now) -> set[int]:
        """Insert or update file rows (path, size, mtime_ns, status, image_id, reason, error), a
        later row for a path winning; return the images a path pointed at before and no longer."""
        keys = ("size", "mtime_ns", "status", "image_id", "reason", "error")
        latest: dict[str, dict] = {}
        touched: set[int] = set()
        for path, *values in rows:
            before = latest.get(path)
            if before is not None and before["image_id"] is not None:
                touched.add(before["image_id"])  # an earlier row of this batch for this path
            latest[path] = dict(zip(keys, values), path=path, updated_at=now)
        old: dict[str, tuple[int, int | None]] = {}
        for chunk in chunks(list(latest), 500):
            for file_id, path, image_id in conn.execute(
                select(files.c.id, files.c.path, files.c.image_id).where(files.c.path.in_(chunk))
            ):
                old[path] = (file_id, image_id)
        fresh = [row for path, row in latest.items() if path not in old]
        if fresh:
            conn.execute(insert(files), fresh)
        # The SET clause comes from the rows' keys; file_id, not a column, picks the row.
        changed = [{k: v for k, v in row.items() if k != "path"} | {"file_id": old[path][0]}
                   for path, row in latest.items() if path in old]
        if changed:
            conn.execute(update(files).where(files.c.id == bindparam("file_id")), changed)
        for path, row in latest.items():
            before = old.get(path, (None, None))[1]
            if before is not None and before != row["image_id"]:
                touched.add(before)
        return touched

    def _delete_orphans(self, conn: Connection, candidates: Iterable[int]) -> list[int]:
        """Delete those of these images that no file shows any more; return their ids."""
        gone: list[int] = []
        for chunk in chunks(sorted(set(candidates)), 500):
            shown = set(conn.execute(select(files.c.image_id).where(files.c.image_id.in_(chunk)).distinct()).scalars())
            dead = [i for i in chunk if i not in shown]
            if dead:
                conn.execute(delete(vectors).where(vectors.c.image_id.in_(dead)))
                conn.execute(delete(next_vectors).where(next_vectors.c.image_id.in_(dead)))
                conn.execute(delete(images).where(images.c.id.in_(dead)))
                gone += dead
        self.text.delete(conn, gone)
        return gone

    def remove_files(self, paths: Iterable[str]) -> list[int]:
        """Forget these paths; delete and return the images that no path shows any more."""
        paths = list(paths)
        touched: set[int] = set()
        with self.engine.begin() as conn:
            for chunk in chunks(paths, 500):
                rows = conn.execute(select(files.c.image_id).where(files.c.path.in_(chunk))).scalars()
                touched |= {i for i in rows if i is not None}
                conn.execute(delete(files).where(files.c.path.in_(chunk)))
            orphans = self._delete_orphans(conn, touched)
            self._refresh_text(conn, touched - set(orphans))
            self._bump_revision(conn)
            return orphans

    def begin_reindex(self, info: ModelInfo) -> int:
        """Start (or go on with) re-embedding every image with the model `info` describes;
        returns how many images already have its vectors. A re-index of another model left
        unfinished is dropped."""
        with self.engine.begin() as conn:
            raw = self._get_meta(conn, "next_model")
            if raw is None or ModelInfo(**json.loads(raw)).fingerprint != info.fingerprint:
                conn.execute(delete(next_vectors))
                conn.execute(delete(meta).where(meta.c.key == "reindex_gone"))
                self._set_meta(conn, "next_model", json.dumps(info.__dict__))
            return conn.execute(select(func.count()).select_from(next_vectors)).scalar()

    def write_reindexed(self, ids: Sequence[int], vecs: np.ndarray, gone: Sequence[int] = ()) -> None:
        """The re-index's vectors of these images [n, Q, D]; `gone`: images it could not
        embed (no file left with their content), which leave the library at the swap."""
        with self.engine.begin() as conn:
            rows = [{"image_id": int(i), "data": np.ascontiguousarray(v, dtype=VECTOR_DTYPE).tobytes()} for i, v in zip(ids, vecs)]
            if rows:
                conn.execute(insert(next_vectors), rows)
            if gone:
                known = json.loads(self._get_meta(conn, "reindex_gone") or "[]")
                self._set_meta(conn, "reindex_gone", json.dumps(sorted(set(known) | {int(i) for i in gone})))

    def swap_in_reindex(self) -> tuple[ModelInfo, list[int]]:
        """In one transaction: the re-index's vectors become the vectors, its model the
        model; images it could not embed leave (their files too: a later `index` that finds
        one again indexes it anew). Returns (the model, the ids that left)."""
        with self.engine.begin() as conn:
            raw = self._get_meta(conn, "next_model")
            if raw is None:
                raise SearchEngineError("no re-index to finish")
            info = ModelInfo(**json.loads(raw))
            gone = json.loads(self._get_meta(conn, "reindex_gone") or "[]")
            for chunk in chunks(gone, 500):
                conn.execute(delete(files).where(files.c.image_id.in_(chunk)))
                conn.execute(delete(images).where(images.c.id.in_(chunk)))
            self.text.delete(conn, gone)
            have = conn.execute(select(func.count()).select_from(next_vectors)).scalar()
            n = conn.execute(select(func.count()).select_from(images)).scalar()
            if have != n:
                raise SearchEngineError(f"the re-index has vectors for {have} of {n} images; run it again to finish")
            conn.execute(text("ALTER TABLE vectors RENAME TO replaced_vectors"))
            conn.execute(text("ALTER TABLE next_vectors RENAME TO vectors"))
            conn.execute(text("DROP TABLE replaced_vectors"))
            next_vectors.create(conn)
            self._set_meta(conn, "model", raw)
            self._set_meta(conn, "made_by", json.dumps([info.made_by] if info.made_by else []))  # every vector is the re-index's
            self._set_meta(conn, "derived_stale", "1")  # the vector index and feature cache on disk are the old model's
            conn.execute(delete(meta).where(meta.c.key.in_(["next_model", "reindex_gone"])))
            self._bump_revision(conn)
        return info, gone

    def derived_rebuilt(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(meta).where(meta.c.key == "derived_stale"))

    def set_captions(self, rows: Sequence[tuple[int, str | None, str, str | None]]) -> None:
        """Store (image id, caption, model, error) rows; an image deleted meanwhile is skipped.

        A row without a caption records only its error: a caption made earlier, by any model,
        is kept rather than lost to a failed re-run.
        """
        if not rows:
            return
        with self.engine.begin() as conn:
            for image_id, caption, model, error in rows:
                values = dict(caption_error=error)
                if caption is not None:
                    values.update(caption=caption, caption_model=model)
                conn.execute(update(images).where(images.c.id == image_id).values(**values))
            self._refresh_text(conn, [r[0] for r in rows])
            self._bump_revision(conn)
