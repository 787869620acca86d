"""The store's schema history as Alembic migrations, for SQLite and PostgreSQL alike.

`Store._migrate` runs them: it stamps the revision that the store's own `schema_version`
names (stores written before Alembic have no `alembic_version` table; the meta row is the
record both keep), then upgrades to the head, in the same transaction as the rest of the
opening. Revision ids are the schema versions: "1" ... "4".
"""

from __future__ import annotations

from pathlib import Path

HERE = Path(__file__).parent


def config(connection):
    """An Alembic config that runs on `connection` (no alembic.ini)."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(HERE))
    cfg.attributes["connection"] = connection
    return cfg


def current(connection, head: int, version) -> bool:
    """Whether the store is at `head` by both records (its meta row and Alembic's): then
    opening it loads no migration at all (Alembic's script directory costs ~0.1 s)."""
    from sqlalchemy import inspect, text

    if version is None or int(version) != head or not inspect(connection).has_table("alembic_version"):
        return False
    return connection.execute(text("SELECT version_num FROM alembic_version")).scalar() == str(head)


def upgrade(connection, from_version: int | None) -> None:
    """Bring the schema on `connection` from `from_version` (None: an empty database) to the head."""
    from alembic import command

    cfg = config(connection)
    if from_version is not None:
        command.stamp(cfg, str(from_version), purge=True)
    command.upgrade(cfg, "head")
