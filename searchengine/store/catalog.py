"""Read-only queries of the store: images and their files, vectors, filters, facets, folders,
keywords, the records a check and `stats` read."""

from __future__ import annotations

import json
import os
from typing import Iterable, Iterator, Sequence

import numpy as np
from sqlalchemy import case, false, func, inspect, literal, or_, select, text
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DatabaseError

from searchengine.media.imageio import FILE_TYPES, ORIENTATIONS, file_type
from searchengine.media.keywords import Clause, KeywordQuery
from searchengine.store.connection import damage, is_damage
from searchengine.store.records import (
    FileState, FolderCount, ImageDetail, ImageRecord, IndexedFile, ModelInfo, Stats, recorded_as,
)
from searchengine.store.schema import (
    ORIENTATION_SQL,
    VECTOR_DTYPE,
    files,
    folder_condition,
    images,
    meta,
    next_vectors,
    roots,
    vectors,
)
from searchengine.store.textindex import KeywordHit, TextIndex, text_index_for


class Catalog:
    """The store's reads: what the library, search and the service look up. Holds no write;
    `Store` (searchengine.store.writes) is a Catalog that also writes."""

    def __init__(self, engine: Engine, *, read_only: bool = False) -> None:
        self.engine = engine
        self.read_only = read_only
        self.text: TextIndex = text_index_for(engine.dialect.name)
        self._has_lens: bool | None = None  # a read-only index of schema 3 or older has no lens column

    def _get_meta(self, conn: Connection, key: str) -> str | None:
        return conn.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

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

    def check_model(self, info: ModelInfo, former: Iterable[str] = ()) -> None:
        """Refuse (ModelMismatchError) a model other than the one this index was built with;
        the read a search makes (`Store.bind_model` is the indexer's, which records it)."""
        recorded_as(self.model_info(), info, former)

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

    def mounted_roots(self) -> set[str]:
        """The library folders that were mount points when last scanned."""
        with self.engine.connect() as conn:
            return set(json.loads(self._get_meta(conn, "mounted_roots") or "[]"))

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

    def roots(self) -> list[str]:
        with self.engine.connect() as conn:
            return [r[0] for r in conn.execute(select(roots.c.path).order_by(roots.c.path))]

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
            for chunk in chunks(list(paths), 500):
                q = select(files.c.path, images.c.sha256).join(images, files.c.image_id == images.c.id).where(files.c.path.in_(chunk))
                out.update(conn.execute(q).tuples().all())
        return out

    def indexed_hashes(self, hashes: Iterable[str]) -> set[str]:
        """Which of these contents the store has an image for: one query per call."""
        with self.engine.connect() as conn:
            return set(ids_by_hash(conn, hashes))

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
                    for c in chunks(wanted, chunk)
                )
            for result in batches:
                while rows := result.fetchmany(chunk):
                    out_ids = np.array([r[0] for r in rows], dtype=np.int64)
                    vecs = decode_vectors([r[1] for r in rows], shape)
                    yield out_ids, vecs

    def read_vectors(self, ids: np.ndarray, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids found [n], vectors [n, Q, D] float32) of images given by id: the query path's
        re-scoring read, one statement per 5,000 ids with the ids inlined (integers), which
        spares the bound-parameter expansion (measured 13 against 16 ms for 256 images)."""
        ids = np.unique(np.asarray(ids, dtype=np.int64))
        got_ids, blobs = [], []
        with self.engine.connect() as conn:
            for c in chunks(ids.tolist(), 5000):
                sql = f"SELECT image_id, data FROM vectors WHERE image_id IN ({','.join(str(int(i)) for i in c)})"
                for image_id, data in conn.exec_driver_sql(sql):
                    got_ids.append(image_id)
                    blobs.append(data)
        return np.asarray(got_ids, dtype=np.int64), decode_vectors(blobs, shape)

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
            for chunk in chunks(list(paths), 500):
                for image_id, path in conn.execute(
                    select(files.c.image_id, files.c.path).where(files.c.image_id.in_(chunk)).order_by(files.c.id)
                ):
                    paths[image_id].append(path)
        return [(r.id, r.sha256, paths[r.id]) for r in rows]

    def derived_stale(self) -> bool:
        """True from a re-index's swap until the library has rebuilt what it derives from the
        vectors (the vector index, the feature cache) for the new model."""
        with self.engine.connect() as conn:
            return self._get_meta(conn, "derived_stale") == "1"

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        out: dict[int, ImageRecord] = {}
        if not ids:
            return out
        # One statement per 500 ids: a row per file, its image's columns alongside. Oldest file
        # first (row ids grow; an update in place keeps its row): a copy added later never
        # takes the original's place as the path a hit shows.
        columns = (images.c.id, images.c.width, images.c.height, images.c.taken_at, images.c.camera, images.c.caption)
        with self.engine.connect() as conn:
            for chunk in chunks(list(ids), 500):
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
            q = q.where(ORIENTATION_SQL[filters.orientation])
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
            shape = case(*((ORIENTATION_SQL[name], name) for name in ORIENTATIONS), else_="square")  # no size: as before
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

    def image_detail(self, image_id: int) -> ImageDetail | None:
        """Everything the store knows of one image, with its files (None: no such image)."""
        # A read-only index of schema 3 or older has no lens column: None for it there.
        columns = [c for c in images.c if c.name != "lens"] + [images.c.lens if self.has_lens else literal(None).label("lens")]
        with self.engine.connect() as conn:
            row = conn.execute(select(*columns).where(images.c.id == image_id)).first()
            if row is None:
                return None
            indexed = [
                IndexedFile(r.path, r.size, r.mtime_ns)
                for r in conn.execute(
                    select(files.c.path, files.c.size, files.c.mtime_ns)
                    .where(files.c.image_id == image_id)
                    .order_by(files.c.id)  # oldest first, as `images` lists them
                )
            ]
        d = row._mapping
        return ImageDetail(
            d["id"], indexed, d["width"], d["height"], d["taken_at"], d["camera"], d["gps_lat"], d["gps_lon"],
            d["caption"], d["caption_model"], d["caption_error"], d["sha256"], d["lens"],
        )

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


def decode_vectors(blobs: Sequence[bytes], shape: tuple[int, int]) -> np.ndarray:
    """Stored vector blobs -> [n, Q, D] float32: float16 (schema 3), or float32 in a schema-2
    index opened read-only, told apart by their length."""
    blob = b"".join(blobs)
    n = len(blobs)
    dtype = VECTOR_DTYPE if len(blob) == n * shape[0] * shape[1] * 2 else np.float32
    return np.frombuffer(blob, dtype=dtype).reshape(n, *shape).astype(np.float32)


def chunks(items: Sequence, n: int) -> Iterator[Sequence]:
    for i in range(0, len(items), n):
        yield items[i : i + n]


def ids_by_hash(conn: Connection, hashes: Iterable[str]) -> dict[str, int]:
    """sha256 -> image id, for those of these contents the store has (500 a query: SQLite's
    bound-parameter limit)."""
    found: dict[str, int] = {}
    for chunk in chunks(sorted(set(hashes)), 500):
        found.update(conn.execute(select(images.c.sha256, images.c.id).where(images.c.sha256.in_(chunk))).all())
    return found
