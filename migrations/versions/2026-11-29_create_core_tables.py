"""Create the core tables: user, api_token, project, prompt, completion, lease, annotation.

Revision ID: 20261129_core
Revises:
Create Date: 2026-11-29 22:01:43.527427
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "20261129_core"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Types as the models declare them (kept local so this file never changes with app code).
ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "project",
        sa.Column("id", ID, nullable=False),
        sa.Column("name", sa.String(length=200), nullable=False),
        sa.Column("slug", sa.String(length=64), nullable=False),
        sa.Column("guidelines", sa.Text(), nullable=False),
        sa.Column("completions_per_task", sa.Integer(), nullable=False),
        sa.Column("overlap", sa.Integer(), nullable=False),
        sa.Column("allow_ties", sa.Boolean(), nullable=False),
        sa.Column("likert", sa.Boolean(), nullable=False),
        sa.Column("flags", JSON, nullable=False),
        sa.Column("require_rationale", sa.Boolean(), nullable=False),
        sa.Column("lease_seconds", sa.Integer(), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("completions_per_task BETWEEN 2 AND 9", name=op.f("ck_project_k_range")),
        sa.CheckConstraint("lease_seconds >= 30", name=op.f("ck_project_lease_min")),
        sa.CheckConstraint("overlap >= 1", name=op.f("ck_project_overlap_positive")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_project")),
        sa.UniqueConstraint("slug", name=op.f("uq_project_slug")),
    )
    op.create_table(
        "user",
        sa.Column("id", ID, nullable=False),
        sa.Column("username", sa.String(length=64), nullable=False),
        sa.Column("password_hash", sa.String(length=255), nullable=True),
        sa.Column(
            "role",
            sa.Enum(
                "admin",
                "annotator",
                name="role",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("active", sa.Boolean(), server_default=sa.text("(true)"), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_user")),
        sa.UniqueConstraint("username", name=op.f("uq_user_username")),
    )
    op.create_table(
        "api_token",
        sa.Column("id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("token_hash", sa.String(length=64), nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("last_used_at", TS, nullable=True),
        sa.Column("revoked_at", TS, nullable=True),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user.id"], name=op.f("fk_api_token_user_id_user"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_api_token")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_api_token_token_hash")),
    )
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_api_token_user_id"), ["user_id"], unique=False)

    op.create_table(
        "prompt",
        sa.Column("id", ID, nullable=False),
        sa.Column("project_id", ID, nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("messages", JSON, nullable=False),
        sa.Column("metadata", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
            name=op.f("fk_prompt_project_id_project"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_prompt")),
        sa.UniqueConstraint(
            "project_id", "external_id", name=op.f("uq_prompt_project_id_external_id")
        ),
    )
    op.create_table(
        "completion",
        sa.Column("id", ID, nullable=False),
        sa.Column("prompt_id", ID, nullable=False),
        sa.Column("external_id", sa.String(length=200), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("model", sa.String(length=200), nullable=True),
        sa.Column("params", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompt.id"],
            name=op.f("fk_completion_prompt_id_prompt"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_completion")),
        sa.UniqueConstraint(
            "prompt_id", "external_id", name=op.f("uq_completion_prompt_id_external_id")
        ),
    )
    with op.batch_alter_table("prompt", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_prompt_project_id_id"), ["project_id", "id"], unique=False
        )

    op.create_table(
        "lease",
        sa.Column("id", ID, nullable=False),
        sa.Column("prompt_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("display_order", JSON, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("expires_at", TS, nullable=False),
        sa.ForeignKeyConstraint(
            ["prompt_id"], ["prompt.id"], name=op.f("fk_lease_prompt_id_prompt"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user.id"], name=op.f("fk_lease_user_id_user"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_lease")),
    )
    with op.batch_alter_table("lease", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_lease_prompt_id_expires_at"), ["prompt_id", "expires_at"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_lease_user_id_expires_at"), ["user_id", "expires_at"], unique=False
        )

    op.create_table(
        "annotation",
        sa.Column("id", ID, nullable=False),
        sa.Column("project_id", ID, nullable=False),
        sa.Column("prompt_id", ID, nullable=False),
        sa.Column("user_id", ID, nullable=False),
        sa.Column("lease_id", ID, nullable=True),
        sa.Column("revision", sa.Integer(), nullable=False),
        sa.Column("supersedes_id", ID, nullable=True),
        sa.Column(
            "status",
            sa.Enum(
                "submitted",
                "skipped",
                name="status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("ranking", JSON, nullable=False),
        sa.Column("likert", JSON, nullable=False),
        sa.Column("flags", JSON, nullable=False),
        sa.Column("rationale", sa.Text(), nullable=False),
        sa.Column("display_order", JSON, nullable=False),
        sa.Column("duration_ms", sa.Integer(), nullable=True),
        sa.Column("skip_reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.CheckConstraint("revision >= 1", name=op.f("ck_annotation_revision_positive")),
        sa.ForeignKeyConstraint(
            ["lease_id"],
            ["lease.id"],
            name=op.f("fk_annotation_lease_id_lease"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["project.id"],
            name=op.f("fk_annotation_project_id_project"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["prompt_id"],
            ["prompt.id"],
            name=op.f("fk_annotation_prompt_id_prompt"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["supersedes_id"],
            ["annotation.id"],
            name=op.f("fk_annotation_supersedes_id_annotation"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["user_id"], ["user.id"], name=op.f("fk_annotation_user_id_user"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_annotation")),
        sa.UniqueConstraint("lease_id", name=op.f("uq_annotation_lease_id")),
        sa.UniqueConstraint(
            "prompt_id",
            "user_id",
            "revision",
            name=op.f("uq_annotation_prompt_id_user_id_revision"),
        ),
        sa.UniqueConstraint("supersedes_id", name=op.f("uq_annotation_supersedes_id")),
    )
    with op.batch_alter_table("annotation", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_annotation_project_id_id"), ["project_id", "id"], unique=False
        )
        batch_op.create_index(
            batch_op.f("ix_annotation_user_id_created_at"), ["user_id", "created_at"], unique=False
        )


def downgrade() -> None:
    with op.batch_alter_table("annotation", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_annotation_user_id_created_at"))
        batch_op.drop_index(batch_op.f("ix_annotation_project_id_id"))

    op.drop_table("annotation")
    with op.batch_alter_table("lease", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_lease_user_id_expires_at"))
        batch_op.drop_index(batch_op.f("ix_lease_prompt_id_expires_at"))

    op.drop_table("lease")
    op.drop_table("completion")
    with op.batch_alter_table("prompt", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_prompt_project_id_id"))

    op.drop_table("prompt")
    with op.batch_alter_table("api_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_api_token_user_id"))

    op.drop_table("api_token")
    op.drop_table("user")
    op.drop_table("project")
