"""User ids compare exactly on MySQL and MariaDB: "123" never matches "123 ".

``utf8mb4_bin``, which 0001 gave the table, is a PAD SPACE collation on both servers: trailing
blanks are ignored in comparisons, so a token naming ``"123 "`` listed, refreshed and deleted the
devices of user ``"123"`` (SQLite compares exactly, so the engines disagreed). The user id column
gets the server's NO PAD binary collation: ``utf8mb4_nopad_bin`` on MariaDB (10.2 and later),
``utf8mb4_0900_bin`` on MySQL (8.0.17 and later); neither server knows the other's name, and a
server with neither (MySQL 5.7) is refused with an error that says so. The column stays text (no
conversion on reads, readable in SQL) and its index is rebuilt by the server. Nothing else
holds a user id: rate counters key on a hash of it, and hex digests never end in a blank.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

PAD_SPACE_BINARY = "utf8mb4_bin"
NO_PAD_BINARY = {True: "utf8mb4_nopad_bin", False: "utf8mb4_0900_bin"}  # by "is it MariaDB"


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name not in ("mysql", "mariadb"):
        return  # SQLite's BINARY collation compares exactly already
    collation = NO_PAD_BINARY[bool(getattr(bind.dialect, "is_mariadb", False))]
    if bind.execute(sa.text("SHOW COLLATION LIKE :name"), {"name": collation}).first() is None:
        raise RuntimeError(
            f"this server has no {collation} collation: user ids need a NO PAD binary collation "
            "(MariaDB 10.2 or later, MySQL 8.0.17 or later)"
        )
    _set_user_id_collation(collation)


def downgrade() -> None:
    if op.get_bind().dialect.name in ("mysql", "mariadb"):
        _set_user_id_collation(PAD_SPACE_BINARY)


def _set_user_id_collation(collation: str) -> None:
    op.execute(
        "ALTER TABLE subscriptions MODIFY user_id VARCHAR(64) "
        f"CHARACTER SET utf8mb4 COLLATE {collation} NOT NULL"
    )
