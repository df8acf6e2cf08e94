"""Deliveries: per event and subscription, what was sent, so redeliveries do not push twice.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

from shared.models import BigId, Timestamp

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "deliveries",
        sa.Column("event_key", sa.String(64), nullable=False),
        sa.Column("subscription_id", BigId, nullable=False, autoincrement=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("claim", sa.String(32)),
        sa.Column("lease_until", Timestamp),
        sa.Column("reason", sa.String(64)),
        sa.Column("observed_at", Timestamp),
        sa.Column("expires_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("event_key", "subscription_id"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_index("ix_deliveries_expires_at", "deliveries", ["expires_at"])


def downgrade() -> None:
    op.drop_table("deliveries")
