"""Initial schema: requests, file snapshots, votes, comments, releases, hash-chained audit log.

Revision ID: 0001
Revises:
Create Date: 2026-11-29
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "airlock_request",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("project", sa.String(64), nullable=False, index=True),
        sa.Column("author", sa.String(64), nullable=False, index=True),
        sa.Column("state", sa.String(32), nullable=False, index=True),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("title", sa.String(200), nullable=False),
        sa.Column("context", sa.Text, nullable=False),
        sa.Column("controls", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
    )
    op.create_table(
        "airlock_file",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(32), sa.ForeignKey("airlock_request.id"), nullable=False),
        sa.Column("group", sa.String(64), nullable=False),
        sa.Column("path", sa.String(512), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("output_class", sa.String(64), nullable=False),
        sa.Column("check_status", sa.String(16), nullable=False),
        sa.Column("findings_json", sa.Text, nullable=False),
        sa.Column("added_round", sa.Integer, nullable=False),
        sa.Column("withdrawn_round", sa.Integer, nullable=True),
        sa.Column("withdrawn_reason", sa.String(32), nullable=True),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_airlock_file_request_id", "airlock_file", ["request_id"])
    op.create_table(
        "airlock_vote",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(32), sa.ForeignKey("airlock_request.id"), nullable=False),
        sa.Column("file_id", sa.Integer, sa.ForeignKey("airlock_file.id"), nullable=False),
        sa.Column("reviewer", sa.String(64), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("decision", sa.String(32), nullable=False),
        sa.Column("comment", sa.Text, nullable=False),
        sa.Column("justification", sa.Text, nullable=False),
        sa.Column("created_at", TS, nullable=False),
        sa.UniqueConstraint("file_id", "reviewer", "round", name="uq_vote_once"),
    )
    op.create_index("ix_airlock_vote_request_id", "airlock_vote", ["request_id"])
    op.create_index("ix_airlock_vote_file_id", "airlock_vote", ["file_id"])
    op.create_table(
        "airlock_comment",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("request_id", sa.String(32), sa.ForeignKey("airlock_request.id"), nullable=False),
        sa.Column("author", sa.String(64), nullable=False),
        sa.Column("body", sa.Text, nullable=False),
        sa.Column("visibility", sa.String(16), nullable=False),
        sa.Column("round", sa.Integer, nullable=False),
        sa.Column("created_at", TS, nullable=False),
    )
    op.create_index("ix_airlock_comment_request_id", "airlock_comment", ["request_id"])
    op.create_table(
        "airlock_release",
        sa.Column(
            "request_id", sa.String(32), sa.ForeignKey("airlock_request.id"), primary_key=True
        ),
        sa.Column("released_by", sa.String(64), nullable=False),
        sa.Column("released_at", TS, nullable=False),
        sa.Column("manifest_json", sa.Text, nullable=False),
    )
    op.create_table(
        "audit_event",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("seq", sa.Integer, nullable=False, unique=True),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.Column("actor", sa.String(128), nullable=False),
        sa.Column("action", sa.String(64), nullable=False, index=True),
        sa.Column("target", sa.String(512), nullable=False, index=True),
        sa.Column("details", sa.Text, nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    head = op.create_table(
        "audit_head",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("seq", sa.Integer, nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.bulk_insert(head, [{"id": 1, "seq": 0, "hash": "0" * 64}])


def downgrade() -> None:
    for table in (
        "audit_head",
        "audit_event",
        "airlock_release",
        "airlock_comment",
        "airlock_vote",
        "airlock_file",
        "airlock_request",
    ):
        op.drop_table(table)
