"""Rate counters (per-event-type limits, per-user request limits) and pending pushes (privacy
delay with coalescing).

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

from shared.models import BigId, Timestamp

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

MYSQL = {"mysql_engine": "InnoDB", "mysql_charset": "utf8mb4", "mysql_collate": "utf8mb4_bin"}


def upgrade() -> None:
    op.create_table(
        "rate_counters",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("count", sa.Integer, nullable=False),
        sa.Column("expires_at", Timestamp, nullable=False),
        **MYSQL,
    )
    op.create_index("ix_rate_counters_expires_at", "rate_counters", ["expires_at"])
    op.create_table(
        "pending_pushes",
        sa.Column("subscription_id", BigId, nullable=False, autoincrement=False),
        sa.Column("message_type", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("ttl_seconds", sa.Integer, nullable=False),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("due_at", Timestamp, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
        sa.Column("claim", sa.String(32)),
        sa.Column("claimed_until", Timestamp),
        sa.PrimaryKeyConstraint("subscription_id", "message_type"),
        **MYSQL,
    )
    op.create_index("ix_pending_pushes_provider_due", "pending_pushes", ["provider", "due_at"])


def downgrade() -> None:
    op.drop_table("pending_pushes")
    op.drop_table("rate_counters")
