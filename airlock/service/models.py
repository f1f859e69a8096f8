"""SQLAlchemy models of the airlock database (schema changes go through Alembic migrations)."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from sqlalchemy import (
    DateTime,
    ForeignKey,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class Base(DeclarativeBase):
    pass


class ReleaseRequest(Base):
    __tablename__ = "airlock_request"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    project: Mapped[str] = mapped_column(String(64), index=True)
    author: Mapped[str] = mapped_column(String(64), index=True)
    state: Mapped[str] = mapped_column(String(32), index=True)
    # review round: starts at 1, +1 on each resubmission; votes count only in the current round
    round: Mapped[int] = mapped_column(Integer, default=1)
    title: Mapped[str] = mapped_column(String(200), default="")
    context: Mapped[str] = mapped_column(Text, default="")
    controls: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    files: Mapped[list[RequestFile]] = relationship(
        back_populates="request", order_by="RequestFile.id", cascade="all, delete-orphan"
    )
    votes: Mapped[list[Vote]] = relationship(
        back_populates="request", order_by="Vote.id", cascade="all, delete-orphan"
    )
    comments: Mapped[list[Comment]] = relationship(
        back_populates="request", order_by="Comment.id", cascade="all, delete-orphan"
    )

    def active_files(self) -> list[RequestFile]:
        return [f for f in self.files if f.withdrawn_round is None]


class RequestFile(Base):
    """One snapshot of a workspace file, with the automated findings on exactly those bytes."""

    __tablename__ = "airlock_file"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("airlock_request.id"), index=True)
    group: Mapped[str] = mapped_column(String(64))
    path: Mapped[str] = mapped_column(String(512))
    sha256: Mapped[str] = mapped_column(String(64))
    size: Mapped[int] = mapped_column(Integer)
    output_class: Mapped[str] = mapped_column(String(64), default="unknown")
    check_status: Mapped[str] = mapped_column(String(16))
    findings_json: Mapped[str] = mapped_column(Text, default="[]")
    added_round: Mapped[int] = mapped_column(Integer)
    withdrawn_round: Mapped[int | None] = mapped_column(Integer, nullable=True)
    withdrawn_reason: Mapped[str | None] = mapped_column(String(32), nullable=True)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    request: Mapped[ReleaseRequest] = relationship(back_populates="files")

    @property
    def findings(self) -> list[dict[str, Any]]:
        return json.loads(self.findings_json)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]


class Vote(Base):
    __tablename__ = "airlock_vote"
    # one vote per checker per file per round: the database refuses a second, even under races
    __table_args__ = (UniqueConstraint("file_id", "reviewer", "round", name="uq_vote_once"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("airlock_request.id"), index=True)
    file_id: Mapped[int] = mapped_column(ForeignKey("airlock_file.id"), index=True)
    reviewer: Mapped[str] = mapped_column(String(64))
    round: Mapped[int] = mapped_column(Integer)
    decision: Mapped[str] = mapped_column(String(32))
    comment: Mapped[str] = mapped_column(Text, default="")
    justification: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    request: Mapped[ReleaseRequest] = relationship(back_populates="votes")


class Comment(Base):
    __tablename__ = "airlock_comment"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    request_id: Mapped[str] = mapped_column(ForeignKey("airlock_request.id"), index=True)
    author: Mapped[str] = mapped_column(String(64))
    body: Mapped[str] = mapped_column(Text)
    # public: the author and everyone who can see the request; private: checkers only
    visibility: Mapped[str] = mapped_column(String(16))
    round: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    request: Mapped[ReleaseRequest] = relationship(back_populates="comments")


class Release(Base):
    """Written in the same transaction that moves a request to ``released``."""

    __tablename__ = "airlock_release"

    request_id: Mapped[str] = mapped_column(ForeignKey("airlock_request.id"), primary_key=True)
    released_by: Mapped[str] = mapped_column(String(64))
    released_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    manifest_json: Mapped[str] = mapped_column(Text)
