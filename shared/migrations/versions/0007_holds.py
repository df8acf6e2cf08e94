"""Holds: sends held back by an operator's pause or by credentials a provider refused, and the
wake-ups kept for them in the pending table (its app, why it is kept, and when its TTL runs out).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-12
"""
import sqlalchemy as sa
from alembic import op

from shared.models import Timestamp

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "holds",
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("app", sa.String(64), nullable=False),
        sa.Column("reason", sa.String(255), nullable=False),
        sa.Column("held_by", sa.String(64)),
        sa.Column("since", Timestamp, nullable=False),
        sa.Column("discard", sa.Boolean, nullable=False, server_default=sa.false()),
        sa.Column("probe_at", Timestamp),
        sa.Column("failures", sa.Integer, nullable=False, server_default="0"),
        sa.PrimaryKeyConstraint("kind", "provider", "app"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    # Rows written before this revision: the default app, never kept, no TTL deadline.
    op.add_column("pending_pushes", sa.Column("app", sa.String(64), nullable=False, server_default=""))
    op.add_column("pending_pushes", sa.Column("kept", sa.String(16)))
    op.add_column("pending_pushes", sa.Column("expires_at", Timestamp))


def downgrade() -> None:
    with op.batch_alter_table("pending_pushes") as batch:
        batch.drop_column("expires_at")
        batch.drop_column("kept")
        batch.drop_column("app")
    op.drop_table("holds")
