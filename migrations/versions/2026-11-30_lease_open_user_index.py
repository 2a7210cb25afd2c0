"""A partial index on the live leases of each user, for the per-user lease cap.

Revision ID: 20261130_lease_open_user
Revises: 20261130_audit_event
Create Date: 2026-11-30 06:45:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261130_lease_open_user"
down_revision: str | None = "20261130_audit_event"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_lease_open_user_id",
        "lease",
        ["user_id", "expires_at"],
        postgresql_where=sa.text("status = 'open'"),
        sqlite_where=sa.text("status = 'open'"),
    )


def downgrade() -> None:
    op.drop_index("ix_lease_open_user_id", table_name="lease")
