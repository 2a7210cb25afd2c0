"""Labeling: lease states, task-queue counters, project members, browser sessions, login limit.

Revision ID: 20261130_labeling
Revises: 20261129_generation
Create Date: 2026-11-30 00:32:48.939324
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "20261130_labeling"
down_revision: str | None = "20261129_generation"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
TS = sa.DateTime(timezone=True)
LEASE_STATUS = sa.Enum(
    "open",
    "submitted",
    "skipped",
    "expired",
    name="lease_status",
    native_enum=False,
    create_constraint=True,
    length=16,
)


def upgrade() -> None:
    op.create_table(
        "login_failure",
        sa.Column("id", ID, nullable=False),
        sa.Column("username", sa.String(length=200), nullable=False),
        sa.Column("ip", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_login_failure")),
    )
    op.create_index(op.f("ix_login_failure_ip_created_at"), "login_failure", ["ip", "created_at"])
    op.create_index(
        op.f("ix_login_failure_username_created_at"), "login_failure", ["username", "created_at"]
    )
    op.create_table(
        "project_member",
        sa.Column("project_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
            name=op.f("fk_project_member_project_id_project"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["user.id"],
            name=op.f("fk_project_member_user_id_user"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("project_id", "user_id", name=op.f("pk_project_member")),
    )
    op.create_index(op.f("ix_project_member_user_id"), "project_member", ["user_id"])
    op.create_table(
        "web_session",
        sa.Column("id", ID, nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("csrf_token", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user.id"], name=op.f("fk_web_session_user_id_user"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_web_session")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_web_session_token_hash")),
    )
    op.create_index(op.f("ix_web_session_expires_at"), "web_session", ["expires_at"])
    op.create_index(op.f("ix_web_session_user_id"), "web_session", ["user_id"])

    with op.batch_alter_table("annotation") as batch:
        batch.add_column(sa.Column("strength", sa.Integer(), nullable=True))
        batch.add_column(
            sa.Column("both_bad", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )

    # Leases before this revision were never handed out by a service; keep any rows anyway.
    with op.batch_alter_table("lease") as batch:
        batch.add_column(sa.Column("project_id", ID, nullable=True))
        batch.add_column(
            sa.Column("status", LEASE_STATUS, server_default="expired", nullable=False)
        )
        batch.add_column(sa.Column("closed_at", TS, nullable=True))
    op.execute(
        "UPDATE lease SET project_id = (SELECT prompt.project_id FROM prompt"
        " WHERE prompt.id = lease.prompt_id)"
    )
    with op.batch_alter_table("lease") as batch:
        batch.alter_column("project_id", existing_type=ID, nullable=False)
        batch.alter_column("status", existing_type=LEASE_STATUS, server_default=None)
        batch.drop_index("ix_lease_prompt_id_expires_at")
        batch.drop_index("ix_lease_user_id_expires_at")
        batch.create_index(batch.f("ix_lease_status_expires_at"), ["status", "expires_at"])
        batch.create_index(
            batch.f("ix_lease_user_id_project_id_status"), ["user_id", "project_id", "status"]
        )
        batch.create_unique_constraint(
            batch.f("uq_lease_user_id_prompt_id"), ["user_id", "prompt_id"]
        )
        batch.create_foreign_key(
            batch.f("fk_lease_project_id_project"),
            "project",
            ["project_id"],
            ["id"],
            ondelete="CASCADE",
        )

    with op.batch_alter_table("project") as batch:
        batch.add_column(
            sa.Column("members_only", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )

    with op.batch_alter_table("prompt") as batch:
        batch.add_column(
            sa.Column("annotation_count", sa.Integer(), server_default="0", nullable=False)
        )
        batch.add_column(sa.Column("open_leases", sa.Integer(), server_default="0", nullable=False))
        batch.create_check_constraint(
            batch.f("ck_prompt_annotation_count_nonnegative"), "annotation_count >= 0"
        )
        batch.create_check_constraint(
            batch.f("ck_prompt_open_leases_nonnegative"), "open_leases >= 0"
        )
        batch.create_index("ix_prompt_queue", ["project_id", "annotation_count", "id"])
    op.execute(
        "UPDATE prompt SET annotation_count = (SELECT count(*) FROM annotation"
        " WHERE annotation.prompt_id = prompt.id AND annotation.status = 'submitted'"
        " AND annotation.revision = 1)"
    )


def downgrade() -> None:
    with op.batch_alter_table("prompt") as batch:
        batch.drop_index("ix_prompt_queue")
        batch.drop_constraint(batch.f("ck_prompt_open_leases_nonnegative"), type_="check")
        batch.drop_constraint(batch.f("ck_prompt_annotation_count_nonnegative"), type_="check")
        batch.drop_column("open_leases")
        batch.drop_column("annotation_count")
    with op.batch_alter_table("project") as batch:
        batch.drop_column("members_only")
    with op.batch_alter_table("lease") as batch:
        batch.drop_constraint(batch.f("fk_lease_project_id_project"), type_="foreignkey")
        batch.drop_constraint(batch.f("uq_lease_user_id_prompt_id"), type_="unique")
        batch.drop_index(batch.f("ix_lease_user_id_project_id_status"))
        batch.drop_index(batch.f("ix_lease_status_expires_at"))
        batch.create_index("ix_lease_user_id_expires_at", ["user_id", "expires_at"])
        batch.create_index("ix_lease_prompt_id_expires_at", ["prompt_id", "expires_at"])
        batch.drop_column("closed_at")
        batch.drop_constraint(batch.f("ck_lease_lease_status"), type_="check")
        batch.drop_column("status")
        batch.drop_column("project_id")
    with op.batch_alter_table("annotation") as batch:
        batch.drop_column("both_bad")
        batch.drop_column("strength")
    op.drop_index(op.f("ix_web_session_user_id"), table_name="web_session")
    op.drop_index(op.f("ix_web_session_expires_at"), table_name="web_session")
    op.drop_table("web_session")
    op.drop_index(op.f("ix_project_member_user_id"), table_name="project_member")
    op.drop_table("project_member")
    op.drop_index(op.f("ix_login_failure_username_created_at"), table_name="login_failure")
    op.drop_index(op.f("ix_login_failure_ip_created_at"), table_name="login_failure")
    op.drop_table("login_failure")
