"""Genesys Cloud AudioHook (protocol version 2), sans-IO: WebSocket messages in, events out.

The client (Genesys) sends JSON text messages with ``version``, ``id`` (the session), ``type``,
``seq`` (1, 2, ...), ``serverseq`` and ``position`` (ISO 8601 duration of audio so far); the
server answers with its own ``seq`` and ``clientseq`` (the last client seq seen). ``open`` gets
``opened`` with the chosen media (PCMU, 8 kHz, stereo ``external`` + ``internal`` when offered:
external = customer = ``caller``, internal = ``agent``), ``ping`` gets ``pong``, ``paused`` /
``resumed`` / ``update`` / ``discarded`` / ``dtmf`` / ``error`` are taken note of, ``close``
gets ``closed``. Binary frames of interleaved PCMU are valid only between ``opened`` and
``close``. With a signed upgrade request, ``open`` must name the signed organization.

A connection probe (Genesys checks the integration with conversation id all zeros, no audio
or an empty frame) gets ``opened`` and ``closed`` like a call but opens no detection stream.
The client's ``error``, ``update`` and ``discarded`` messages are logged (never their
participant data). We end a session with ``disconnect`` (reason ``error`` or
``unauthorized``, with ``info``), to which the client answers ``close`` (:meth:`farewell`).
Alerts go back in band as an ``event`` message (entity type ``callshield.spoof_alert``).
"""

from __future__ import annotations

from typing import Any

from callshield.v1 import detection_pb2 as pb
from plugins.protocols import events as ev
from plugins.protocols.base import Cause, Ending, Inbound, PlatformProtocol, dumps, json_object
from plugins.protocols.events import AudioFormat, Outbound, ProtocolViolation

VERSION = "2"
PARTY = {"external": "caller", "internal": "agent"}
TOLERATED = ("paused", "resumed", "update", "discarded", "dtmf", "error")
DISCONNECT_WAIT_SECONDS = 2.0
PCMU_SILENCE = 0xFF
PROBE_CONVERSATION = "00000000-0000-0000-0000-000000000000"
RATE = 8000


def iso_duration(seconds: float) -> str:
    return f"PT{seconds:.3f}".rstrip("0").rstrip(".") + "S"


def choose_media(offers: Any) -> dict[str, Any] | None:
    """PCMU 8 kHz: stereo external+internal if offered, else external alone."""
    if not isinstance(offers, list):
        return None
    usable = [m for m in offers if isinstance(m, dict) and m.get("type") == "audio"
              and m.get("format") == "PCMU" and m.get("rate") == RATE]
    for wanted in (["external", "internal"], ["external"]):
        for media in usable:
            if media.get("channels") == wanted:
                return media
    return None


class AudioHookProtocol(PlatformProtocol):
    plugin = "audiohook"

    def __init__(self, session_id: str = "", organization: str = "") -> None:
        self.id = session_id
        self.organization = organization  # the signed organization id; empty: unchecked
        self.seq = 0  # last server seq sent
        self.clientseq = 0  # last client seq received
        self.samples = 0  # audio received, per channel: the server's idea of position
        self.channels = 0
        self.opened = False  # a call's open was answered (not a probe)
        self.probe = False  # a connection probe: no detection stream
        self.paused = False
        self.closing = False  # the client's close received
        self.disconnecting = False  # our disconnect sent: the client's close will follow

    def context(self) -> dict[str, Any]:
        return {"session_id": self.id}

    def message(self, kind: str, parameters: dict[str, Any]) -> str:
        self.seq += 1
        return dumps({"version": VERSION, "type": kind, "seq": self.seq,
                      "clientseq": self.clientseq, "id": self.id, "parameters": parameters})

    def _receive(self, data: Inbound, events: list[ev.Event]) -> None:
        if isinstance(data, bytes):
            events += self._audio(data)
        else:
            events += self._message(json_object(data))

    def _audio(self, data: bytes) -> list[ev.Event]:
        if self.disconnecting:
            return []  # frames in flight before the client saw our disconnect
        if not (self.opened or self.probe) or self.closing:
            raise ProtocolViolation("sequence", "audio outside opened..close")
        if not data or self.probe:
            return []  # an empty frame (the probe sends one) or probe audio: nothing to score
        if len(data) % self.channels:
            raise ProtocolViolation("length", f"audio frame of {len(data)} bytes is not whole "
                                    f"samples of {self.channels} channels")
        self.samples += len(data) // self.channels
        return [] if self.paused else [ev.Audio(data)]

    def _message(self, message: dict[str, Any]) -> list[ev.Event]:
        seq = message.get("seq")
        if message.get("version") != VERSION or not isinstance(seq, int):
            raise ProtocolViolation("malformed", "message without version 2 and integer seq")
        if seq != self.clientseq + 1:
            raise ProtocolViolation("sequence", f"seq {seq} after {self.clientseq}")
        self.clientseq = seq
        kind = message.get("type")
        parameters = message.get("parameters") or {}
        if kind == "open":
            return self._open(message)
        if kind == "ping":
            return [ev.Send(self.message("pong", {}))]
        if kind == "close":
            self.closing = True
            reason = str(parameters.get("reason")) if isinstance(parameters, dict) else "None"
            events: list[ev.Event] = [ev.Note("close", fields={"reason": reason})]
            if self.opened and not self.disconnecting:
                events.append(ev.Hangup())
            return events + [ev.Send(self.message("closed", {})), ev.Close()]
        if kind in TOLERATED:
            if not (self.opened or self.probe):
                raise ProtocolViolation("sequence", f"{kind} before open")
            return self._notice(kind, parameters)
        raise ProtocolViolation("unknown_type", f"unknown message type {str(kind)[:40]!r}")

    def _notice(self, kind: str, parameters: Any) -> list[ev.Event]:
        """Messages that change nothing but the record: logged, without participant data."""
        if not isinstance(parameters, dict):
            parameters = {}
        position = iso_duration(self.samples / RATE)
        if kind in ("paused", "resumed"):
            self.paused = kind == "paused"
            note = ev.Note(kind, fields={"position": position})
            if self.paused:
                return [note, ev.Pause(bytes([PCMU_SILENCE]) * self.channels, RATE)]
            return [note, ev.Resume()]
        if kind == "error":
            return [ev.Note("client error", "warning", {
                "code": str(parameters.get("code", ""))[:10],
                "message": str(parameters.get("message", ""))[:200], "position": position})]
        if kind == "discarded":
            return [ev.Note("client discarded audio", "warning", {
                "start": str(parameters.get("start"))[:20],
                "discarded": str(parameters.get("discarded"))[:20]})]
        if kind == "update":
            return [ev.Note("client update", fields={"parameters": sorted(parameters)[:10]})]
        return [ev.Dtmf(str(parameters.get("digit", "")))]

    def _open(self, message: dict[str, Any]) -> list[ev.Event]:
        if self.opened or self.probe:
            raise ProtocolViolation("sequence", "a second open")
        self.id = str(message.get("id") or self.id)
        parameters = message.get("parameters") or {}
        if self.organization and parameters.get("organizationId") != self.organization:
            raise ProtocolViolation("unauthorized",
                                    "organizationId is not the signed Audiohook-Organization-Id")
        media = choose_media(parameters.get("media"))
        if media is None:
            raise ProtocolViolation("format", "no PCMU 8000 Hz external[/internal] media offered")
        call_id = str(parameters.get("conversationId") or self.id)
        self.channels = len(media["channels"])
        events: list[ev.Event] = [
            ev.Identify(call_id, {"session_id": self.id}),
            ev.Send(self.message("opened", {"startPaused": False, "media": [media]}))]
        if call_id == PROBE_CONVERSATION:
            self.probe = True
            return events + [ev.Note("connection probe")]
        self.opened = True
        fmt = AudioFormat(pb.AUDIO_ENCODING_MULAW, RATE,
                          tuple(PARTY[c] for c in media["channels"]))
        return events + [ev.Start(call_id, fmt)]

    def end_of_input(self, close_code: int | None) -> list[ev.Event]:
        if self.closing:
            return []
        return [ev.Dropped("connection lost before close")]

    def alert(self, data: dict[str, Any]) -> Outbound | None:
        if self.closing or self.disconnecting:
            return None
        return self.message("event", {
            "entities": [{"type": "callshield.spoof_alert", "data": data}],
            "position": iso_duration(self.samples / RATE)})

    def ending(self, cause: Cause, error: ProtocolViolation | None = None) -> Ending | None:
        if self.closing or self.disconnecting:
            return None
        self.disconnecting = True
        if cause is Cause.PROTOCOL and error is not None:
            reason = "unauthorized" if error.reason == "unauthorized" else "error"
            info = str(error)
        else:
            reason = "error"
            info = "detector unavailable" if cause is Cause.DETECTOR else "internal error"
        return Ending(send=(self.message("disconnect", {"reason": reason, "info": info[:200]}),),
                      farewell_seconds=DISCONNECT_WAIT_SECONDS)

    def farewell(self, data: Inbound) -> list[Outbound] | None:
        if isinstance(data, bytes):
            return None
        try:
            message = json_object(data)
        except ProtocolViolation:
            return None
        if message.get("type") != "close":
            return None
        if isinstance(message.get("seq"), int):
            self.clientseq = message["seq"]
        self.closing = True
        return [self.message("closed", {})]

