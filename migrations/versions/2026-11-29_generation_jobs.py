"""Generation jobs and workers; generated-completion columns; project prompt templates.

Revision ID: 20261129_generation
Revises: 20261129_core
Create Date: 2026-11-29 22:33:29.495458
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261129_generation"
down_revision: str | None = "20261129_core"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "worker",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("started_at", TS, nullable=False),
        sa.Column("heartbeat_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_worker")),
        sa.UniqueConstraint("name", name=op.f("uq_worker_name")),
    )
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_worker_heartbeat_at"), ["heartbeat_at"], unique=False)

    op.create_table(
        "generation_job",
        sa.Column("id", ID, nullable=False),
        sa.Column("project_id", ID, nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                "cancelled",
                name="job_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("backend", sa.String(length=32), nullable=False),
        sa.Column("models", JSON, nullable=False),
        sa.Column("k", sa.Integer(), nullable=False),
        sa.Column("params", JSON, nullable=False),
        sa.Column("prompt_ids", JSON, nullable=True),
        sa.Column("last_prompt_id", ID, nullable=False),
        sa.Column("cursor", ID, nullable=False),
        sa.Column("total", sa.Integer(), nullable=False),
        sa.Column("done", sa.Integer(), nullable=False),
        sa.Column("completions_created", sa.Integer(), nullable=False),
        sa.Column("duplicates_dropped", sa.Integer(), nullable=False),
        sa.Column("errors", JSON, nullable=False),
        sa.Column("message", sa.Text(), nullable=False),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("worker", sa.String(length=200), nullable=True),
        sa.Column("created_by_id", ID, nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("heartbeat_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.CheckConstraint("k BETWEEN 1 AND 16", name=op.f("ck_generation_job_k_range")),
        sa.ForeignKeyConstraint(
            ["created_by_id"],
            ["user.id"],
            name=op.f("fk_generation_job_created_by_id_user"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
            name=op.f("fk_generation_job_project_id_project"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_generation_job")),
    )
    with op.batch_alter_table("generation_job", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_generation_job_project_id_id"), ["project_id", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_generation_job_status_id"), ["status", "id"], unique=False
        )

    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.add_column(sa.Column("backend", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("input_text", sa.Text(), nullable=True))
        batch_op.add_column(sa.Column("job_id", ID, nullable=True))
        batch_op.create_index(batch_op.f("ix_completion_job_id"), ["job_id"], unique=False)
        batch_op.create_foreign_key(
            batch_op.f("fk_completion_job_id_generation_job"),
            "generation_job",
            ["job_id"],
            ["id"],
            ondelete="SET NULL",
        )

    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("system_prompt", sa.Text(), server_default="", nullable=False)
        )
        batch_op.add_column(
            sa.Column("instruction_template", sa.Text(), server_default="", nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("project", schema=None) as batch_op:
        batch_op.drop_column("instruction_template")
        batch_op.drop_column("system_prompt")

    with op.batch_alter_table("completion", schema=None) as batch_op:
        batch_op.drop_constraint(
            batch_op.f("fk_completion_job_id_generation_job"), type_="foreignkey"
        )
        batch_op.drop_index(batch_op.f("ix_completion_job_id"))
        batch_op.drop_column("job_id")
        batch_op.drop_column("input_text")
        batch_op.drop_column("backend")

    with op.batch_alter_table("generation_job", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_generation_job_status_id"))
        batch_op.drop_index(batch_op.f("ix_generation_job_project_id_id"))

    op.drop_table("generation_job")
    with op.batch_alter_table("worker", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_worker_heartbeat_at"))

    op.drop_table("worker")
