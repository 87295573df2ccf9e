"""Counters: message ids handed out by the writer, in blocks, inside its transaction.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21 21:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    counters = op.create_table(
        "counters",
        sa.Column("name", sa.String(length=32), nullable=False),
        sa.Column("value", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name"),
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
        mysql_engine="InnoDB",
    )
    highest = op.get_bind().execute(sa.text("SELECT COALESCE(MAX(id), 0) FROM messages")).scalar_one()
    op.bulk_insert(counters, [{"name": "message_id", "value": int(highest)}])


def downgrade() -> None:
    op.drop_table("counters")
