"""Schema 4: images.lens (EXIF LensModel)."""

import sqlalchemy as sa
from alembic import op

revision = "4"
down_revision = "3"


def upgrade() -> None:
    if "lens" not in {c["name"] for c in sa.inspect(op.get_bind()).get_columns("images")}:
        op.add_column("images", sa.Column("lens", sa.Text))
