"""The console's store (SQLAlchemy; SQLite by default, any SQLAlchemy URL for PostgreSQL).

Metadata only by default: calls, per-speaker states, window scores, alerts, analyst verdicts,
the audit log and login sessions; never a caller's number beyond the call id the client
chose. Audio only with ``--keep-flagged-audio``: each alert's range (:class:`FlaggedClip`, a
WAV file in the database, so PostgreSQL and SQLite alike keep it and a retention purge is
one DELETE), deleted after ``--flagged-audio-retention-days``.

The feed writes from its own thread and the web app reads and writes from request handlers,
each with its own short session (SQLite in WAL mode lets them overlap).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config as AlembicConfig
from sqlalchemy import (
    Boolean,
    Float,
    ForeignKey,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    delete,
    event,
    select,
)
from sqlalchemy.engine import Engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker

LABELS = {"confirmed_fraud": "confirmed fraud", "false_alarm": "false alarm",
          "unsure": "unsure"}
STATES = ("unknown", "bonafide", "spoof")


class Base(DeclarativeBase):
    pass


class Call(Base):
    __tablename__ = "calls"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)  # server:stream_id
    server: Mapped[str] = mapped_column(String(255))
    stream_id: Mapped[str] = mapped_column(String(64))
    call_id: Mapped[str] = mapped_column(String(128), default="")
    platform: Mapped[str] = mapped_column(String(64), default="")
    model: Mapped[str] = mapped_column(String(255), default="")
    rpc: Mapped[str] = mapped_column(String(32), default="")
    channel_mode: Mapped[str] = mapped_column(String(16), default="")
    alert_threshold: Mapped[float] = mapped_column(Float, default=0.5)
    opened_at: Mapped[float] = mapped_column(Float, index=True)
    updated_at: Mapped[float] = mapped_column(Float, default=0.0)
    closed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="open")  # open, closed, lost
    close_status: Mapped[str] = mapped_column(String(32), default="")
    audio_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    windows_scored: Mapped[int] = mapped_column(Integer, default=0)
    windows_unscored: Mapped[int] = mapped_column(Integer, default=0)
    alerted: Mapped[bool] = mapped_column(Boolean, default=False)
    has_summary: Mapped[bool] = mapped_column(Boolean, default=False)


class Speaker(Base):
    __tablename__ = "speakers"
    __table_args__ = (UniqueConstraint("call", "name"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call: Mapped[str] = mapped_column(ForeignKey("calls.id"), index=True)
    name: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16), default="unknown")
    probability: Mapped[float] = mapped_column(Float, default=0.0)
    speech_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    speech: Mapped[str] = mapped_column(Text, default="[]")  # JSON [[start, end], ...]


class _SpeakerSpan:
    """The columns of a row about one span of one speaker's audio in a call: a window score
    and an alert are both that (an alert names the window that raised it), so they share
    one definition and cannot drift apart."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call: Mapped[str] = mapped_column(ForeignKey("calls.id"), index=True)
    speaker: Mapped[str] = mapped_column(String(64))
    start: Mapped[float] = mapped_column(Float)
    end: Mapped[float] = mapped_column(Float)
    probability: Mapped[float] = mapped_column(Float)  # the window's


class Score(_SpeakerSpan, Base):
    __tablename__ = "scores"
    running: Mapped[float | None] = mapped_column(Float, nullable=True)  # speaker's verdict


class AlertRow(_SpeakerSpan, Base):
    __tablename__ = "alerts"
    raised_at: Mapped[float] = mapped_column(Float, index=True)
    acknowledged_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    acknowledged_at: Mapped[float | None] = mapped_column(Float, nullable=True)


class FlaggedClip(Base):
    """The audio of one alert's range (the server's ``FlaggedAudio``) as a WAV file, kept for
    review until the retention purge (``kept_at``)."""

    __tablename__ = "flagged_clips"
    __table_args__ = (UniqueConstraint("call", "speaker", "alert_start"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call: Mapped[str] = mapped_column(ForeignKey("calls.id"), index=True)
    speaker: Mapped[str] = mapped_column(String(64))
    alert_start: Mapped[float] = mapped_column(Float)  # the alert's range (AlertRow.start)
    start: Mapped[float] = mapped_column(Float)  # call time the audio covers
    end: Mapped[float] = mapped_column(Float)
    sample_rate: Mapped[int] = mapped_column(Integer)
    wav: Mapped[bytes] = mapped_column(LargeBinary)
    kept_at: Mapped[float] = mapped_column(Float, index=True)


class Verdict(Base):
    """An analyst's verdict on one speaker of one call; the latest one counts, the earlier
    ones stay (the audit log says who changed what)."""

    __tablename__ = "verdicts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    call: Mapped[str] = mapped_column(ForeignKey("calls.id"), index=True)
    speaker: Mapped[str] = mapped_column(String(64))
    label: Mapped[str] = mapped_column(String(32))
    note: Mapped[str] = mapped_column(Text, default="")
    user: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)


class Audit(Base):
    __tablename__ = "audit"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[float] = mapped_column(Float, index=True)
    user: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(255), default="")
    detail: Mapped[str] = mapped_column(Text, default="")


class LoginSession(Base):
    __tablename__ = "login_sessions"
    token_hash: Mapped[str] = mapped_column(String(64), primary_key=True)  # sha256 hex
    user: Mapped[str] = mapped_column(String(64))
    csrf: Mapped[str] = mapped_column(String(64))
    expires_at: Mapped[float] = mapped_column(Float)


def make_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite files get WAL (readers do not block the feed's writer)
    and a busy timeout."""
    sqlite = url.startswith("sqlite")
    engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}
                           if sqlite else {})
    if sqlite:
        @event.listens_for(engine, "connect")
        def _pragmas(connection: Any, _record: Any) -> None:
            cursor = connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()
    return engine


MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> AlembicConfig:
    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest Alembic revision (a new database gets it whole; an
    older console's database is upgraded in place, its data kept)."""
    config = alembic_config()
    with engine.begin() as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")


class Store:
    """The database and the queries the app and the feed share."""

    def __init__(self, url: str) -> None:
        self.engine = make_engine(url)
        migrate(self.engine)
        self.sessions = sessionmaker(self.engine, expire_on_commit=False)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self.sessions() as s, s.begin():
            yield s

    def audit(self, s: Session, user: str, action: str, target: str = "",
              detail: str = "") -> None:
        s.add(Audit(at=time.time(), user=user, action=action, target=target, detail=detail))

    def purge_clips(self, kept_before: float) -> int:
        """Delete the flagged audio kept before ``kept_before`` (epoch seconds): the
        retention. How many clips went."""
        with self.session() as s:
            gone = s.execute(delete(FlaggedClip).where(FlaggedClip.kept_at < kept_before))
            count = int(getattr(gone, "rowcount", 0) or 0)
            if count:
                self.audit(s, "-", "purge_audio", "flagged_clips", f"{count} clips")
            return count


def call_dict(s: Session, call: Call) -> dict[str, Any]:
    """A call as the pages and exports show it, with its speakers and latest verdicts."""
    speakers = s.scalars(select(Speaker).where(Speaker.call == call.id)
                         .order_by(Speaker.id)).all()
    verdicts = latest_verdicts(s, call.id)
    end = call.closed_at or call.updated_at or call.opened_at
    return {
        "id": call.id, "server": call.server, "stream_id": call.stream_id,
        "call_id": call.call_id, "platform": call.platform, "model": call.model,
        "rpc": call.rpc, "channel_mode": call.channel_mode,
        "alert_threshold": round(call.alert_threshold, 4),
        "opened_at": call.opened_at, "closed_at": call.closed_at, "status": call.status,
        "close_status": call.close_status, "audio_seconds": round(call.audio_seconds, 2),
        "duration": round(max(call.audio_seconds, end - call.opened_at), 1),
        "windows_scored": call.windows_scored, "windows_unscored": call.windows_unscored,
        "alerted": call.alerted, "has_summary": call.has_summary,
        "state": "spoof" if any(sp.state == "spoof" for sp in speakers) else (
            "bonafide" if speakers and all(sp.state == "bonafide" for sp in speakers)
            else "unknown"),
        "speakers": [{"name": sp.name, "state": sp.state,
                      "probability": round(sp.probability, 4),
                      "speech_seconds": round(sp.speech_seconds, 2),
                      "speech": json.loads(sp.speech),
                      "verdict": verdicts.get(sp.name)} for sp in speakers],
    }


def latest_verdicts(s: Session, call_id: str) -> dict[str, dict[str, Any]]:
    rows = s.scalars(select(Verdict).where(Verdict.call == call_id).order_by(Verdict.id)).all()
    return {v.speaker: verdict_dict(v) for v in rows}


def verdict_dict(v: Verdict) -> dict[str, Any]:
    return {"id": v.id, "call": v.call, "speaker": v.speaker, "label": v.label,
            "note": v.note, "user": v.user, "created_at": v.created_at}


def clips_of(s: Session, call_id: str) -> list[FlaggedClip]:
    return list(s.scalars(select(FlaggedClip).where(FlaggedClip.call == call_id)
                          .order_by(FlaggedClip.id)))


def clip_for(alert: AlertRow, clips: list[FlaggedClip]) -> FlaggedClip | None:
    """The alert's audio, if kept (same speaker, same range start)."""
    return next((c for c in clips if c.speaker == alert.speaker
                 and abs(c.alert_start - alert.start) < 1e-3), None)


def alert_dict(a: AlertRow, call: Call | None = None) -> dict[str, Any]:
    return {"id": a.id, "call": a.call, "call_id": call.call_id if call else "",
            "platform": call.platform if call else "", "speaker": a.speaker,
            "start": round(a.start, 2), "end": round(a.end, 2),
            "probability": round(a.probability, 4), "raised_at": a.raised_at,
            "acknowledged_by": a.acknowledged_by, "acknowledged_at": a.acknowledged_at}
