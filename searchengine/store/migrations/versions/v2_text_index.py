"""Schema 2: images.caption_error, and the full-text index (FTS5, or a tsvector on
PostgreSQL), filled by the store when it opens (its row count differs from the images')."""

import sqlalchemy as sa
from alembic import op

revision = "2"
down_revision = "1"


def upgrade() -> None:
    from searchengine.store.textindex import text_index_for

    bind = op.get_bind()
    if "caption_error" not in {c["name"] for c in sa.inspect(bind).get_columns("images")}:
        op.add_column("images", sa.Column("caption_error", sa.Text))
    text_index_for(bind.dialect.name).create(bind)
