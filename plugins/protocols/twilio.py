"""Twilio Media Streams, sans-IO: JSON text messages in, events out.

Twilio sends ``connected``, ``start`` (streamSid, callSid, tracks, customParameters,
mediaFormat: audio/x-mulaw, 8000 Hz, mono), ``media`` (track inbound or outbound, chunk,
timestamp, base64 mu-law payload), ``stop``; ``mark`` and ``dtmf`` are tolerated. Tracks
become SPLIT parties, inbound = ``caller``, outbound = ``agent``; the two tracks arrive as
separate messages, so they are paired up byte for byte (a track that falls more than
``MAX_SKEW_SECONDS`` behind is padded with mu-law silence, so one silent leg never stalls the
other). Mu-law goes to the detector as is (MULAW).
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

from callshield.v1 import detection_pb2 as pb
from plugins.protocols import events as ev
from plugins.protocols.base import Inbound, WebSocketProtocol, json_object
from plugins.protocols.events import (
    INVALID_PAYLOAD,
    NORMAL,
    UNSUPPORTED_DATA,
    AudioFormat,
    ProtocolViolation,
)

PARTY = {"inbound": "caller", "outbound": "agent"}
MULAW_SILENCE = 0xFF
MAX_SKEW_SECONDS = 0.2  # the most a silent or lagging track holds back the other one
GOING_AWAY = 1001


class TwilioProtocol(WebSocketProtocol):
    plugin = "twilio"

    def __init__(self) -> None:
        self.started = False
        self.tracks: tuple[str, ...] = ()
        self.buffers: dict[str, bytearray] = {}
        self.account_sid = ""  # the start message's: whose REST API updates the call
        self.call_sid = ""

    def _receive(self, data: Inbound, events: list[ev.Event]) -> None:
        message = json_object(data)
        kind = message.get("event")
        if kind == "media":
            events += self._media(message)
        elif kind == "start":
            events += self._start(message)
        elif kind == "stop":
            if not self.started:
                raise ProtocolViolation("sequence", "stop before start")
            events += [ev.Note("stop"), ev.Hangup(), ev.Close()]
        elif kind == "dtmf":
            dtmf = message.get("dtmf")
            events.append(ev.Dtmf(str(dtmf.get("digit", "")) if isinstance(dtmf, dict) else ""))
        elif kind == "mark":
            mark = message.get("mark")
            events.append(ev.Mark(str(mark.get("name", "")) if isinstance(mark, dict) else ""))
        elif kind != "connected":
            raise ProtocolViolation("unknown_type", f"unknown event {str(kind)[:40]!r}")

    def _start(self, message: dict[str, Any]) -> list[ev.Event]:
        if self.started:
            raise ProtocolViolation("sequence", "a second start message")
        start = message.get("start")
        if not isinstance(start, dict):
            raise ProtocolViolation("malformed", "start message without start object",
                                    INVALID_PAYLOAD)
        fmt = start.get("mediaFormat") or {}
        if not isinstance(fmt, dict) or (
                fmt.get("encoding"), fmt.get("sampleRate"), fmt.get("channels", 1)) != (
                "audio/x-mulaw", 8000, 1):
            raise ProtocolViolation("format", f"unsupported mediaFormat {fmt}", UNSUPPORTED_DATA)
        tracks = tuple(t for t in ("inbound", "outbound") if t in (start.get("tracks") or []))
        if not tracks:
            raise ProtocolViolation("format", "start names no inbound/outbound track",
                                    INVALID_PAYLOAD)
        self.started = True
        self.call_sid = str(start.get("callSid", ""))
        self.account_sid = str(start.get("accountSid", ""))
        self.tracks = tracks
        self.buffers = {t: bytearray() for t in tracks}
        fmt_ = AudioFormat(pb.AUDIO_ENCODING_MULAW, 8000, tuple(PARTY[t] for t in tracks))
        return [ev.Identify(self.call_sid, {"stream_sid": str(start.get("streamSid", ""))}),
                ev.Start(self.call_sid or str(message.get("streamSid", "")), fmt_)]

    def _media(self, message: dict[str, Any]) -> list[ev.Event]:
        if not self.started:
            raise ProtocolViolation("sequence", "media before start")
        media = message.get("media")
        if not isinstance(media, dict) or media.get("track") not in self.buffers:
            raise ProtocolViolation("malformed", "media without a started track", INVALID_PAYLOAD)
        try:
            audio = base64.b64decode(media.get("payload", ""), validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ProtocolViolation("malformed", "payload is not base64",
                                    INVALID_PAYLOAD) from exc
        self.buffers[media["track"]] += audio
        return self._paired()

    def _paired(self, flush: bool = False) -> list[ev.Event]:
        """Whatever is paired up; a track lagging by more than MAX_SKEW_SECONDS is padded
        (at the end of the call, by any amount)."""
        if len(self.tracks) == 1:
            buf = self.buffers[self.tracks[0]]
            audio = bytes(buf)
            buf.clear()
            return [ev.Audio(audio)] if audio else []
        a, b = (self.buffers[t] for t in self.tracks)
        skew = 0 if flush else int(MAX_SKEW_SECONDS * 8000)
        for lead, lag in ((a, b), (b, a)):
            if len(lead) - len(lag) > skew:
                lag.extend(bytes([MULAW_SILENCE]) * (len(lead) - len(lag) - skew))
        n = min(len(a), len(b))
        if n == 0:
            return []
        out = np.empty(2 * n, np.uint8)
        out[0::2] = np.frombuffer(bytes(a[:n]), np.uint8)
        out[1::2] = np.frombuffer(bytes(b[:n]), np.uint8)
        del a[:n], b[:n]
        return [ev.Audio(out.tobytes())]

    def flush(self) -> list[ev.Event]:
        return self._paired(flush=True) if self.started else []

    def end_of_input(self, close_code: int | None) -> list[ev.Event]:
        """Twilio ends with ``stop``, but a socket closed without it still ends the call:
        everything received is scored and summarized, nothing is thrown away."""
        if not self.started:
            return []
        if close_code in (NORMAL, GOING_AWAY):
            return [ev.Dropped("socket closed without stop: call ended", "info",
                            {"close_code": close_code}, lost=False, finish=True)]
        return [ev.Dropped("connection lost before stop: call ended", "warning",
                        {"close_code": close_code}, lost=True, finish=True)]
