"""Twilio Media Streams: the WebSocket server a ``<Stream>`` (or ``<Start><Stream>``) connects to.

Twilio sends JSON text frames: ``connected``, ``start`` (streamSid, callSid, tracks,
customParameters, mediaFormat: audio/x-mulaw, 8000 Hz, mono), ``media`` (track inbound or
outbound, chunk, timestamp, base64 mu-law payload), ``stop``; ``mark`` and ``dtmf`` are
tolerated. Tracks become SPLIT parties, inbound = ``caller``, outbound = ``agent``; the two
tracks arrive as separate messages, so they are paired up byte for byte (a track that falls
more than ``MAX_SKEW_SECONDS`` behind is padded with mu-law silence, so one silent leg never
stalls the other). Mu-law goes to the detector as is (MULAW).

With an auth token configured, the upgrade request must carry a valid ``X-Twilio-Signature``
(base64 HMAC-SHA1 of the full URL Twilio requested, under the auth token); the URL is the
configured public URL, or else rebuilt from the Host header (wss:// and https:// are tried).
Alerts go back through the REST call update (``POST {api_base}/2010-04-01/Accounts/
{AccountSid}/Calls/{CallSid}.json``) with the configured ``Url`` or ``Twiml``, in which
``$speaker``, ``$score`` and ``$call_sid`` are substituted.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
from dataclasses import dataclass
from string import Template
from typing import Any

import aiohttp
import numpy as np
import structlog
from aiohttp import WSMsgType, web

from callshield.v1 import detection_pb2 as pb
from plugins import metrics, ws
from plugins.core import AudioFormat, CallBridge, Detector, SpoofAlert

PLUGIN = "twilio"
PARTY = {"inbound": "caller", "outbound": "agent"}
MULAW_SILENCE = 0xFF
MAX_SKEW_SECONDS = 1.0
REST_TIMEOUT_SECONDS = 10.0
log = structlog.get_logger("callshield.plugins.twilio")


def signature(auth_token: str, url: str, params: dict[str, str] | None = None) -> str:
    """Twilio's request signature: URL, then each POST parameter name+value sorted by name."""
    data = url + "".join(k + v for k, v in sorted((params or {}).items()))
    digest = hmac.new(auth_token.encode(), data.encode(), hashlib.sha1).digest()
    return base64.b64encode(digest).decode()


@dataclass(frozen=True)
class TwilioSettings:
    auth_token: str = ""  # empty: no signature check and no REST update
    public_url: str = ""  # e.g. wss://calls.example.com (the path comes from the request)
    api_base: str = "https://api.twilio.com"
    account_sid: str = ""  # default: the start message's accountSid
    alert_url: str = ""  # REST update Url=... (TwiML app to branch to)
    alert_twiml: str = ""  # or Twiml=...


class TwilioMediaStreams:
    def __init__(self, detector: Detector, settings: TwilioSettings) -> None:
        self.detector = detector
        self.settings = settings

    def signature_ok(self, request: web.Request) -> bool:
        header = request.headers.get("X-Twilio-Signature", "")
        token = self.settings.auth_token
        if self.settings.public_url:
            urls = [self.settings.public_url.rstrip("/") + request.path_qs]
        else:
            urls = [f"{scheme}://{request.host}{request.path_qs}" for scheme in ("wss", "https")]
        return any(hmac.compare_digest(signature(token, url), header) for url in urls)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if self.settings.auth_token and not self.signature_ok(request):
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "signature").inc()
            log.warning("bad X-Twilio-Signature: upgrade refused", path=request.path)
            return web.Response(status=403, text="invalid X-Twilio-Signature")
        socket = web.WebSocketResponse()
        await socket.prepare(request)
        call = _Stream(self, socket)
        await ws.run_call(PLUGIN, socket, call)
        return socket

    async def update_call(self, account_sid: str, call_sid: str, alert: SpoofAlert) -> None:
        """The REST call update that hands the live call to the alert TwiML."""
        s = self.settings
        if not (s.alert_url or s.alert_twiml) or not s.auth_token:
            return
        values = {"speaker": alert.speaker, "score": f"{alert.spoof_probability:.3f}",
                  "call_sid": call_sid}
        form = ({"Url": Template(s.alert_url).safe_substitute(values), "Method": "POST"}
                if s.alert_url else {"Twiml": Template(s.alert_twiml).safe_substitute(values)})
        url = f"{s.api_base.rstrip('/')}/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        auth = aiohttp.BasicAuth(account_sid, s.auth_token)
        timeout = aiohttp.ClientTimeout(total=REST_TIMEOUT_SECONDS)
        async with aiohttp.ClientSession(auth=auth, timeout=timeout) as http:
            async with http.post(url, data=form) as response:
                if response.status >= 300:
                    raise RuntimeError(f"Twilio call update: HTTP {response.status}")


class _Stream:
    def __init__(self, plugin: TwilioMediaStreams, socket: web.WebSocketResponse) -> None:
        self.plugin = plugin
        self.socket = socket
        self.bridge: CallBridge | None = None
        self.tracks: tuple[str, ...] = ()
        self.buffers: dict[str, bytearray] = {}
        self.account_sid = ""
        self.call_sid = ""
        self.log = log.bind(call_id=None)

    async def run(self) -> None:
        async for msg in self.socket:
            if msg.type in (WSMsgType.ERROR, WSMsgType.CLOSE):
                break
            data = ws.json_message(msg)
            event = data.get("event")
            if event == "media":
                self._on_media(data)
            elif event == "start":
                self._on_start(data)
            elif event == "stop":
                if self.bridge is None:
                    raise ws.WsProtocolError("sequence", "stop before start")
                self.log.info("stop")
                await self.bridge.finish()
                await ws.close(self.socket, ws.NORMAL)
                return
            elif event not in ("connected", "mark", "dtmf"):  # dtmf digits are never logged
                raise ws.WsProtocolError("unknown_type", f"unknown event {str(event)[:40]!r}")
        if self.bridge is not None and self.bridge.failed is None:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "disconnect").inc()
            self.log.warning("connection lost before stop")

    def _on_start(self, data: dict[str, Any]) -> None:
        if self.bridge is not None:
            raise ws.WsProtocolError("sequence", "a second start message")
        start = data.get("start")
        if not isinstance(start, dict):
            raise ws.WsProtocolError("malformed", "start message without start object",
                                     ws.INVALID_PAYLOAD)
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict) or (
                fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels", 1)) != (
                "audio/x-mulaw", 8000, 1):
            raise ws.WsProtocolError("format", f"unsupported mediaFormat {fmt}",
                                     ws.UNSUPPORTED_DATA)
        tracks = tuple(t for t in ("inbound", "outbound") if t in (start.get("tracks") or []))
        if not tracks:
            raise ws.WsProtocolError("format", "start names no inbound/outbound track",
                                     ws.INVALID_PAYLOAD)
        self.call_sid = str(start.get("callSid", ""))
        self.account_sid = self.plugin.settings.account_sid or str(start.get("accountSid", ""))
        self.tracks = tracks
        self.buffers = {t: bytearray() for t in tracks}
        self.log = log.bind(call_id=self.call_sid, stream_sid=str(start.get("streamSid", "")))
        self.bridge = self.plugin.detector.open_call(
            PLUGIN, self.call_sid or str(data.get("streamSid", "")),
            AudioFormat(pb.AUDIO_ENCODING_MULAW, 8000, tuple(PARTY[t] for t in tracks)),
            deliver=self._deliver, on_failure=self._on_failure)

    def _on_media(self, data: dict[str, Any]) -> None:
        if self.bridge is None:
            raise ws.WsProtocolError("sequence", "media before start")
        media = data.get("media")
        if not isinstance(media, dict) or media.get("track") not in self.buffers:
            raise ws.WsProtocolError("malformed", "media without a started track",
                                     ws.INVALID_PAYLOAD)
        try:
            audio = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ws.WsProtocolError("malformed", "payload is not base64",
                                     ws.INVALID_PAYLOAD) from exc
        self.buffers[media["track"]] += audio
        self._forward()

    def _forward(self) -> None:
        """Feed whatever is paired up; pad a track lagging by more than MAX_SKEW_SECONDS."""
        assert self.bridge is not None
        if len(self.tracks) == 1:
            buf = self.buffers[self.tracks[0]]
            if buf:
                self.bridge.feed(bytes(buf))
                buf.clear()
            return
        a, b = (self.buffers[t] for t in self.tracks)
        skew = int(MAX_SKEW_SECONDS * 8000)
        for lead, lag in ((a, b), (b, a)):
            if len(lead) - len(lag) > skew:
                lag.extend(bytes([MULAW_SILENCE]) * (len(lead) - len(lag) - skew))
        n = min(len(a), len(b))
        if n == 0:
            return
        out = np.empty(2 * n, np.uint8)
        out[0::2] = np.frombuffer(bytes(a[:n]), np.uint8)
        out[1::2] = np.frombuffer(bytes(b[:n]), np.uint8)
        del a[:n], b[:n]
        self.bridge.feed(out.tobytes())

    async def _deliver(self, alert: SpoofAlert) -> None:
        await self.plugin.update_call(self.account_sid, self.call_sid, alert)

    async def _on_failure(self, reason: str) -> None:
        await ws.close(self.socket, ws.INTERNAL_ERROR, "detector unavailable")
