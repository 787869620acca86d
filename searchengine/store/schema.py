"""The store's tables (SQLite and PostgreSQL alike), its schema version, and the SQL that a
folder filter and an orientation stand for."""

from __future__ import annotations

import os

import numpy as np
from sqlalchemy import BigInteger, Column, Float, ForeignKey, Integer, LargeBinary, MetaData, String, Table, Text

from searchengine.errors import QueryError


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


ORIENTATION_SQL = {  # what each of imageio.ORIENTATIONS means
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
