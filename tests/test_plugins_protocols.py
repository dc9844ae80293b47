"""The sans-IO platform protocols on their own: what a platform sends in, events and replies
out, no sockets, no event loop, no detector. The wire end to end (real sockets, a real
server) is tests/test_plugins_*.py; these pin down each protocol's rules one by one."""

from __future__ import annotations

import base64
import json
import struct
import uuid
from typing import Any

import pytest

from callshield.v1 import detection_pb2 as pb
from plugins.protocols import events as ev
from plugins.protocols.audiohook import PROBE_CONVERSATION, AudioHookProtocol
from plugins.protocols.audiosocket import (
    DTMF,
    ERROR,
    HANGUP,
    LINGER_SECONDS,
    SLIN,
    UUID,
    AudioSocketProtocol,
    frame,
    parse_slin_types,
)
from plugins.protocols.base import Cause, Ending
from plugins.protocols.events import (
    INTERNAL_ERROR,
    INVALID_PAYLOAD,
    POLICY_VIOLATION,
    UNSUPPORTED_DATA,
    AudioFormat,
    ProtocolViolation,
)
from plugins.protocols.freeswitch import AudioForkProtocol
from plugins.protocols.twilio import MAX_SKEW_SECONDS, MULAW_SILENCE, TwilioProtocol

CALL = uuid.UUID("a1b2c3d4-0000-4000-8000-000000000001")


def kinds(events: list[ev.Event]) -> list[type]:
    return [type(e) for e in events]


def violation(events: list[ev.Event]) -> ProtocolViolation:
    """The protocol error a read ended with (always the last event)."""
    assert isinstance(events[-1], ProtocolViolation), events
    assert not any(isinstance(e, ProtocolViolation) for e in events[:-1])
    return events[-1]


# --- AudioSocket ------------------------------------------------------------------------------

def test_audiosocket_uuid_then_audio_opens_an_8k_caller_stream() -> None:
    p = AudioSocketProtocol()
    pcm = b"\x01\x00" * 160
    events = p.receive(frame(UUID, CALL.bytes) + frame(SLIN, pcm) + frame(SLIN, pcm))
    fmt = AudioFormat(pb.AUDIO_ENCODING_LINEAR16, 8000, ("caller",))
    assert events == [ev.Identify(str(CALL)), ev.Start(str(CALL), fmt), ev.Audio(pcm),
                      ev.Audio(pcm)]


def test_audiosocket_frames_split_across_reads_give_the_same_events() -> None:
    wire = frame(UUID, CALL.bytes) + frame(DTMF, b"5") + frame(SLIN, b"\x00\x01" * 4)
    whole = AudioSocketProtocol().receive(wire)
    p = AudioSocketProtocol()
    pieces = [e for i in range(len(wire)) for e in p.receive(wire[i:i + 1])]
    assert pieces == whole
    assert kinds(whole) == [ev.Identify, ev.Dtmf, ev.Start, ev.Audio]
    assert "5" not in repr(whole[1])  # a digit never reaches a log line through repr


def test_audiosocket_error_comes_after_the_frames_before_it() -> None:
    p = AudioSocketProtocol()
    events = p.receive(frame(UUID, CALL.bytes) + frame(SLIN, b"\x00\x00") + frame(0x42, b"x"))
    assert kinds(events[:-1]) == [ev.Identify, ev.Start, ev.Audio]
    error = violation(events)
    assert (error.reason, str(error)) == ("unknown_type", "unknown frame type 0x42")


@pytest.mark.parametrize(("wire", "reason", "detail"), [
    (frame(SLIN, b"\x00\x00"), "sequence", "audio before the UUID frame"),
    (frame(UUID, b"short"), "length", "UUID frame of 5 bytes (16 expected)"),
    (frame(UUID, CALL.bytes) * 2, "sequence", "a second UUID frame"),
    (frame(UUID, CALL.bytes) + frame(SLIN, b"\x00" * 3), "length",
     "slin frame of 3 bytes (odd or empty)"),
    (frame(UUID, CALL.bytes) + frame(SLIN, b""), "length", "slin frame of 0 bytes (odd or empty)"),
    (frame(UUID, CALL.bytes) + frame(DTMF, b"12"), "length", "DTMF frame of 2 bytes"),
])
def test_audiosocket_protocol_errors(wire: bytes, reason: str, detail: str) -> None:
    error = violation(AudioSocketProtocol().receive(wire))
    assert (error.reason, str(error)) == (reason, detail)


def test_audiosocket_configured_rates_and_a_rate_change() -> None:
    types = parse_slin_types("0x12=16000, 0x16=48000")
    assert types == {SLIN: 8000, 0x12: 16000, 0x16: 48000}
    p = AudioSocketProtocol(types)
    events = p.receive(frame(UUID, CALL.bytes) + frame(0x12, b"\x00\x00"))
    assert isinstance(events[1], ev.Start) and events[1].format.sample_rate == 16000
    error = violation(p.receive(frame(SLIN, b"\x00\x00")))
    assert (error.reason, str(error)) == ("format", "sample rate changed from 16000 to 8000")


def test_audiosocket_hangup_and_error_frames_end_the_call_and_what_follows_is_not_read() -> None:
    p = AudioSocketProtocol()
    p.receive(frame(UUID, CALL.bytes))
    assert p.receive(frame(HANGUP) + frame(0x42)) == [ev.Note("hangup"), ev.Hangup(), ev.Close()]
    assert p.receive(frame(SLIN, b"\x00\x00")) == []
    assert p.end_of_input(None) == []
    q = AudioSocketProtocol()
    assert q.receive(frame(ERROR, b"\x07")) == [
        ev.Note("asterisk error frame", "warning", {"code": 7}), ev.Hangup(), ev.Close()]


def test_audiosocket_close_after_audio_is_a_hangup_otherwise_a_lost_connection() -> None:
    p = AudioSocketProtocol()
    p.receive(frame(UUID, CALL.bytes) + frame(SLIN, b"\x00\x00"))
    assert p.end_of_input(None) == [ev.Note("hangup", fields={"how": "socket closed"}), ev.Hangup()]

    before_audio = AudioSocketProtocol()
    before_audio.receive(frame(UUID, CALL.bytes))
    (dropped,) = before_audio.end_of_input(None)
    assert isinstance(dropped, ev.Dropped) and dropped.lost and not dropped.finish

    mid_header = AudioSocketProtocol()
    mid_header.receive(frame(UUID, CALL.bytes) + frame(SLIN, b"\x00\x00") + b"\x10")
    assert kinds(mid_header.end_of_input(None)) == [ev.Dropped]

    mid_payload = AudioSocketProtocol()
    mid_payload.receive(frame(UUID, CALL.bytes) + struct.pack(">BH", SLIN, 320) + b"\x00" * 10)
    error = violation(mid_payload.end_of_input(None))
    assert str(error) == "frame type 0x10 announced 320 bytes, connection ended after 10"


def test_audiosocket_endings() -> None:
    p = AudioSocketProtocol()
    assert p.ending(Cause.DETECTOR) == Ending(send=(frame(HANGUP),), linger_seconds=LINGER_SECONDS)
    for cause in (Cause.PROTOCOL, Cause.INTERNAL):
        assert p.ending(cause, ProtocolViolation("x", "y")) == Ending(
            send=(bytes([ERROR, 0, 0]),), linger_seconds=LINGER_SECONDS)


# --- Twilio -----------------------------------------------------------------------------------

def twilio_start(tracks: list[str], **fmt: Any) -> str:
    media_format = {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1} | fmt
    return json.dumps({"event": "start", "streamSid": "MZ1", "start": {
        "streamSid": "MZ1", "callSid": "CA1", "accountSid": "AC1", "tracks": tracks,
        "mediaFormat": media_format}})


def media(track: str, audio: bytes) -> str:
    return json.dumps({"event": "media", "media": {
        "track": track, "payload": base64.b64encode(audio).decode()}})


def test_twilio_start_opens_split_parties_and_pairs_the_tracks_byte_for_byte() -> None:
    p = TwilioProtocol()
    assert p.receive(json.dumps({"event": "connected"})) == []
    events = p.receive(twilio_start(["inbound", "outbound"]))
    assert events == [ev.Identify("CA1", {"stream_sid": "MZ1"}), ev.Start(
        "CA1", AudioFormat(pb.AUDIO_ENCODING_MULAW, 8000, ("caller", "agent")))]
    assert (p.account_sid, p.call_sid) == ("AC1", "CA1")
    assert p.receive(media("inbound", b"\x01\x02\x03")) == []  # the agent's side not here yet
    assert p.receive(media("outbound", b"\x0a\x0b")) == [ev.Audio(b"\x01\x0a\x02\x0b")]
    assert p.flush() == [ev.Audio(bytes([0x03, MULAW_SILENCE]))]


def test_twilio_a_silent_track_holds_the_other_back_no_more_than_the_skew() -> None:
    p = TwilioProtocol()
    p.receive(twilio_start(["inbound", "outbound"]))
    skew = int(MAX_SKEW_SECONDS * 8000)
    assert p.receive(media("inbound", b"\x01" * skew)) == []
    (audio,) = p.receive(media("inbound", b"\x01" * 160))
    assert isinstance(audio, ev.Audio)
    assert audio.data == bytes([0x01, MULAW_SILENCE]) * 160


def test_twilio_one_track_passes_through_and_marks_and_digits_are_events() -> None:
    p = TwilioProtocol()
    start = p.receive(twilio_start(["inbound"]))
    assert isinstance(start[1], ev.Start) and start[1].format.parties == ("caller",)
    assert p.receive(media("inbound", b"\x05\x06")) == [ev.Audio(b"\x05\x06")]
    assert p.receive(json.dumps({"event": "mark", "mark": {"name": "m1"}})) == [ev.Mark("m1")]
    assert kinds(p.receive(json.dumps({"event": "dtmf", "dtmf": {"digit": "9"}}))) == [ev.Dtmf]
    assert p.receive(json.dumps({"event": "stop"})) == [ev.Note("stop"), ev.Hangup(), ev.Close()]


@pytest.mark.parametrize(("messages", "reason", "code"), [
    ([b"\x00"], "unexpected_binary", UNSUPPORTED_DATA),
    (["{not json"], "malformed", INVALID_PAYLOAD),
    (["[1]"], "malformed", INVALID_PAYLOAD),
    ([media("inbound", b"\x00")], "sequence", 1002),
    ([json.dumps({"event": "stop"})], "sequence", 1002),
    ([json.dumps({"event": "hello"})], "unknown_type", 1002),
    ([twilio_start(["inbound"], encoding="audio/l16")], "format", UNSUPPORTED_DATA),
    ([twilio_start([])], "format", INVALID_PAYLOAD),
    ([twilio_start(["inbound"]), twilio_start(["inbound"])], "sequence", 1002),
    ([twilio_start(["inbound"]), media("outbound", b"\x00")], "malformed", INVALID_PAYLOAD),
    ([twilio_start(["inbound"]), json.dumps({"event": "media", "media": {
        "track": "inbound", "payload": "not base64!"}})], "malformed", INVALID_PAYLOAD),
])
def test_twilio_protocol_errors_carry_their_close_code(
        messages: list[str | bytes], reason: str, code: int) -> None:
    p = TwilioProtocol()
    for message in messages[:-1]:
        p.receive(message)
    error = violation(p.receive(messages[-1]))
    assert (error.reason, error.code) == (reason, code)
    assert p.ending(Cause.PROTOCOL, error) == Ending(code=code, reason=str(error))


def test_twilio_socket_closed_without_stop_still_ends_the_call() -> None:
    p = TwilioProtocol()
    assert p.end_of_input(1006) == []  # nothing started: nothing to end
    p.receive(twilio_start(["inbound"]))
    (clean,) = p.end_of_input(1000)
    (torn,) = p.end_of_input(1006)
    assert isinstance(clean, ev.Dropped) and isinstance(torn, ev.Dropped)
    assert (clean.lost, clean.finish, clean.event) == (
        False, True, "socket closed without stop: call ended")
    assert (torn.lost, torn.finish, torn.event) == (
        True, True, "connection lost before stop: call ended")
    assert p.ending(Cause.DETECTOR) == Ending(code=INTERNAL_ERROR, reason="detector unavailable")
    assert p.alert({"type": "spoof_alert"}) is None  # the back channel is the REST API


# --- FreeSWITCH -------------------------------------------------------------------------------

def test_freeswitch_metadata_announces_the_format() -> None:
    p = AudioForkProtocol()
    events = p.receive(json.dumps({"uuid": "fs-1", "sampleRate": "16k", "mixType": "stereo"}))
    assert events == [ev.Identify("fs-1"), ev.Start("fs-1", AudioFormat(
        pb.AUDIO_ENCODING_LINEAR16, 16000, ("caller", "agent")))]
    assert p.receive(b"\x00" * 8) == [ev.Audio(b"\x00" * 8)]
    assert p.receive(json.dumps({"type": "anything"})) == []  # later text frames: ignored
    assert violation(p.receive(b"\x00" * 6)).code == INVALID_PAYLOAD  # not whole stereo samples
    assert p.end_of_input(1000) == [ev.Note("fork closed"), ev.Hangup()]
    alert = json.loads(str(p.alert({"type": "spoof_alert", "speaker": "caller"})))
    assert alert == {"type": "json", "data": {"type": "spoof_alert", "speaker": "caller"}}


def _mod_audio_fork(frame: str) -> tuple[str, dict[str, Any]] | str:
    """What drachtio's mod_audio_fork (and jambonz's fork of it) does with a text frame from
    the server, after ``processIncomingMessage`` in ``lws_glue.cpp``: the custom event it
    fires and its body, or the error it logs. ``json`` is the only type whose event carries
    the whole frame; ``transcription``/``transfer``/... carry ``data`` under their own event
    names, which the module also acts on (``transfer``, ``disconnect``, audio playback)."""
    message = json.loads(frame)
    kind = message.get("type", "")
    known = {"transcription", "transfer", "disconnect", "error"}
    if kind == "json":
        return "mod_audio_fork::json", message
    if kind in known:
        return f"mod_audio_fork::{kind}", message.get("data")
    return f"processIncomingMessage - unsupported msg type {kind}"


def _mod_audio_stream(frame: str) -> tuple[str, dict[str, Any]] | str:
    """amigniter's mod_audio_stream (``audio_streamer_glue.cpp``, ``eventCallback``): a text
    frame other than ``streamAudio`` is raised as ``mod_audio_stream::json``, body as sent."""
    message = json.loads(frame)
    if message.get("type") == "streamAudio":
        return "streamAudio: played, no event"
    return "mod_audio_stream::json", message


def test_freeswitch_alert_frame_is_an_event_in_both_fork_modules() -> None:
    """The alert reaches the ESL application as each module's ``::json`` event, with the
    alert in the body. A real FreeSWITCH logged ``unsupported msg type spoof_alert`` and
    raised nothing for the frame this plugin used to send (``{"type": "spoof_alert"}``)."""
    data = {"type": "spoof_alert", "speaker": "caller", "spoof_probability": 0.97}
    frame = str(AudioForkProtocol().alert(data))
    for module in (_mod_audio_fork, _mod_audio_stream):
        event = module(frame)
        assert isinstance(event, tuple), (module.__name__, event)
        name, body = event
        assert name.endswith("::json") and body["data"] == data, (module.__name__, event)
    old = json.dumps({"type": "spoof_alert", "data": data})
    assert _mod_audio_fork(old) == "processIncomingMessage - unsupported msg type spoof_alert"


def test_freeswitch_mixed_goes_to_the_server_as_one_mixed_channel() -> None:
    (_, start) = AudioForkProtocol().receive(json.dumps({"callId": "x", "mixType": "mixed"}))
    assert isinstance(start, ev.Start)
    assert (start.format.parties, start.format.mixed) == (("mixed",), True)


@pytest.mark.parametrize(("message", "code"), [
    (b"\x00\x00", POLICY_VIOLATION),
    (json.dumps({"uuid": "x", "sampleRate": 44100}), INVALID_PAYLOAD),
    (json.dumps({"uuid": "x", "mixType": "quad"}), INVALID_PAYLOAD),
    ("not json", INVALID_PAYLOAD),
])
def test_freeswitch_protocol_errors(message: str | bytes, code: int) -> None:
    assert violation(AudioForkProtocol().receive(message)).code == code


# --- AudioHook --------------------------------------------------------------------------------

class Client:
    """Genesys' side: version-2 messages with the client seq counting up."""

    def __init__(self) -> None:
        self.seq = 0

    def __call__(self, kind: str, parameters: dict[str, Any] | None = None) -> str:
        self.seq += 1
        return json.dumps({"version": "2", "id": "session-1", "type": kind, "seq": self.seq,
                           "serverseq": 0, "position": "PT0S", "parameters": parameters or {}})


def sent(events: list[ev.Event]) -> list[dict[str, Any]]:
    return [json.loads(e.message) for e in events if isinstance(e, ev.Send)]


def open_message(client: Client, conversation: str = "conv-1", **more: Any) -> str:
    return client("open", {"conversationId": conversation, "media": [
        {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000},
        {"type": "audio", "format": "PCMU", "channels": ["external", "internal"], "rate": 8000},
    ]} | more)


def test_audiohook_open_chooses_stereo_pcmu_and_answers_with_seq_and_clientseq() -> None:
    p, client = AudioHookProtocol("session-1"), Client()
    assert p.context() == {"session_id": "session-1"}
    events = p.receive(open_message(client))
    assert kinds(events) == [ev.Identify, ev.Send, ev.Start]
    (opened,) = sent(events)
    assert (opened["type"], opened["seq"], opened["clientseq"]) == ("opened", 1, 1)
    assert opened["parameters"]["media"][0]["channels"] == ["external", "internal"]
    assert events[2] == ev.Start("conv-1", AudioFormat(pb.AUDIO_ENCODING_MULAW, 8000,
                                                    ("caller", "agent")))
    (pong,) = sent(p.receive(client("ping")))
    assert (pong["type"], pong["seq"], pong["clientseq"]) == ("pong", 2, 2)
    assert p.receive(b"\x01\x02") == [ev.Audio(b"\x01\x02")]


def test_audiohook_pause_fills_silence_and_audio_while_paused_is_not_scored() -> None:
    p, client = AudioHookProtocol(), Client()
    p.receive(open_message(client))
    p.receive(b"\x00" * 1600)  # 800 samples a channel: 0.1 s
    events = p.receive(client("paused"))
    assert events == [ev.Note("paused", fields={"position": "PT0.1S"}), ev.Pause(b"\xff\xff", 8000)]
    assert p.receive(b"\x00" * 16) == []
    assert kinds(p.receive(client("resumed"))) == [ev.Note, ev.Resume]
    assert kinds(p.receive(b"\x00" * 16)) == [ev.Audio]


def test_audiohook_close_finishes_the_call_then_answers_closed() -> None:
    p, client = AudioHookProtocol(), Client()
    p.receive(open_message(client))
    events = p.receive(client("close", {"reason": "end"}))
    assert kinds(events) == [ev.Note, ev.Hangup, ev.Send, ev.Close]
    assert sent(events)[0]["type"] == "closed"
    assert p.alert({"speaker": "caller"}) is None  # closing: no more in-band events
    assert p.end_of_input(1000) == []


def test_audiohook_probe_is_answered_and_opens_no_stream() -> None:
    p, client = AudioHookProtocol(), Client()
    events = p.receive(open_message(client, PROBE_CONVERSATION))
    assert kinds(events) == [ev.Identify, ev.Send, ev.Note]
    assert p.receive(b"") == [] and p.receive(b"\x00\x00") == []
    events = p.receive(client("close"))
    assert kinds(events) == [ev.Note, ev.Send, ev.Close]  # no ev.Hangup: there is no call to finish


@pytest.mark.parametrize(("steps", "reason"), [
    (["audio"], "sequence"),
    (["paused"], "sequence"),
    (["open", "open"], "sequence"),
    (["open", "gap"], "sequence"),
    (["open", "odd"], "length"),
    (["open", "bogus"], "unknown_type"),
    (["v1"], "malformed"),
    (["binary-open-then-text", "bad json"], "malformed"),
])
def test_audiohook_protocol_errors(steps: list[str], reason: str) -> None:
    p, client = AudioHookProtocol(), Client()
    made: dict[str, Any] = {
        "audio": lambda: b"\x00\x00", "paused": lambda: client("paused"),
        "open": lambda: open_message(client), "odd": lambda: b"\x00" * 3,
        "gap": lambda: (setattr(client, "seq", client.seq + 1), client("ping"))[1],
        "bogus": lambda: client("bogus"), "v1": lambda: json.dumps({"version": "1", "seq": 1}),
        "binary-open-then-text": lambda: open_message(client), "bad json": lambda: "{",
    }
    for step in steps[:-1]:
        assert not any(isinstance(e, ProtocolViolation) for e in p.receive(made[step]()))
    assert violation(p.receive(made[steps[-1]]())).reason == reason


def test_audiohook_signed_organization_must_match_open() -> None:
    p = AudioHookProtocol("s", organization="org-1")
    error = violation(p.receive(open_message(Client(), organizationId="org-2")))
    assert error.reason == "unauthorized"
    ending = p.ending(Cause.PROTOCOL, error)
    assert ending is not None
    (disconnect,) = ending.send
    assert json.loads(disconnect)["parameters"]["reason"] == "unauthorized"
    ok = AudioHookProtocol("s", organization="org-1")
    assert kinds(ok.receive(open_message(Client(), organizationId="org-1")))[-1] is ev.Start


def test_audiohook_disconnect_then_the_clients_close_gets_closed() -> None:
    p, client = AudioHookProtocol("session-1"), Client()
    p.receive(open_message(client))
    ending = p.ending(Cause.DETECTOR)
    assert ending is not None and ending.farewell_seconds > 0
    (disconnect,) = (json.loads(m) for m in ending.send)
    assert disconnect["type"] == "disconnect"
    assert disconnect["parameters"] == {"reason": "error", "info": "detector unavailable"}
    assert p.ending(Cause.INTERNAL) is None  # one goodbye at a time
    assert p.receive(b"\x00\x00") == []  # audio in flight before the client saw it
    assert p.alert({"speaker": "caller"}) is None
    assert p.farewell(b"\x00") is None and p.farewell(client("ping")) is None
    (closed,) = (json.loads(m) for m in p.farewell(client("close")) or [])
    assert (closed["type"], closed["clientseq"]) == ("closed", client.seq)
    # or the read loop still runs: its close is answered without finishing the call
    q, other = AudioHookProtocol(), Client()
    q.receive(open_message(other))
    q.ending(Cause.DETECTOR)
    assert kinds(q.receive(other("close"))) == [ev.Note, ev.Send, ev.Close]


def test_audiohook_alert_is_an_event_message_at_the_current_position() -> None:
    p, client = AudioHookProtocol("session-1"), Client()
    p.receive(open_message(client))
    p.receive(b"\x00" * 16000)  # 1 s of stereo
    message = json.loads(str(p.alert({"type": "spoof_alert", "speaker": "caller"})))
    assert (message["type"], message["seq"]) == ("event", 2)
    assert message["parameters"] == {"entities": [{
        "type": "callshield.spoof_alert", "data": {"type": "spoof_alert", "speaker": "caller"}}],
        "position": "PT1S"}
    assert kinds(p.end_of_input(1006)) == [ev.Dropped]
