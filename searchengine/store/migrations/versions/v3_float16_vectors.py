"""Schema 3: vectors stored as float16 (half of float32), rewritten in place; the re-index's
`next_vectors` table."""

import numpy as np
import sqlalchemy as sa
from alembic import op

revision = "3"
down_revision = "2"


def upgrade() -> None:
    bind = op.get_bind()
    vectors = sa.table("vectors", sa.column("image_id", sa.Integer), sa.column("data", sa.LargeBinary))
    ids = list(bind.execute(sa.select(vectors.c.image_id).order_by(vectors.c.image_id)).scalars())
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        for image_id, data in bind.execute(sa.select(vectors.c.image_id, vectors.c.data).where(vectors.c.image_id.in_(chunk))).all():
            half = np.frombuffer(data, dtype=np.float32).astype(np.float16)
            bind.execute(sa.update(vectors).where(vectors.c.image_id == image_id).values(data=half.tobytes()))
    if not sa.inspect(bind).has_table("next_vectors"):
        op.create_table(
            "next_vectors",
            sa.Column("image_id", sa.Integer, sa.ForeignKey("images.id", ondelete="CASCADE"), primary_key=True),
            sa.Column("data", sa.LargeBinary, nullable=False),
        )
