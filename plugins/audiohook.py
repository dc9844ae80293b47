"""Genesys Cloud AudioHook (protocol version 2): the WebSocket server an AudioHook integration
connects to.

The client (Genesys) sends JSON text messages with ``version``, ``id`` (the session), ``type``,
``seq`` (1, 2, ...), ``serverseq`` and ``position`` (ISO 8601 duration of audio so far); the
server answers with its own ``seq`` and ``clientseq`` (the last client seq seen). ``open`` gets
``opened`` with the chosen media (PCMU, 8 kHz, stereo ``external`` + ``internal`` when offered:
external = customer = ``caller``, internal = ``agent``), ``ping`` gets ``pong``, ``paused`` /
``resumed`` / ``update`` / ``discarded`` / ``dtmf`` / ``error`` are taken note of, ``close``
gets ``closed``. Binary frames of interleaved PCMU are valid only between ``opened`` and
``close``. The ``X-API-KEY`` header of the upgrade request must match the configured key;
with a client secret configured, the request must also carry a valid HTTP message signature
(:mod:`plugins.httpsig`), and the ``organizationId`` of ``open`` must match the signed
``Audiohook-Organization-Id``. A refused upgrade gets 401 after ``FAILURE_DELAY_SECONDS``
(as Genesys' reference server, so timing tells an attacker nothing).

A connection probe (Genesys checks the integration with conversation id all zeros, no audio
or an empty frame) gets ``opened`` and ``closed`` like a call but opens no detection stream.
The client's ``error``, ``update`` and ``discarded`` messages are logged (never their
participant data).

A protocol error gets a ``disconnect`` (reason ``error``, with ``info``); the client answers
with ``close``, and the socket is closed after ``closed`` or ``DISCONNECT_WAIT_SECONDS``.
Alerts go back as an ``event`` message (entity type ``callshield.spoof_alert``) and through
the webhook.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import suppress
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from callshield.v1 import detection_pb2 as pb
from plugins import metrics, ws
from plugins.core import (
    AudioFormat,
    CallBridge,
    DetectorGone,
    DetectorLink,
    ProtocolError,
    SpoofAlert,
)
from plugins.httpsig import Verifier

PLUGIN = "audiohook"
VERSION = "2"
PARTY = {"external": "caller", "internal": "agent"}
TOLERATED = ("paused", "resumed", "update", "discarded", "dtmf", "error")
DISCONNECT_WAIT_SECONDS = 2.0
FAILURE_DELAY_SECONDS = 0.5
PCMU_SILENCE = 0xFF
PROBE_CONVERSATION = "00000000-0000-0000-0000-000000000000"
log = structlog.get_logger("callshield.plugins.audiohook")


def iso_duration(seconds: float) -> str:
    return f"PT{seconds:.3f}".rstrip("0").rstrip(".") + "S"


def choose_media(offers: Any) -> dict[str, Any] | None:
    """PCMU 8 kHz: stereo external+internal if offered, else external alone."""
    if not isinstance(offers, list):
        return None
    usable = [m for m in offers if isinstance(m, dict) and m.get("type") == "audio"
              and m.get("format") == "PCMU" and m.get("rate") == 8000]
    for wanted in (["external", "internal"], ["external"]):
        for media in usable:
            if media.get("channels") == wanted:
                return media
    return None


class AudioHookServer:
    def __init__(self, detector: DetectorLink, api_key: str = "", client_secret: str = "") -> None:
        self.detector = detector
        self.api_key = api_key
        self.verifier = Verifier(client_secret) if client_secret else None

    def refusal(self, request: web.Request) -> str | None:
        """Why the upgrade is refused (for the log), or None."""
        if self.api_key and not hmac.compare_digest(
                request.headers.get("X-API-KEY", ""), self.api_key):
            return "bad X-API-KEY"
        if self.verifier is not None:
            problem = self.verifier.verify(request.headers, request.path_qs)
            if problem is not None:
                return f"bad signature: {problem}"
        return None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        refusal = self.refusal(request)
        if refusal is not None:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "unauthorized").inc()
            log.warning("upgrade refused", reason=refusal,
                        session_id=request.headers.get("Audiohook-Session-Id", ""))
            await asyncio.sleep(FAILURE_DELAY_SECONDS)
            return web.Response(status=401, text="unauthorized")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        session = _Session(self, socket, request.headers.get("Audiohook-Session-Id", ""))
        if self.verifier is not None:
            session.organization = request.headers.get("Audiohook-Organization-Id", "")
        try:
            await session.run()
        except ProtocolError as exc:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, exc.reason).inc()
            session.log.warning("protocol error", reason=exc.reason, detail=str(exc))
            await session.disconnect(
                str(exc), "unauthorized" if exc.reason == "unauthorized" else "error")
        except DetectorGone:
            await session.disconnect("detector unavailable")
        except Exception:
            session.log.exception("internal error")
            await session.disconnect("internal error")
        finally:
            if session.filler is not None:
                session.filler.cancel()
            if session.bridge is not None:
                await session.bridge.abort("connection closed")
            await ws.close(socket, ws.NORMAL)
        return socket


class _Session:
    def __init__(self, plugin: AudioHookServer, socket: web.WebSocketResponse, sid: str) -> None:
        self.plugin = plugin
        self.socket = socket
        self.id = sid
        self.seq = 0  # last server seq sent
        self.clientseq = 0  # last client seq received
        self.samples = 0  # audio received, per channel: the server's idea of position
        self.channels = 0
        self.paused = False
        self.filler: asyncio.Task[None] | None = None  # silence while paused
        self.closing = False  # close received, or disconnect sent after the read loop ended
        self.disconnecting = False  # disconnect sent while the read loop runs
        self.bridge: CallBridge | None = None
        self.probe = False  # a connection probe: no detection stream
        self.organization = ""  # the signed organization id, when signatures are checked
        self.log = log.bind(call_id=None, session_id=sid)

    async def send(self, kind: str, parameters: dict[str, Any]) -> None:
        self.seq += 1
        await self.socket.send_json({
            "version": VERSION, "type": kind, "seq": self.seq, "clientseq": self.clientseq,
            "id": self.id, "parameters": parameters})

    async def run(self) -> None:
        async for msg in self.socket:
            if msg.type == WSMsgType.BINARY:
                self._on_audio(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if await self._on_message(ws.json_message(msg)):
                    return
            else:
                break
        if not self.closing and (self.bridge is None or self.bridge.failed is None):
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "disconnect").inc()
            self.log.warning("connection lost before close")

    def _on_audio(self, data: bytes) -> None:
        if self.disconnecting:
            return  # frames in flight before the client saw our disconnect
        if (self.bridge is None and not self.probe) or self.closing:
            raise ProtocolError("sequence", "audio outside opened..close")
        if not data or self.bridge is None:
            return  # an empty frame (the probe sends one) or probe audio: nothing to score
        if len(data) % self.channels:
            raise ProtocolError("length", f"audio frame of {len(data)} bytes is not whole "
                                     f"samples of {self.channels} channels")
        self.samples += len(data) // self.channels
        if not self.paused:
            self.bridge.feed(data)

    async def _on_message(self, message: dict[str, Any]) -> bool:
        """Handle one client message; True when the session is over."""
        seq = message.get("seq")
        if message.get("version") != VERSION or not isinstance(seq, int):
            raise ProtocolError("malformed", "message without version 2 and integer seq")
        if seq != self.clientseq + 1:
            raise ProtocolError("sequence", f"seq {seq} after {self.clientseq}")
        self.clientseq = seq
        kind = message.get("type")
        if kind == "open":
            await self._on_open(message)
        elif kind == "ping":
            await self.send("pong", {})
        elif kind == "close":
            self.closing = True
            self.log.info("close", reason=str((message.get("parameters") or {}).get("reason")))
            if self.bridge is not None and not self.disconnecting:
                await self.bridge.finish()
            await self.send("closed", {})
            return True
        elif kind in TOLERATED:
            if self.bridge is None and not self.probe:
                raise ProtocolError("sequence", f"{kind} before open")
            self._on_notice(kind, message.get("parameters") or {})
        else:
            raise ProtocolError("unknown_type", f"unknown message type {str(kind)[:40]!r}")
        return False

    def _on_notice(self, kind: str, parameters: Any) -> None:
        """Messages that change nothing but the record: logged, without participant data."""
        if not isinstance(parameters, dict):
            parameters = {}
        position = iso_duration(self.samples / 8000)
        if kind in ("paused", "resumed"):
            self.paused = kind == "paused"
            self.log.info(kind, position=position)
            if self.paused and self.bridge is not None and self.filler is None:
                self.filler = asyncio.create_task(self._fill_pause(self.bridge))
            elif not self.paused and self.filler is not None:
                self.filler.cancel()
                self.filler = None
        elif kind == "error":
            self.log.warning("client error", code=str(parameters.get("code", ""))[:10],
                             message=str(parameters.get("message", ""))[:200],
                             position=position)
        elif kind == "discarded":
            self.log.warning("client discarded audio", start=str(parameters.get("start"))[:20],
                             discarded=str(parameters.get("discarded"))[:20])
        elif kind == "update":
            self.log.info("client update", parameters=sorted(parameters)[:10])

    async def _on_open(self, message: dict[str, Any]) -> None:
        if self.bridge is not None or self.probe:
            raise ProtocolError("sequence", "a second open")
        self.id = str(message.get("id") or self.id)
        parameters = message.get("parameters") or {}
        if self.organization and parameters.get("organizationId") != self.organization:
            raise ProtocolError("unauthorized",
                                     "organizationId is not the signed Audiohook-Organization-Id")
        media = choose_media(parameters.get("media"))
        if media is None:
            raise ProtocolError("format", "no PCMU 8000 Hz external[/internal] media offered")
        call_id = str(parameters.get("conversationId") or self.id)
        self.log = log.bind(call_id=call_id, session_id=self.id)
        self.channels = len(media["channels"])
        await self.send("opened", {"startPaused": False, "media": [media]})
        if call_id == PROBE_CONVERSATION:
            self.probe = True
            self.log.info("connection probe")
            return
        self.bridge = self.plugin.detector.open_call(
            PLUGIN, call_id,
            AudioFormat(pb.AUDIO_ENCODING_MULAW, 8000,
                        tuple(PARTY[c] for c in media["channels"])),
            deliver=self._deliver, on_failure=self._on_failure)

    async def _deliver(self, alert: SpoofAlert) -> None:
        if self.socket.closed or self.closing:
            raise ConnectionError("AudioHook session already closing")
        await self.send("event", {"entities": [{
            "type": "callshield.spoof_alert", "data": alert.to_dict()}]} | {
            "position": iso_duration(self.samples / 8000)})

    async def _fill_pause(self, bridge: CallBridge) -> None:
        """Genesys sends no audio while paused (a card number read out, say): silence takes
        its place in real time, so call time stays wall time and the detector's idle
        timeout never ends the stream in a long pause."""
        start, filled = time.monotonic(), 0  # samples, caught up with the clock each step
        with suppress(DetectorGone):
            while True:
                await asyncio.sleep(0.2)
                due = int((time.monotonic() - start) * 8000) - filled
                bridge.feed(bytes([PCMU_SILENCE]) * due * self.channels)
                filled += due

    async def _on_failure(self, reason: str) -> None:
        """Detector gone, while the read loop runs: it answers the client's ``close``."""
        if self.socket.closed or self.closing or self.disconnecting:
            return
        self.disconnecting = True
        await self.send("disconnect", {"reason": "error", "info": "detector unavailable"})
        await asyncio.sleep(DISCONNECT_WAIT_SECONDS)
        await ws.close(self.socket, ws.NORMAL)

    async def disconnect(self, info: str, reason: str = "error") -> None:
        """After the read loop: ``disconnect``, then wait briefly for the client's
        ``close``."""
        if self.socket.closed or self.closing or self.disconnecting:
            return
        self.closing = True
        try:
            await self.send("disconnect", {"reason": reason, "info": info[:200]})
            async with asyncio.timeout(DISCONNECT_WAIT_SECONDS):
                async for msg in self.socket:
                    if msg.type != WSMsgType.TEXT:
                        continue
                    try:
                        message = ws.json_message(msg)
                    except ProtocolError:
                        continue
                    if message.get("type") == "close":
                        if isinstance(message.get("seq"), int):
                            self.clientseq = message["seq"]
                        await self.send("closed", {})
                        break
        except (TimeoutError, ConnectionError, RuntimeError):
            pass
        await ws.close(self.socket, ws.NORMAL)
