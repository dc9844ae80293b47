"""FreeSWITCH mod_audio_fork / mod_audio_stream: the WebSocket server a media bug streams to.

The first frame is text: the JSON metadata given to ``uuid_audio_fork <uuid> start <url>
<mix-type> <rate> <metadata>``. The module does not announce the format on the wire, so the
metadata must (see docs/telephony.md): ``uuid`` (or ``callId``), ``sampleRate`` (8000 or 16000,
or "8k"/"16k") and ``mixType`` (``mono``/``mixed``: one channel; ``stereo``: two, the caller on
channel 0) or ``channels``. Then binary frames of signed 16-bit little-endian PCM, interleaved
when stereo. Later text frames are ignored (the modules may send their own).

Alerts go back as a JSON text frame on the same socket, ``{"type": "spoof_alert", "data":
{...}}``; mod_audio_fork raises frames from the server as a ``mod_audio_fork::json`` custom
event, on which an ESL application acts (docs/telephony.md).
"""

from __future__ import annotations

import uuid
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from callshield.v1 import detection_pb2 as pb
from plugins import ws
from plugins.core import AudioFormat, CallBridge, DetectorLink, ProtocolError, SpoofAlert

PLUGIN = "freeswitch"
RATES = {"8k": 8000, "8000": 8000, "16k": 16000, "16000": 16000}
MIX_CHANNELS = {"mono": 1, "mixed": 1, "stereo": 2}
log = structlog.get_logger("callshield.plugins.freeswitch")


def parse_metadata(data: dict[str, Any]) -> tuple[str, AudioFormat]:
    """(call id, format) from the first frame's JSON, or :class:`ProtocolError`."""
    call_id = str(data.get("uuid") or data.get("callId") or data.get("call_id") or "")
    rate = RATES.get(str(data.get("sampleRate", data.get("sample_rate", "8000"))).lower())
    if rate is None:
        raise ProtocolError("format", "sampleRate must be 8000 or 16000", ws.INVALID_PAYLOAD)
    mix = data.get("mixType", data.get("mix_type"))
    channels = MIX_CHANNELS.get(str(mix).lower()) if mix is not None else data.get("channels", 1)
    if channels not in (1, 2):
        raise ProtocolError("format", "mixType must be mono, mixed or stereo",
                                 ws.INVALID_PAYLOAD)
    mixed = channels == 1 and str(mix).lower() == "mixed"
    parties = ("caller", "agent") if channels == 2 else (("mixed",) if mixed else ("caller",))
    return call_id or uuid.uuid4().hex, AudioFormat(pb.AUDIO_ENCODING_LINEAR16, rate, parties,
                                                    mixed=mixed)


class AudioFork:
    def __init__(self, detector: DetectorLink) -> None:
        self.detector = detector

    async def handle(self, request: web.Request) -> web.StreamResponse:
        socket = web.WebSocketResponse(protocols=("audio.drachtio.org", "audiostream.drachtio.org"))
        await socket.prepare(request)
        call = _Fork(self, socket)
        await ws.run_call(PLUGIN, socket, call)
        return socket


class _Fork:
    def __init__(self, plugin: AudioFork, socket: web.WebSocketResponse) -> None:
        self.plugin = plugin
        self.socket = socket
        self.bridge: CallBridge | None = None
        self.log = log.bind(call_id=None)

    async def run(self) -> None:
        async for msg in self.socket:
            if msg.type == WSMsgType.BINARY:
                if self.bridge is None:
                    raise ProtocolError("sequence", "audio before the metadata frame",
                                             ws.POLICY_VIOLATION)
                if not msg.data or len(msg.data) % self.bridge.format.frame_bytes:
                    raise ProtocolError(
                        "length", f"audio frame of {len(msg.data)} bytes is not whole samples",
                        ws.INVALID_PAYLOAD)
                self.bridge.feed(msg.data)
            elif msg.type == WSMsgType.TEXT:
                if self.bridge is None:
                    self._open(ws.json_message(msg))
            else:
                break
        if self.bridge is not None:
            # mod_audio_fork ends a call by closing the socket: that is the normal hangup
            self.log.info("fork closed")
            await self.bridge.finish()

    def _open(self, metadata: dict[str, Any]) -> None:
        call_id, fmt = parse_metadata(metadata)
        self.log = log.bind(call_id=call_id)
        self.bridge = self.plugin.detector.open_call(
            PLUGIN, call_id, fmt, deliver=self._deliver, on_failure=self._on_failure)

    async def _deliver(self, alert: SpoofAlert) -> None:
        if self.socket.closed:
            raise ConnectionError("fork socket already closed")
        await self.socket.send_json({"type": "spoof_alert", "data": alert.to_dict()})

    async def _on_failure(self, reason: str) -> None:
        await ws.close(self.socket, ws.INTERNAL_ERROR, "detector unavailable")
