"""FreeSWITCH mod_audio_fork / mod_audio_stream, sans-IO: WebSocket messages in, events out.

The first frame is text: the JSON metadata given to ``uuid_audio_fork <uuid> start <url>
<mix-type> <rate> <metadata>``. The module does not announce the format on the wire, so the
metadata must (see docs/platforms/freeswitch.md): ``uuid`` (or ``callId``), ``sampleRate``
(8000 or 16000, or "8k"/"16k") and ``mixType`` (``mono``/``mixed``: one channel; ``stereo``:
two, the caller on channel 0) or ``channels``. Then binary frames of signed 16-bit
little-endian PCM, interleaved when stereo. Later text frames are ignored (the modules may
send their own). The module ends a call by closing the socket: that is the normal hangup.

Alerts go back in band as a JSON text frame ``{"type": "json", "data": {"type": "spoof_alert",
...}}``. The ``type`` is what the modules dispatch on: mod_audio_fork (drachtio's, and
jambonz's fork of it; ``processIncomingMessage`` in ``lws_glue.cpp``) knows ``playAudio``,
``killAudio``, ``transcription``, ``transfer``, ``disconnect``, ``error`` and ``json``, raises
only ``json`` as the ``mod_audio_fork::json`` custom event whose body is the whole frame, and
logs ``unsupported msg type`` for anything else (a real FreeSWITCH dropped every alert sent as
``{"type": "spoof_alert"}`` so). amigniter's mod_audio_stream raises any text frame but
``streamAudio`` as ``mod_audio_stream::json``, body the whole frame: the one form serves both.
"""

from __future__ import annotations

import uuid
from typing import Any

from callshield.v1 import detection_pb2 as pb
from plugins.protocols import events as ev
from plugins.protocols.base import Inbound, WebSocketProtocol, dumps, json_object
from plugins.protocols.events import (
    INVALID_PAYLOAD,
    POLICY_VIOLATION,
    AudioFormat,
    Outbound,
    ProtocolViolation,
)

RATES = {"8k": 8000, "8000": 8000, "16k": 16000, "16000": 16000}
MIX_CHANNELS = {"mono": 1, "mixed": 1, "stereo": 2}
SUBPROTOCOLS = ("audio.drachtio.org", "audiostream.drachtio.org")
#: the frame type mod_audio_fork raises as an event (``mod_audio_fork::json``)
ALERT_FRAME_TYPE = "json"


def parse_metadata(data: dict[str, Any]) -> tuple[str, AudioFormat]:
    """(call id, format) from the first frame's JSON, or :class:`ProtocolViolation`."""
    call_id = str(data.get("uuid") or data.get("callId") or data.get("call_id") or "")
    rate = RATES.get(str(data.get("sampleRate", data.get("sample_rate", "8000"))).lower())
    if rate is None:
        raise ProtocolViolation("format", "sampleRate must be 8000 or 16000", INVALID_PAYLOAD)
    mix = data.get("mixType", data.get("mix_type"))
    channels = MIX_CHANNELS.get(str(mix).lower()) if mix is not None else data.get("channels", 1)
    if channels not in (1, 2):
        raise ProtocolViolation("format", "mixType must be mono, mixed or stereo",
                                INVALID_PAYLOAD)
    mixed = channels == 1 and str(mix).lower() == "mixed"
    parties = ("caller", "agent") if channels == 2 else (("mixed",) if mixed else ("caller",))
    return call_id or uuid.uuid4().hex, AudioFormat(pb.AUDIO_ENCODING_LINEAR16, rate, parties,
                                                    mixed=mixed)


class AudioForkProtocol(WebSocketProtocol):
    plugin = "freeswitch"

    def __init__(self) -> None:
        self.format: AudioFormat | None = None

    def _receive(self, data: Inbound, events: list[ev.Event]) -> None:
        if isinstance(data, bytes):
            if self.format is None:
                raise ProtocolViolation("sequence", "audio before the metadata frame",
                                        POLICY_VIOLATION)
            if not data or len(data) % self.format.frame_bytes:
                raise ProtocolViolation(
                    "length", f"audio frame of {len(data)} bytes is not whole samples",
                    INVALID_PAYLOAD)
            events.append(ev.Audio(data))
        elif self.format is None:
            call_id, self.format = parse_metadata(json_object(data))
            events += [ev.Identify(call_id), ev.Start(call_id, self.format)]

    def end_of_input(self, close_code: int | None) -> list[ev.Event]:
        return [ev.Note("fork closed"), ev.Hangup()] if self.format is not None else []

    def alert(self, data: dict[str, Any]) -> Outbound | None:
        """The frame both fork modules raise as their ``::json`` event (module docstring);
        ``data["type"]`` (``spoof_alert``) tells the ESL application what it carries."""
        return dumps({"type": ALERT_FRAME_TYPE, "data": data})
