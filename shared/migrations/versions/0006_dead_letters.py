"""Dead letters: the events the broker gave up on, kept for `pushctl dead-letters replay`.

Revision ID: 0006
Revises: 0004
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import mysql

from shared.models import BigId, Timestamp

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "dead_letters",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("event_id", sa.String(255), nullable=False),
        sa.Column("event_type", sa.String(255), nullable=False),
        sa.Column("destination", sa.Text),
        sa.Column("error_code", sa.Integer),
        sa.Column("attributes", sa.Text, nullable=False),
        sa.Column("data", sa.LargeBinary().with_variant(mysql.LONGBLOB(), "mysql", "mariadb"), nullable=False),
        sa.Column("received_at", Timestamp, nullable=False),
        sa.Column("replay_attempts", sa.Integer, nullable=False),
        sa.Column("last_replay_error", sa.String(255)),
        sa.UniqueConstraint("key_sha256", name="uq_dead_letters_key_sha256"),
        sqlite_autoincrement=True,
        mysql_engine="InnoDB",
        mysql_charset="utf8mb4",
        mysql_collate="utf8mb4_bin",
    )
    op.create_index("ix_dead_letters_received_at", "dead_letters", ["received_at"])


def downgrade() -> None:
    op.drop_index("ix_dead_letters_received_at", "dead_letters")
    op.drop_table("dead_letters")
