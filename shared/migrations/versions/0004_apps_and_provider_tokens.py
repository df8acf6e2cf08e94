"""Several apps (a subscription names its app) and the shared APNs provider token.

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-23
"""
import sqlalchemy as sa
from alembic import op

from shared.models import Timestamp

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("subscriptions") as batch:
        batch.add_column(sa.Column("app", sa.String(64)))
    op.create_table(
        "provider_tokens",
        sa.Column("team_id", sa.String(32), nullable=False),
        sa.Column("key_id", sa.String(32), nullable=False),
        sa.Column("token", sa.Text, nullable=False),
        sa.Column("issued_at", Timestamp, nullable=False),
        sa.PrimaryKeyConstraint("team_id", "key_id"),
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )


def downgrade() -> None:
    op.drop_table("provider_tokens")
    with op.batch_alter_table("subscriptions") as batch:
        batch.drop_column("app")
