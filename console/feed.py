"""From the detection server's admin feed (``WatchCalls``) to the database and the browsers.

A thread holds the feed with the blocking client (so database writes never stall the web
app's event loop), writes each event, and hands a small JSON message per change to the
:class:`Broadcaster`, which fans it out to every open server-sent-events stream. When the
server goes away the thread says so (``feed`` message, shown on every page), retries with a
backoff, and on reconnecting marks the calls it knew as open and that the server's snapshot
lacks as ``lost`` (a server restart ends its calls).

With ``--keep-flagged-audio SECONDS`` the feed asks the server for each alert's audio (the
server sends it only when its operator started it with ``--feed-flagged-audio``) and keeps it
as a WAV file; without, it asks for none and drops any that comes.
"""

from __future__ import annotations

import asyncio
import io
import json
import threading
import time
import wave
from dataclasses import dataclass, field
from typing import Any

import grpc
import structlog
from sqlalchemy import select, update
from sqlalchemy.orm import Session

from callshield.v1 import detection_pb2 as pb
from client import DetectionClient
from console.db import (
    AlertRow,
    Call,
    FlaggedClip,
    Score,
    Speaker,
    Store,
    alert_dict,
    call_dict,
)

log = structlog.get_logger("callshield.console.feed")
STATE = {pb.SPEAKER_STATE_SPOOF_SUSPECTED: "spoof", pb.SPEAKER_STATE_LIKELY_BONAFIDE: "bonafide"}
MODE = {pb.CHANNEL_MODE_SPLIT: "split", pb.CHANNEL_MODE_MIXED: "mixed"}
SSE_BACKLOG = 2000  # messages a slow browser may lag behind before it is dropped


class Broadcaster:
    """Fan-out of JSON messages to the browsers' event streams (thread-safe ``publish``)."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.queues: set[asyncio.Queue[str | None]] = set()

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop

    def subscribe(self) -> asyncio.Queue[str | None]:
        queue: asyncio.Queue[str | None] = asyncio.Queue(SSE_BACKLOG)
        self.queues.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue[str | None]) -> None:
        self.queues.discard(queue)

    def publish(self, message: dict[str, Any]) -> None:
        if self.loop is None or self.loop.is_closed():
            return
        text = json.dumps(message, separators=(",", ":"))
        try:
            self.loop.call_soon_threadsafe(self._deliver, text)
        except RuntimeError:  # the loop closed meanwhile (shutdown)
            pass

    def _deliver(self, text: str) -> None:
        for queue in list(self.queues):
            try:
                queue.put_nowait(text)
            except asyncio.QueueFull:  # a browser that stopped reading: its stream ends
                self.queues.discard(queue)


@dataclass
class FeedState:
    """What the pages show about the feed itself."""

    connected: bool = False
    since: float = field(default_factory=time.time)
    error: str = ""
    server_started_at: float = 0.0
    flagged_audio_seconds: float = 0.0  # what the server may send (its --feed-flagged-audio)

    def message(self) -> dict[str, Any]:
        return {"type": "feed", "connected": self.connected, "since": self.since,
                "error": self.error, "flagged_audio_seconds": self.flagged_audio_seconds}


def wav_bytes(pcm: bytes, sample_rate: int) -> bytes:
    """Mono 16-bit PCM as a WAV file (what an ``<audio>`` element plays)."""
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm)
    return out.getvalue()


class Ingest:
    """Writes one server's events to the store; returns the browser messages."""

    def __init__(self, store: Store, server: str, keep_audio_seconds: float = 0.0) -> None:
        self.store = store
        self.server = server
        self.keep_audio_seconds = keep_audio_seconds  # 0: no audio is kept
        self.last_score: dict[tuple[str, str], int] = {}  # (call, speaker) -> Score.id
        self.snapshot: set[str] = set()

    def key(self, stream_id: str) -> str:
        return stream_id  # random per call (16 hex digits): unique across servers too

    def __call__(self, ev: pb.WatchCallsResponse) -> list[dict[str, Any]]:
        kind = ev.WhichOneof("event")
        if kind == "flagged_audio" and self.keep_audio_seconds <= 0:
            return []  # never asked for: not kept
        with self.store.session() as s:
            if kind == "ready":
                return self._ready(s)
            key = self.key(ev.stream_id)
            if ev.snapshot:
                self.snapshot.add(key)
            call = s.get(Call, key)
            if call is None:
                if kind != "opened":
                    return []  # a call opened before a feed without snapshot: nothing known
                call = Call(id=key, server=self.server, stream_id=ev.stream_id,
                            call_id=ev.call_id, opened_at=ev.opened.opened_at or ev.server_time)
                s.add(call)
            call.updated_at = ev.server_time
            messages: list[dict[str, Any]] = []
            if kind == "opened":
                o = ev.opened
                call.platform, call.model, call.rpc = o.platform, o.model, o.rpc
                call.channel_mode = MODE.get(o.channel_mode, "mixed")
                call.alert_threshold = o.alert_threshold
                call.status = "open"
                for name in o.speakers:
                    self._speaker(s, key, name)
            elif kind == "window":
                w = ev.window
                self._speaker(s, key, w.speaker)
                row = Score(call=key, speaker=w.speaker, start=w.start_seconds,
                            end=w.end_seconds, probability=w.spoof_probability)
                s.add(row)
                s.flush()
                self.last_score[(key, w.speaker)] = row.id
                call.windows_scored += 1
                call.audio_seconds = max(call.audio_seconds, w.end_seconds)
                messages.append({"type": "score", "call": key, "server_time": ev.server_time,
                                 "speaker": w.speaker,
                                 "start": w.start_seconds, "end": w.end_seconds,
                                 "p": round(w.spoof_probability, 4)})
            elif kind == "verdict":
                v = ev.verdict
                sp = self._speaker(s, key, v.speaker)
                sp.state = STATE.get(v.state, "unknown")
                sp.probability = v.spoof_probability
                sp.speech_seconds = v.speech_seconds
                score_id = self.last_score.get((key, v.speaker))
                if score_id is not None:
                    s.execute(update(Score).where(Score.id == score_id)
                              .values(running=v.spoof_probability))
            elif kind == "alert":
                a = ev.alert
                call.alerted = True
                known = s.scalars(select(AlertRow).where(  # a snapshot replays it
                    AlertRow.call == key, AlertRow.speaker == a.speaker,
                    AlertRow.start == a.start_seconds)).first()
                if known is not None:
                    return []
                row = AlertRow(call=key, speaker=a.speaker, start=a.start_seconds,
                               end=a.end_seconds, probability=a.spoof_probability,
                               raised_at=ev.server_time)
                s.add(row)
                s.flush()
                messages.append({"type": "alert", "alert": alert_dict(row, call)})
            elif kind == "flagged_audio":
                if not self._clip(s, key, ev.flagged_audio):
                    return []
            elif kind == "summary":
                self._summary(s, call, ev.summary)
            elif kind == "closed":
                call.status = "closed"
                call.closed_at = ev.server_time
                call.close_status = ev.closed.status
                for speaker in [k for k in self.last_score if k[0] == key]:
                    del self.last_score[speaker]
            if kind != "window":  # the speaker's verdict follows each window at once
                messages.append({"type": "call", "server_time": ev.server_time,
                                 "call": call_dict(s, call)})
            return messages

    def _speaker(self, s: Session, key: str, name: str) -> Speaker:
        sp = s.scalars(select(Speaker).where(Speaker.call == key, Speaker.name == name)).first()
        if sp is None:
            sp = Speaker(call=key, name=name)
            s.add(sp)
            s.flush()
        return sp

    def _clip(self, s: Session, key: str, f: pb.FlaggedAudio) -> bool:
        """Keep an alert's audio (its last ``keep_audio_seconds``) once; False when it is
        known already (a snapshot replays it) or unusable."""
        if not 8000 <= f.sample_rate_hz <= 48000 or not f.audio:
            log.warning("flagged audio refused", server=self.server,
                        sample_rate=f.sample_rate_hz, size=len(f.audio))
            return False
        known = s.scalars(select(FlaggedClip.id).where(
            FlaggedClip.call == key, FlaggedClip.speaker == f.speaker,
            FlaggedClip.alert_start == f.alert_start_seconds)).first()
        if known is not None:
            return False
        samples = len(f.audio) // 2
        keep = min(samples, int(self.keep_audio_seconds * f.sample_rate_hz))
        pcm = f.audio[(samples - keep) * 2:samples * 2]
        s.add(FlaggedClip(call=key, speaker=f.speaker, alert_start=f.alert_start_seconds,
                          start=f.end_seconds - keep / f.sample_rate_hz, end=f.end_seconds,
                          sample_rate=f.sample_rate_hz, wav=wav_bytes(pcm, f.sample_rate_hz),
                          kept_at=time.time()))
        return True

    def _summary(self, s: Session, call: Call, summary: pb.StreamSummary) -> None:
        call.has_summary = True
        call.audio_seconds = summary.audio_seconds
        call.windows_scored = summary.windows_scored
        call.windows_unscored = summary.windows_unscored
        for v in summary.speakers:
            sp = self._speaker(s, call.id, v.speaker)
            sp.state = STATE.get(v.state, "unknown")
            sp.probability = v.spoof_probability
            sp.speech_seconds = v.speech_seconds
            sp.speech = json.dumps([[round(r.start_seconds, 2), round(r.end_seconds, 2)]
                                    for r in v.speech])

    def _ready(self, s: Session) -> list[dict[str, Any]]:
        """After the snapshot: calls of this server still open here but not there are lost."""
        lost = s.scalars(select(Call).where(Call.server == self.server,
                                            Call.status == "open")).all()
        messages = []
        for call in lost:
            if call.id not in self.snapshot:
                call.status = "lost"
                call.closed_at = call.updated_at or time.time()
                call.close_status = "LOST"
                messages.append({"type": "call", "call": call_dict(s, call)})
        self.snapshot.clear()
        return messages


class FeedThread(threading.Thread):
    """Holds one server's feed, reconnecting until :meth:`stop`."""

    def __init__(self, store: Store, broadcaster: Broadcaster, target: str, admin_token: str,
                 *, tls: bool = False, root_certificates: str | None = None,
                 retry_seconds: float = 1.0, keep_audio_seconds: float = 0.0) -> None:
        super().__init__(name=f"feed-{target}", daemon=True)
        self.store = store
        self.broadcaster = broadcaster
        self.target = target
        self.admin_token = admin_token
        self.tls = tls
        self.root_certificates = root_certificates
        self.retry_seconds = retry_seconds
        self.state = FeedState()
        self.keep_audio_seconds = keep_audio_seconds
        self.ingest = Ingest(store, target, keep_audio_seconds)
        self._stop = threading.Event()
        self._call: Any = None

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()

    def _set(self, connected: bool, error: str = "") -> None:
        if connected != self.state.connected or error != self.state.error:
            self.state = FeedState(connected, time.time(), error,
                                   self.state.server_started_at,
                                   self.state.flagged_audio_seconds)
            log.info("feed", server=self.target, connected=connected, error=error)
            self.broadcaster.publish({"server": self.target, **self.state.message()})

    def run(self) -> None:
        client = DetectionClient(self.target, token=self.admin_token, tls=self.tls,
                                 root_certificates=self.root_certificates)
        try:
            while not self._stop.is_set():
                try:
                    self._call = client.watch_calls(
                        include_windows=True, flagged_audio_seconds=self.keep_audio_seconds)
                    for ev in self._call:
                        if ev.HasField("ready"):
                            self.state.server_started_at = ev.ready.server_started_at
                            self.state.flagged_audio_seconds = ev.ready.flagged_audio_seconds
                            if self.keep_audio_seconds and not ev.ready.flagged_audio_seconds:
                                log.warning("the server sends no flagged audio: start it "
                                            "with --feed-flagged-audio SECONDS",
                                            server=self.target)
                            self._set(True)
                        for message in self.ingest(ev):
                            self.broadcaster.publish(message)
                    error = "the server ended the feed"
                except grpc.RpcError as exc:
                    code = exc.code() if hasattr(exc, "code") else None
                    if code == grpc.StatusCode.CANCELLED and self._stop.is_set():
                        break
                    error = f"{code.name if code else 'error'}: {exc.details() or ''}"[:200]
                except Exception as exc:  # a bad row must not kill the feed for good
                    log.exception("feed ingest failed", server=self.target)
                    error = f"ingest error: {type(exc).__name__}"
                self._set(False, error)
                self._stop.wait(self.retry_seconds)
        finally:
            client.close()
