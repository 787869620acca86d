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
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    bindparam,
    create_engine,
    delete,
    event,
    case,
    cast,
    false,
    func,
    insert,
    inspect,
    or_,
    select,
    text,
    update,
)
from sqlalchemy.engine import URL, Connection, Engine
from sqlalchemy.exc import DatabaseError, IntegrityError

from searchengine.util.durable import disk_full
from searchengine.errors import (
    ModelMismatchError,
    QueryError,
    ReadOnlyIndexError,
    SchemaError,
    SearchEngineError,
    StoreDamagedError,
    StoreMissingError,
)
from searchengine.media.imageio import FILE_TYPES, ORIENTATIONS, ImageMeta, file_type
from searchengine.media.keywords import Clause, KeywordQuery, path_words
from searchengine.store.textindex import KeywordHit, TextIndex, text_index_for

log = logging.getLogger(__name__)

# 1: images, vectors, files, roots, meta. 2: images.caption_error and the full-text index.
# 3: vectors stored as float16 (16 KiB per image for BLIP-2, half of float32).
SCHEMA_VERSION = 4
VECTOR_DTYPE = np.float16

metadata = MetaData()
# Paths compare byte by byte on every backend: folder filters are range scans on the path
# index ("/a/b/" <= path < "/a/b0"), which a linguistic collation (PostgreSQL's default in
# most locales) would break. SQLite compares bytes already.
PATH = Text().with_variant(Text(collation="C"), "postgresql")

meta = Table(
    "meta",
    metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

roots = Table(
    "roots",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("path", PATH, nullable=False, unique=True),
    Column("added_at", Float, nullable=False),
)

images = Table(
    "images",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("sha256", String(64), nullable=False, unique=True),
    Column("width", Integer, nullable=False),
    Column("height", Integer, nullable=False),
    Column("taken_at", Text),  # ISO 8601 from EXIF DateTimeOriginal, no time zone
    Column("camera", Text),
    Column("lens", Text),  # EXIF LensModel (schema 4; NULL for images indexed before it)
    Column("gps_lat", Float),
    Column("gps_lon", Float),
    Column("caption", Text),
    Column("caption_model", Text),
    Column("caption_error", Text),  # why the caption model gave no caption (the image stays indexed)
    Column("created_at", Float, nullable=False),
    sqlite_autoincrement=True,  # ids are never reused: a deleted image's id stays dead
)

vectors = Table(
    "vectors",
    metadata,
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    Column("data", LargeBinary, nullable=False),  # float16 [Q, D], C order (float32 before schema 3)
)

# A re-index's vectors (`searchengine reindex`): filled while `vectors` goes on serving, then
# renamed to `vectors` in the transaction that records the new model (`swap_in_reindex`).
next_vectors = Table(
    "next_vectors",
    metadata,
    Column("image_id", Integer, ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
    Column("data", LargeBinary, nullable=False),
)

files = Table(
    "files",
    metadata,
    Column("id", Integer, primary_key=True),
    Column("path", PATH, nullable=False, unique=True),
    Column("image_id", Integer, ForeignKey("images.id", ondelete="SET NULL"), index=True),
    Column("size", BigInteger, nullable=False),
    Column("mtime_ns", BigInteger, nullable=False),
    Column("status", String(16), nullable=False),  # "indexed" | "failed"
    Column("reason", String(32)),
    Column("error", Text),
    Column("updated_at", Float, nullable=False),
)


@dataclass(frozen=True)
class ModelInfo:
    name: str
    fingerprint: str
    num_vectors: int
    dim: int
    vit_shape: tuple[int, int]
    dtype: str = ""  # what the first run embedded in; every run's: `Store.made_by`
    device: str = ""  # the kind of device it ran on: cpu, cuda, mps ("" in indexes from before it was recorded)

    @property
    def made_by(self) -> str:
        return f"{self.dtype} on {self.device}" if self.device else self.dtype

    def __post_init__(self) -> None:
        object.__setattr__(self, "vit_shape", tuple(self.vit_shape))


def mismatch_message(have: ModelInfo, info: ModelInfo) -> str:
    """What differs between the model an index was built with and the one opened on it."""
    shape = lambda m: f"{m.num_vectors} vectors of {m.dim} a image, ViT output {m.vit_shape[0]}x{m.vit_shape[1]}"  # noqa: E731
    arch = "" if shape(have) == shape(info) else f" It is another architecture too: {shape(info)} against the index's {shape(have)}."
    if have.name == info.name:
        return (
            f"the weights of model {info.name!r} have changed since this index was built (fingerprint "
            f"{have.fingerprint} then, {info.fingerprint} now), so its vectors are not this model's.{arch} "
            f"Put the old weights back, re-embed the library with the new ones (searchengine reindex --model "
            f"{info.name}), or use another --data-dir"
        )
    return (
        f"this index was built with model {have.name!r} (fingerprint {have.fingerprint}); {info.name!r} "
        f"(fingerprint {info.fingerprint}) is another checkpoint.{arch} Use the index's own (--model {have.name}, "
        f"or no --model), re-embed the library with the other (searchengine reindex --model {info.name}), "
        "or use another --data-dir"
    )


@dataclass(frozen=True)
class FileState:
    size: int
    mtime_ns: int
    status: str
    image_id: int | None


@dataclass
class ImageRecord:
    id: int
    paths: list[str]  # in the order they were first indexed: the original first
    width: int
    height: int
    taken_at: str | None
    camera: str | None
    caption: str | None


@dataclass(frozen=True)
class FolderCount:
    path: str
    images: int  # distinct images with a file in this folder or below it


@dataclass
class Stats:
    images: int
    files: int
    failed: int
    failures_by_reason: dict[str, int]
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # path, reason, error
    roots: list[str] = field(default_factory=list)
    model: ModelInfo | None = None
    captioned: int = 0
    caption_models: dict[str, int] = field(default_factory=dict)
    caption_failures: int = 0


def sqlite_url(path: Path) -> URL:
    """The URL of an SQLite file, built rather than written: as text, a `?` or `#` in a
    folder's name began a query string, and the store went to a path cut short there."""
    return URL.create("sqlite", database=str(path))


def sqlite_readonly_url(path: Path, *, no_room: bool = False) -> URL:
    """A URL that opens `path` for reading only, never creating or changing a file.

    A WAL reader normally creates the -shm file next to the database. Where the folder cannot
    be written and no -shm exists (a backup copy, a read-only mount of a cleanly closed
    index), SQLite could not open it at all; `immutable=1` tells it nothing will change the
    file meanwhile, so it reads without the shared memory file. Where -wal and -shm exist,
    they are read as they are (committed transactions still in the WAL count).
    """
    path = Path(path).absolute()
    query = {"mode": "ro", "uri": "true"}
    side_files = [Path(f"{path}-wal"), Path(f"{path}-shm")]
    if not any(p.exists() for p in side_files) and not os.access(path.parent, os.W_OK):
        query["immutable"] = "1"
    # `no_room` (a full disk): the shared memory file cannot grow; where the WAL holds nothing
    # the main file is the whole index, and is read as it is.
    wal = side_files[0]
    if no_room and (not wal.exists() or wal.stat().st_size == 0):
        query["immutable"] = "1"
    # The path is percent-encoded: SQLite decodes it, and a '?' or '#' in a folder name would
    # otherwise end the file name.
    return URL.create("sqlite", database="file:" + urllib.parse.quote(str(path)), query=query)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # WAL: readers never block the writer. synchronous=NORMAL is safe against a killed
    # process (the case the crash tests cover); FULL would add an fsync per commit.
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def _sqlite_readonly_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    # No journal_mode: setting it is a write. query_only turns any write that slips through
    # into an error here rather than a surprise on a mount that happens to be writable.
    cur.execute("PRAGMA query_only=ON")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.close()


def damage(e: BaseException) -> str:
    """What SQLite said about a damaged file, in its own words (first line, no SQL)."""
    orig = getattr(e, "orig", None) or e
    return (str(orig).strip().splitlines() or [type(orig).__name__])[0]


def is_damage(e: BaseException) -> bool:
    """A database error that says the file is not (any more) a sound database."""
    text = damage(e).lower()
    return isinstance(e, DatabaseError) and any(
        w in text for w in ("malformed", "not a database", "database disk image", "file is encrypted")
    )


def is_unreachable(e: BaseException) -> bool:
    """A database error that says the store cannot be reached now (a database server down or
    restarting, a dropped connection, a file on a disk that went away), not that a request
    was wrong: retried, it may well work."""
    from sqlalchemy.exc import InterfaceError, OperationalError

    if not isinstance(e, (OperationalError, InterfaceError)) or is_damage(e):
        return False
    text = damage(e).lower()
    return not any(w in text for w in ("syntax error", "no such table", "no such column", "database is locked"))


def _hold_to_file(engine: Engine, path: Path) -> None:
    """Tie the engine to the SQLite file it opened: each time a connection is taken, the
    path must still name that file (device and inode). A store deleted (`rm store.db*`) or
    replaced under a running server was read and written through its old, unlinked file:
    deleted photos still returned, new ones logged "indexed" and lost at exit. Now each use
    after that raises StoreMissingError, which the API answers 503 and /healthz reports,
    and which the watcher keeps retrying rather than losing its files."""
    st = os.stat(path)
    opened = (st.st_dev, st.st_ino)

    def check() -> None:
        try:
            now = os.stat(path)
            what = None if (now.st_dev, now.st_ino) == opened else "was replaced by another file"
        except FileNotFoundError:
            what = "was deleted"
        except OSError:
            return  # an unreadable folder: the database's own error says more
        if what is not None:
            raise StoreMissingError(
                f"the store {path} {what} while this process had it open: nothing more is read from or written to the "
                "file it had. Restart this process to open what is there now (`searchengine restore` puts back the "
                "newest backup if the store was deleted)"
            )

    def connect(dialect, record, cargs, cparams) -> None:
        check()
        if cargs and cargs[0] == str(path):  # never make a new, empty file where the store was
            cargs[0] = "file:" + urllib.parse.quote(str(path)) + "?mode=rw"
            cparams["uri"] = True

    event.listen(engine, "do_connect", connect)  # a new connection (its file could reuse the inode number)
    event.listen(engine, "checkout", lambda *a: check())  # one from the pool, open on the file it had


class Store:
    def __init__(self, engine: Engine, *, read_only: bool = False) -> None:
        self.engine = engine
        self.read_only = read_only
        self.text: TextIndex = text_index_for(engine.dialect.name)
        self._has_lens: bool | None = None  # a read-only index of schema 3 or older has no lens column

    @classmethod
    def open(cls, url: str | URL, *, read_only: bool = False, location: str = "") -> "Store":
        """Open (and create or upgrade) the store; with `read_only`, open it as it is.

        A read-only store is never created, upgraded or written: its schema must be the one
        this program writes. `location` names the store in messages (the URL may hold a secret).
        """
        engine = create_engine(url)
        if engine.dialect.name == "sqlite":
            event.listen(engine, "connect", _sqlite_readonly_pragmas if read_only else _sqlite_pragmas)
        store = cls(engine, read_only=read_only)
        where = location or engine.url.render_as_string(hide_password=True)
        try:
            if read_only:
                store._check_schema(where)
            else:
                store._migrate()
            if not read_only and engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
                _hold_to_file(engine, Path(engine.url.database))
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

    # -- schema ---------------------------------------------------------------------------

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
                for chunk in _chunks(ids, 500):
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

    def _get_meta(self, conn: Connection, key: str) -> str | None:
        return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

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
        for chunk in _chunks(ids, 500):
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

    def problem(self) -> str | None:
        """None when the store answers a read; else what SQLite says is wrong with its file."""
        try:
            self.revision()
            with self.engine.connect() as conn:
                conn.execute(select(images.c.id).limit(1)).all()
        except DatabaseError as e:
            if is_damage(e):
                return damage(e)
            raise
        return None

    def revision(self) -> int:
        """Grows with every committed change: how a reader in another process notices writes."""
        with self.engine.connect() as conn:
            return int(self._get_meta(conn, "revision") or 0)

    def model_info(self) -> ModelInfo | None:
        with self.engine.connect() as conn:
            raw = self._get_meta(conn, "model")
        return ModelInfo(**json.loads(raw)) if raw else None

    def captioner(self) -> tuple[bool, str | None] | None:
        """(captions on, caption model) as the last indexing run used them; None if never recorded."""
        with self.engine.connect() as conn:
            raw = self._get_meta(conn, "captioner")
        if not raw:
            return None
        data = json.loads(raw)
        return bool(data.get("captions")), data.get("model")

    def link_policy(self) -> str | None:
        """The link policy the last indexing run used (see searchengine.media.links); None if never recorded."""
        with self.engine.connect() as conn:
            return self._get_meta(conn, "links")

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
            if raw is None:
                if not self.read_only:
                    self._set_meta(conn, "model", json.dumps(info.__dict__))
                return
            have = ModelInfo(**json.loads(raw))
            if have.fingerprint == info.fingerprint:
                return
            if have.fingerprint in set(former) and have.vit_shape == info.vit_shape:
                if not self.read_only:
                    upgraded = dict(json.loads(raw), fingerprint=info.fingerprint)
                    self._set_meta(conn, "model", json.dumps(upgraded))
                    log.info("the index's model fingerprint %s (taken in %s by an earlier version) is now %s, "
                             "taken from the weights as stored", have.fingerprint, have.dtype or "bf16", info.fingerprint)
                return
        raise ModelMismatchError(mismatch_message(have, info))

    def mounted_roots(self) -> set[str]:
        """The library folders that were mount points when last scanned."""
        with self.engine.connect() as conn:
            return set(json.loads(self._get_meta(conn, "mounted_roots") or "[]"))

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

    def made_by(self) -> list[str]:
        """How the model ran that made this index's vectors (`record_made_by`), first first."""
        with self.engine.connect() as conn:
            raw = self._get_meta(conn, "made_by")
            return list(json.loads(raw)) if raw else self._made_before_it_was_recorded(conn)

    def _made_before_it_was_recorded(self, conn: Connection) -> list[str]:
        """An index from before `made_by` was kept (its model record names no device): the
        dtype its first run recorded, if it has vectors."""
        model = self._get_meta(conn, "model")
        info = ModelInfo(**json.loads(model)) if model else None
        if info is None or info.device or not info.dtype:
            return []
        has_vectors = conn.execute(select(vectors.c.image_id).limit(1)).first() is not None
        return [info.dtype] if has_vectors else []

    # -- roots ----------------------------------------------------------------------------

    def add_root(self, path: str) -> None:
        with self.engine.begin() as conn:
            if conn.execute(select(roots.c.id).where(roots.c.path == path)).first() is None:
                conn.execute(insert(roots).values(path=path, added_at=time.time()))

    def roots(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(roots.c.path).order_by(roots.c.path))]

    # -- files ----------------------------------------------------------------------------

    def files_under(self, root: str) -> dict[str, FileState]:
        """Every file the store has below `root` (a directory path without trailing slash)."""
        prefix = root.rstrip("/") + "/"
        # Range scan instead of LIKE, which would treat % and _ in folder names as wildcards.
        q = select(files.c.path, files.c.size, files.c.mtime_ns, files.c.status, files.c.image_id).where(
            files.c.path >= prefix, files.c.path < prefix[:-1] + "0"
        )
        with self.engine.connect() as conn:
            return {r.path: FileState(r.size, r.mtime_ns, r.status, r.image_id) for r in conn.execute(q)}

    def file_state(self, path: str) -> FileState | None:
        q = select(files.c.size, files.c.mtime_ns, files.c.status, files.c.image_id).where(files.c.path == path)
        with self.engine.connect() as conn:
            r = conn.execute(q).first()
        return FileState(r.size, r.mtime_ns, r.status, r.image_id) if r else None

    def hashes_of(self, paths: Sequence[str]) -> dict[str, str]:
        """path -> content hash of those of these paths that are indexed."""
        out: dict[str, str] = {}
        with self.engine.connect() as conn:
            for chunk in _chunks(list(paths), 500):
                q = select(files.c.path, images.c.sha256).join(images, files.c.image_id == images.c.id).where(files.c.path.in_(chunk))
                out.update(conn.execute(q).tuples().all())
        return out

    def indexed_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of these contents the store has an image for: one query per call."""
        with self.engine.connect() as conn:
            return set(_ids_by_hash(conn, hashes))

    def size_bytes(self) -> int:
        """What the store takes on a database server (PostgreSQL: the database's size)."""
        if self.engine.dialect.name != "postgresql":
            raise NotImplementedError("a SQLite store's size is its file's (Library.sizes)")
        with self.engine.connect() as conn:
            return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())

    def all_hashes(self) -> list[str]:
        """Every content hash the store has an image for."""
        with self.engine.connect() as conn:
            return list(conn.execute(select(images.c.sha256)).scalars())

    def image_id_for_hash(self, sha256: str) -> int | None:
        with self.engine.connect() as conn:
            return conn.execute(select(images.c.id).where(images.c.sha256 == sha256)).scalar()

    def write_batch(
        self,
        new_images: Sequence[tuple[str, ImageMeta, np.ndarray, Sequence[tuple[str, int, int]]]] = (),
        links: Sequence[tuple[str, int, int, str]] = (),
        failures: Sequence[tuple[str, int, int, str, str]] = (),
    ) -> tuple[list[int], list[int]]:
        """Commit one batch in one transaction.

        new_images: (sha256, meta, vectors [Q, D], [(path, size, mtime_ns), ...])
        links: (path, size, mtime_ns, sha256) of files whose content is already indexed
        failures: (path, size, mtime_ns, reason, error)
        Returns (ids of the new images, ids of images left with no file, now deleted). A new
        image whose content another writer committed first (two indexers sharing a database
        server, each with a copy of one photo) is linked to that one instead: its id is None.
        """
        taken: set[str] = set()
        for attempt in range(3):
            kept = [n for n in new_images if n[0] not in taken]
            extra = [(p, size, m, sha) for sha, _, _, paths in new_images if sha in taken for p, size, m in paths]
            try:
                ids, orphans = self._write_batch(kept, [*links, *extra], failures)
            except IntegrityError:
                now_taken = self.indexed_hashes(n[0] for n in new_images)
                if attempt == 2 or not (now_taken - taken):
                    raise
                log.info("%d images of a batch were indexed by another writer meanwhile: linked to theirs", len(now_taken))
                taken = now_taken
                continue
            made = iter(ids)
            return [None if n[0] in taken else next(made) for n in new_images], orphans
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _write_batch(self, new_images, links, failures) -> tuple[list[int], list[int]]:
        # A handful of statements a batch, not four an image: the single writer has to keep up
        # with a GPU (benchmarks/store_backends.py).
        now = time.time()
        linked: set[int] = set()  # images that gained a path
        with self.engine.begin() as conn:
            new_ids: list[int] = []
            if new_images:
                # Many rows in one statement, then their ids by content (unique): an INSERT ...
                # RETURNING that keeps the rows' order runs one row at a time on SQLite.
                conn.execute(insert(images), [dict(sha256=sha, created_at=now, **m.__dict__) for sha, m, _, _ in new_images])
                made = self._ids_of(conn, [sha for sha, *_ in new_images])
                new_ids = [made[sha] for sha, *_ in new_images]
                conn.execute(insert(vectors), [
                    dict(image_id=i, data=np.ascontiguousarray(vec, VECTOR_DTYPE).tobytes())
                    for i, (_, _, vec, _) in zip(new_ids, new_images)
                ])
            rows = [(path, size, mtime_ns, "indexed", i, None, None)
                    for i, (_, _, _, paths) in zip(new_ids, new_images) for path, size, mtime_ns in paths]
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
        found = _ids_by_hash(conn, hashes)
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
        for chunk in _chunks(list(latest), 500):
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
        for chunk in _chunks(sorted(set(candidates)), 500):
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
            for chunk in _chunks(paths, 500):
                rows = conn.execute(select(files.c.image_id).where(files.c.path.in_(chunk))).scalars()
                touched |= {i for i in rows if i is not None}
                conn.execute(delete(files).where(files.c.path.in_(chunk)))
            orphans = self._delete_orphans(conn, touched)
            self._refresh_text(conn, touched - set(orphans))
            self._bump_revision(conn)
            return orphans

    # -- images and vectors ---------------------------------------------------------------

    def image_ids(self) -> np.ndarray:
        with self.engine.connect() as conn:
            return np.fromiter(conn.execute(select(vectors.c.image_id)).scalars(), dtype=np.int64)

    def iter_vectors(self, ids: Iterable[int] | None = None, chunk: int = 1000) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield (ids [n], vectors [n, Q, D]) in chunks; all of them when `ids` is None."""
        info = self.model_info()
        if info is None:
            return
        shape = (info.num_vectors, info.dim)
        wanted = None if ids is None else sorted(int(i) for i in ids)
        with self.engine.connect() as conn:
            if wanted is None:
                batches: Iterable = [conn.execute(select(vectors.c.image_id, vectors.c.data).order_by(vectors.c.image_id))]
            else:
                batches = (
                    conn.execute(select(vectors.c.image_id, vectors.c.data).where(vectors.c.image_id.in_(c)))
                    for c in _chunks(wanted, chunk)
                )
            for result in batches:
                while rows := result.fetchmany(chunk):
                    out_ids = np.array([r[0] for r in rows], dtype=np.int64)
                    vecs = _decode_vectors([r[1] for r in rows], shape)
                    yield out_ids, vecs

    def read_vectors(self, ids: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids found [n], vectors [n, Q, D] float32) of images given by id: the query path's
        re-scoring read, one statement per 5,000 ids with the ids inlined (integers), which
        spares the bound-parameter expansion (measured 13 against 16 ms for 256 images)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        got_ids, blobs = [], []
        with self.engine.connect() as conn:
            for c in _chunks(ids.tolist(), 5000):
                sql = f"SELECT image_id, data FROM vectors WHERE image_id IN ({','.join(str(int(i)) for i in c)})"
                for image_id, data in conn.exec_driver_sql(sql):
                    got_ids.append(image_id)
                    blobs.append(data)
        return np.asarray(got_ids, dtype=np.int64), _decode_vectors(blobs, shape)

    # -- re-indexing with another model ----------------------------------------------------

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

    def reindex_model(self) -> ModelInfo | None:
        """The model of a re-index under way (or interrupted), if any."""
        with self.engine.connect() as conn:
            raw = self._get_meta(conn, "next_model")
        return ModelInfo(**json.loads(raw)) if raw else None

    def reindex_todo(self, limit: int) -> list[tuple[int, str, list[str]]]:
        """Up to `limit` images the re-index has not embedded yet, by id: (id, sha256, paths)."""
        with self.engine.connect() as conn:
            done = select(next_vectors.c.image_id)
            gone = json.loads(self._get_meta(conn, "reindex_gone") or "[]")  # found with no file: not asked for again
            rows = conn.execute(
                select(images.c.id, images.c.sha256)
                .where(images.c.id.not_in(done), images.c.id.not_in(gone))
                .order_by(images.c.id)
                .limit(limit)
            ).all()
            paths: dict[int, list[str]] = {r.id: [] for r in rows}
            for chunk in _chunks(list(paths), 500):
                for image_id, path in conn.execute(
                    select(files.c.image_id, files.c.path).where(files.c.image_id.in_(chunk)).order_by(files.c.id)
                ):
                    paths[image_id].append(path)
        return [(r.id, r.sha256, paths[r.id]) for r in rows]

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
            for chunk in _chunks(gone, 500):
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

    def derived_stale(self) -> bool:
        """True from a re-index's swap until the library has rebuilt what it derives from the
        vectors (the vector index, the feature cache) for the new model."""
        with self.engine.connect() as conn:
            return self._get_meta(conn, "derived_stale") == "1"

    def derived_rebuilt(self) -> None:
        with self.engine.begin() as conn:
            conn.execute(delete(meta).where(meta.c.key == "derived_stale"))

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        out: dict[int, ImageRecord] = {}
        if not ids:
            return out
        # One statement per 500 ids: a row per file, its image's columns alongside. Oldest file
        # first (row ids grow; an update in place keeps its row): a copy added later never
        # takes the original's place as the path a hit shows.
        columns = (images.c.id, images.c.width, images.c.height, images.c.taken_at, images.c.camera, images.c.caption)
        with self.engine.connect() as conn:
            for chunk in _chunks(list(ids), 500):
                q = (
                    select(*columns, files.c.path)
                    .select_from(images.outerjoin(files, files.c.image_id == images.c.id))
                    .where(images.c.id.in_(chunk))
                    .order_by(files.c.id)
                )
                for r in conn.execute(q):
                    rec = out.get(r.id)
                    if rec is None:
                        rec = out[r.id] = ImageRecord(r.id, [], r.width, r.height, r.taken_at, r.camera, r.caption)
                    if r.path is not None:
                        rec.paths.append(r.path)
        return out

    def filter_ids(self, filters) -> np.ndarray:
        """Ids of images within `filters` (see `queries.Filters`): a file below its folder (see
        `folder_condition`), taken within [after, before] (ISO), its camera, lens, file type
        and orientation."""
        with self.engine.connect() as conn:
            return np.fromiter(conn.execute(self._filter_select(filters)).scalars(), dtype=np.int64)

    @property
    def has_lens(self) -> bool:
        if self._has_lens is None:
            with self.engine.connect() as conn:
                names = {c["name"] for c in inspect(conn).get_columns("images")}
            self._has_lens = "lens" in names
        return self._has_lens

    def _filter_select(self, filters, skip: str | None = None):
        """SELECT of the ids of images within `filters`, less the facet `skip` (for its counts)."""
        q = select(images.c.id)
        if filters.folder:
            q = q.where(images.c.id.in_(select(files.c.image_id).where(folder_condition(filters.folder))))
        if filters.taken_after:
            q = q.where(images.c.taken_at >= filters.taken_after)
        if filters.taken_before:
            q = q.where(images.c.taken_at <= filters.taken_before)
        if filters.camera and skip != "camera":
            q = q.where(images.c.camera == filters.camera)
        if filters.lens and skip != "lens":
            q = q.where(images.c.lens == filters.lens) if self.has_lens else q.where(false())
        if filters.file_type and skip != "type":
            exts = FILE_TYPES.get(filters.file_type, ())
            q = q.where(images.c.id.in_(
                select(files.c.image_id).where(or_(false(), *(func.lower(files.c.path).like(f"%{e}") for e in exts)))
            ))
        if filters.orientation and skip != "orientation":
            q = q.where(_ORIENTATIONS[filters.orientation])
        return q

    def facets(self, filters, limit: int = 50) -> dict[str, list[tuple[str, int]]]:
        """Counts of images per camera, lens, file type and orientation, most first (at most
        `limit` values each), among the images within `filters` less that facet's own choice:
        what choosing another value of it would give."""
        out: dict[str, list[tuple[str, int]]] = {}
        with self.engine.connect() as conn:
            for name, column in (("camera", images.c.camera), ("lens", images.c.lens if self.has_lens else None)):
                if column is None:
                    out[name] = []
                    continue
                q = (
                    select(column, func.count()).where(images.c.id.in_(self._filter_select(filters, skip=name)), column.is_not(None))
                    .group_by(column).order_by(func.count().desc(), column).limit(limit)
                )
                out[name] = [(v, n) for v, n in conn.execute(q)]
            shape = case(*((_ORIENTATIONS[name], name) for name in ORIENTATIONS), else_="square")  # no size: as before
            q = select(shape, func.count()).where(images.c.id.in_(self._filter_select(filters, skip="orientation"))).group_by(shape)
            out["orientation"] = sorted(((v, n) for v, n in conn.execute(q)), key=lambda x: (-x[1], x[0]))
            within = self._filter_select(filters, skip="type")
            rows = conn.execute(select(files.c.image_id, files.c.path).where(files.c.image_id.in_(within)))
            types: dict[str, set[int]] = {}
            for image_id, path in rows:
                kind = file_type(path)
                if kind is not None:
                    types.setdefault(kind, set()).add(image_id)
            out["type"] = sorted(((k, len(v)) for k, v in types.items()), key=lambda x: (-x[1], x[0]))[:limit]
        return out

    def folder_has_images(self, folder: str) -> bool:
        """Whether any indexed file lies below `folder` (read as `folder_condition` reads it)."""
        q = select(files.c.id).where(files.c.image_id.is_not(None), folder_condition(folder)).limit(1)
        with self.engine.connect() as conn:
            return conn.execute(q).first() is not None

    def folders(self) -> list[FolderCount]:
        """Every folder that holds indexed images, subfolders included, with its image count
        (a folder counts the images below it too, as the folder filter does), by path.

        Folders are derived from the file paths: each file's folder and its parents up to the
        library root it was indexed under (the root's own parents are not listed).
        """
        with self.engine.connect() as conn:
            root_paths = sorted(conn.execute(select(roots.c.path)).scalars(), key=len, reverse=True)
            rows = conn.execute(select(files.c.path, files.c.image_id).where(files.c.image_id.is_not(None))).all()
        below: dict[str, set[int]] = {}
        for path, image_id in rows:
            # The longest root the file is under: nested roots end the walk at the inner one.
            top = next((r for r in root_paths if path.startswith(r.rstrip("/") + "/")), None)
            folder = os.path.dirname(path)
            while True:
                below.setdefault(folder, set()).add(image_id)
                if top is None or len(folder) <= len(top.rstrip("/")) or folder in ("/", ""):
                    break
                folder = os.path.dirname(folder)
        return [FolderCount(f, len(ids)) for f, ids in sorted(below.items())]

    # -- captions and keywords ------------------------------------------------------------

    def keyword_search(self, query: KeywordQuery, limit: int, filters=None) -> list[KeywordHit]:
        """Images whose caption or path words match, best first (see `TextIndex.search`),
        within `filters` (see `queries.Filters`) if given."""
        within = self._filter_select(filters) if filters is not None and filters.active else None
        with self.engine.connect() as conn:
            return self.text.search(conn, query, limit, within, select(func.count()).select_from(images))

    def keyword_matches(self, clauses: Sequence[Clause]) -> np.ndarray:
        """Ids of images whose caption or path words match any of these clauses."""
        with self.engine.connect() as conn:
            return np.array(sorted(self.text.matching(conn, clauses)), dtype=np.int64)

    def images_to_caption(self, model: str, redo: bool = False) -> list[tuple[int, list[str]]]:
        """(id, paths) of images with no caption from `model`, or whose captioning failed; all with `redo`."""
        q = select(images.c.id).order_by(images.c.id)
        if not redo:
            q = q.where(
                images.c.caption_model.is_(None) | (images.c.caption_model != model) | images.c.caption_error.is_not(None)
            )
        with self.engine.connect() as conn:
            ids = list(conn.execute(q).scalars())
        records = self.images(ids)
        return [(i, records[i].paths) for i in ids if i in records]

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

    def image_detail(self, image_id: int) -> dict | None:
        """Everything the store knows of one image, with its files."""
        with self.engine.connect() as conn:
            row = conn.execute(select(images).where(images.c.id == image_id)).first()
            if row is None:
                return None
            out = dict(row._mapping)
            out["files"] = [
                dict(r._mapping)
                for r in conn.execute(
                    select(files.c.path, files.c.size, files.c.mtime_ns)
                    .where(files.c.image_id == image_id)
                    .order_by(files.c.id)  # oldest first, as `images` lists them
                )
            ]
        return out

    # -- stats ----------------------------------------------------------------------------

    def consistency(self) -> dict[str, int]:
        """Counts that must agree in a sound store (what `searchengine check` compares)."""
        info = self.model_info()
        # float16; float32 is read too (a schema-2 index opened read-only)
        want = [info.num_vectors * info.dim * 2, info.num_vectors * info.dim * 4] if info else None
        with self.engine.connect() as conn:
            n_images = conn.execute(select(func.count()).select_from(images)).scalar_one()
            n_vectors = conn.execute(select(func.count()).select_from(vectors)).scalar_one()
            bad_vectors = (
                conn.execute(select(func.count()).select_from(vectors).where(func.length(vectors.c.data).not_in(want))).scalar_one()
                if want else 0
            )
            text_rows = self.text.count(conn)
            no_file = conn.execute(
                select(func.count()).select_from(images).where(~images.c.id.in_(select(files.c.image_id).where(files.c.image_id.is_not(None))))
            ).scalar_one()
        return {"images": n_images, "vectors": n_vectors, "bad_vectors": bad_vectors, "text_rows": text_rows, "images_without_file": no_file}

    def indexed_paths(self) -> Iterator[str]:
        with self.engine.connect() as conn:
            yield from conn.execute(select(files.c.path).where(files.c.status == "indexed")).scalars()

    def stats(self, max_failures: int = 20) -> Stats:
        with self.engine.connect() as conn:
            n_images = conn.execute(select(func.count()).select_from(images)).scalar()
            n_files = conn.execute(select(func.count()).select_from(files).where(files.c.status == "indexed")).scalar()
            by_reason = dict(
                conn.execute(
                    select(files.c.reason, func.count()).where(files.c.status == "failed").group_by(files.c.reason)
                ).all()
            )
            captioned = conn.execute(select(func.count()).select_from(images).where(images.c.caption.is_not(None))).scalar()
            caption_failures = conn.execute(
                select(func.count()).select_from(images).where(images.c.caption_error.is_not(None))
            ).scalar()
            caption_models = dict(
                conn.execute(
                    select(images.c.caption_model, func.count())
                    .where(images.c.caption_model.is_not(None))
                    .group_by(images.c.caption_model)
                ).all()
            )
            failures = [
                (r.path, r.reason, r.error)
                for r in conn.execute(
                    select(files.c.path, files.c.reason, files.c.error)
                    .where(files.c.status == "failed")
                    .order_by(files.c.path)
                    .limit(max_failures)
                )
            ]
        return Stats(
            images=n_images,
            files=n_files,
            failed=sum(by_reason.values()),
            failures_by_reason=by_reason,
            failures=failures,
            roots=self.roots(),
            model=self.model_info(),
            captioned=captioned,
            caption_models=caption_models,
            caption_failures=caption_failures,
        )


_ORIENTATIONS = {  # what each of imageio.ORIENTATIONS means
    "landscape": images.c.width > images.c.height,
    "portrait": images.c.height > images.c.width,
    "square": images.c.width == images.c.height,
}


def folder_condition(folder: str):
    """The condition on `files.path` that a folder filter stands for.

    - An absolute path, or one from the home folder (`~`, `~/Pictures`, expanded here, on the
      server): every file below that folder. A range scan on the path index rather than LIKE,
      which would treat `%` and `_` in folder names as wildcards; case-sensitive, like the
      file system.
    - Anything else is a folder name or the last parts of a folder's path (`Winter 2022`,
      `2022/Winter`): every file below any folder whose path ends with those whole parts,
      anywhere in the library. Case-insensitive (on SQLite for ASCII letters only), because
      a name typed from memory rarely has the right case; `%` and `_` are escaped.
    QueryError when the filter cannot name a folder (empty, or with `..`).
    """
    spec = folder.strip()
    if spec.startswith("~"):
        spec = os.path.expanduser(spec)  # `~unknown-user` stays as it is: read as a name below
    if spec.startswith("/"):
        prefix = spec.rstrip("/") + "/"
        return (files.c.path >= prefix) & (files.c.path < prefix[:-1] + "0")
    parts = [p for p in spec.split("/") if p not in ("", ".")]
    if not parts:
        raise QueryError("the folder filter is empty: give a folder's name or its path")
    if ".." in parts:
        raise QueryError(f"the folder filter {folder!r} has '..': give a folder's name, or its absolute path")
    # Between slashes, so `Winter` matches the folder `Winter`, not `Winter 2022` or a file name.
    return files.c.path.icontains("/" + "/".join(parts) + "/", autoescape=True)


def _decode_vectors(blobs: Sequence[bytes], shape: tuple[int, int]) -> np.ndarray:
    """Stored vector blobs -> [n, Q, D] float32: float16 (schema 3), or float32 in a schema-2
    index opened read-only, told apart by their length."""
    blob = b"".join(blobs)
    n = len(blobs)
    dtype = VECTOR_DTYPE if len(blob) == n * shape[0] * shape[1] * 2 else np.float32
    return np.frombuffer(blob, dtype=dtype).reshape(n, *shape).astype(np.float32)


def _chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def _ids_by_hash(conn: Connection, hashes: Iterable[str]) -> dict[str, int]:
    """sha256 -> image id, for those of these contents the store has (500 a query: SQLite's
    bound-parameter limit)."""
    found: dict[str, int] = {}
    for chunk in _chunks(sorted(set(hashes)), 500):
        found.update(conn.execute(select(images.c.sha256, images.c.id).where(images.c.sha256.in_(chunk))).all())
    return found
