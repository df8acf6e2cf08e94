"""Subscriptions: one row per device, owned by one user.

Revision ID: 0001
Revises:
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

from shared.models import BigId, Timestamp

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("user_id", sa.String(64), nullable=False),
        sa.Column("provider", sa.String(16), nullable=False),
        sa.Column("token", sa.Text, nullable=False),
        sa.Column("token_sha256", sa.String(64), nullable=False),
        sa.Column("topic", sa.String(255)),
        sa.Column("environment", sa.String(16)),
        sa.Column("created_at", Timestamp, nullable=False),
        sa.Column("updated_at", Timestamp, nullable=False),
        sa.UniqueConstraint("token_sha256", name="uq_subscriptions_token_sha256"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",  # ids and hashes compare exactly, case included
        sqlite_autoincrement=True,  # never reuse an id (InnoDB does not either)
    )
    op.create_index("ix_subscriptions_user_provider", "subscriptions", ["user_id", "provider"])
    op.create_index("ix_subscriptions_updated_at", "subscriptions", ["updated_at"])


def downgrade() -> None:
    op.drop_table("subscriptions")
