"""Test peers for the telephony plugins, written from each platform's protocol documentation,
and local stand-ins for the platforms' own back ends (AMI, Twilio REST, ARI, webhooks).

The peers pace audio like the platforms do: one 20 ms frame every 20 ms, on an absolute
schedule (no drift), over real sockets. They live beside the benches rather than in
``tests/`` because both drive them (``tests/test_plugins_*.py``, ``bench/plugins.py``), and a
bench must not import the tests.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import soundfile
import websockets
from aiohttp import web

from models.data.audio import mulaw_encode
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.asterisk import AmiTarget
from plugins.core import DetectorLink
from plugins.twilio import TwilioSettings, signature
from plugins.webhook import WebhookSender
from server.devstack import SHARED

SHARED_CALLS = SHARED / "calls"
RATE = 8000
FRAME = 160  # samples in 20 ms at 8 kHz
SPOOF_B_TURNS = ((12.3, 15.1), (27.6, 33.0))  # call_dev_03: party B (spoof, T01) speaks here
EXCERPT_SECONDS = 14.0


@dataclass(frozen=True)
class Legs:
    """One call as the platforms deliver it: the caller's and the agent's audio, int16."""

    caller: np.ndarray
    agent: np.ndarray

    @property
    def stereo(self) -> np.ndarray:
        return np.stack([self.caller, self.agent], axis=1)

    def frames(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for i in range(0, len(self.caller) - FRAME + 1, FRAME):
            yield self.caller[i : i + FRAME], self.agent[i : i + FRAME]


def spoof_legs(seconds: float = EXCERPT_SECONDS) -> Legs:
    """call_dev_03 (spoofB): party B is the caller, so the caller leg is B's channel of the
    stereo variant over B's turns (played twice to give the model plenty of spoofed speech);
    the agent leg is A's channel over the same stretches."""
    pcm, rate = soundfile.read(SHARED_CALLS / "call_dev_03_stereo.flac", dtype="int16",
                               always_2d=True)
    assert rate == RATE
    parts = [pcm[int(a * rate) : int(b * rate)] for a, b in SPOOF_B_TURNS]
    both = np.concatenate(parts * 2)[: int(seconds * rate)]
    return Legs(caller=np.ascontiguousarray(both[:, 1]), agent=np.ascontiguousarray(both[:, 0]))


def bonafide_legs(seconds: float = EXCERPT_SECONDS) -> Legs:
    """call_dev_00 (both parties human; no stereo variant): the mono call as the caller leg,
    a silent agent leg."""
    pcm, rate = soundfile.read(SHARED_CALLS / "call_dev_00.flac", dtype="int16", always_2d=True)
    assert rate == RATE
    caller = np.ascontiguousarray(pcm[: int(seconds * rate), 0])
    return Legs(caller=caller, agent=np.zeros_like(caller))


async def paced(legs: Legs) -> AsyncIterator[tuple[np.ndarray, np.ndarray]]:
    t0 = time.monotonic()
    for i, pair in enumerate(legs.frames()):
        delay = t0 + i * 0.02 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        yield pair


# --- Asterisk AudioSocket -------------------------------------------------------------------

def as_frame(kind: int, payload: bytes = b"") -> bytes:
    return bytes([kind]) + len(payload).to_bytes(2, "big") + payload


async def audiosocket_call(port: int, call_uuid: str, legs: Legs,
                           hangup_frame: bool = False) -> bytes:
    """Asterisk's side: UUID, 20 ms slin frames of the channel, then the end of the call as
    a real Asterisk ends it: the socket closed (FIN) without a 0x00 frame (seen on Asterisk
    main, 2026-08, at every normal hangup); ``hangup_frame`` sends the documented 0x00 first.
    Returns what the plugin wrote back."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(as_frame(0x01, uuid.UUID(call_uuid).bytes))
    async for caller, _agent in paced(legs):
        writer.write(as_frame(0x10, caller.astype("<i2").tobytes()))
        await writer.drain()
    if hangup_frame:
        writer.write(as_frame(0x00))
    writer.write_eof()
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return received


# --- Twilio Media Streams -------------------------------------------------------------------

def twilio_messages(call_sid: str, stream_sid: str, account_sid: str) -> dict[str, Any]:
    return {
        "connected": {"event": "connected", "protocol": "Call", "version": "1.0.0"},
        "start": {"event": "start", "sequenceNumber": "1", "streamSid": stream_sid, "start": {
            "accountSid": account_sid, "streamSid": stream_sid, "callSid": call_sid,
            "tracks": ["inbound", "outbound"], "customParameters": {"queue": "fraud-test"},
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}},
    }


def twilio_headers(url: str, auth_token: str) -> dict[str, str]:
    """Twilio signs the wss:// URL it connects to (the test connects over plain ws://)."""
    return {"X-Twilio-Signature": signature(auth_token, url.replace("ws://", "wss://", 1))}


async def twilio_call(url: str, auth_token: str, call_sid: str, legs: Legs) -> list[str]:
    """Twilio's side: connected, start, media per track every 20 ms, stop."""
    stream_sid = "MZ" + uuid.uuid4().hex
    first = twilio_messages(call_sid, stream_sid, "ACtest")
    received: list[str] = []
    async with websockets.connect(url, additional_headers=twilio_headers(url, auth_token)) as w:
        await w.send(json.dumps(first["connected"]))
        await w.send(json.dumps(first["start"]))
        seq, chunk = 2, 0
        async for caller, agent in paced(legs):
            chunk += 1
            for track, pcm in (("inbound", caller), ("outbound", agent)):
                await w.send(json.dumps({
                    "event": "media", "sequenceNumber": str(seq), "streamSid": stream_sid,
                    "media": {"track": track, "chunk": str(chunk), "timestamp": str(chunk * 20),
                              "payload": base64.b64encode(mulaw_encode(pcm).tobytes()).decode()},
                }))
                seq += 1
        await w.send(json.dumps({"event": "stop", "sequenceNumber": str(seq),
                                 "streamSid": stream_sid,
                                 "stop": {"accountSid": "ACtest", "callSid": call_sid}}))
        async for message in w:
            received.append(str(message))
    return received


# --- FreeSWITCH mod_audio_fork --------------------------------------------------------------

async def freeswitch_call(url: str, call_uuid: str, legs: Legs) -> list[dict[str, Any]]:
    """mod_audio_fork's side, ``stereo 8k``: metadata text frame, then interleaved L16 (caller
    on channel 0) every 20 ms, then close; returns the JSON text frames the server sent."""
    received: list[dict[str, Any]] = []

    async def read(w: websockets.ClientConnection) -> None:
        async for message in w:
            if isinstance(message, str):
                received.append(json.loads(message))

    async with websockets.connect(url, subprotocols=[websockets.Subprotocol(
            "audio.drachtio.org")]) as w:
        reader = asyncio.create_task(read(w))
        await w.send(json.dumps({"uuid": call_uuid, "sampleRate": 8000, "mixType": "stereo"}))
        async for caller, agent in paced(legs):
            await w.send(np.stack([caller, agent], axis=1).astype("<i2").tobytes())
        await asyncio.sleep(1.0)  # FreeSWITCH keeps the socket a moment after the media bug
        await w.close()
        await reader
    return received


# --- Genesys AudioHook ----------------------------------------------------------------------

@dataclass
class AudioHookClient:
    """Genesys's side of an AudioHook v2 session."""

    w: websockets.ClientConnection
    session_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    seq: int = 0
    serverseq: int = 0
    samples: int = 0
    received: list[dict[str, Any]] = field(default_factory=list)

    async def send(self, kind: str, parameters: dict[str, Any] | None = None) -> None:
        self.seq += 1
        await self.w.send(json.dumps({
            "version": "2", "id": self.session_id, "type": kind, "seq": self.seq,
            "serverseq": self.serverseq, "position": f"PT{self.samples / RATE:.2f}S",
            "parameters": parameters or {}}))

    async def expect(self, kind: str, seconds: float = 10.0) -> dict[str, Any]:
        async with asyncio.timeout(seconds):
            while True:
                message = json.loads(await self.w.recv())
                self.received.append(message)
                self.serverseq = message["seq"]
                if message["type"] == kind:
                    return message

    async def open(self, conversation_id: str) -> dict[str, Any]:
        await self.send("open", {
            "organizationId": str(uuid.uuid4()), "conversationId": conversation_id,
            "participant": {"id": str(uuid.uuid4()), "ani": "+15550100", "aniName": "",
                            "dnis": "+15550199"},
            "media": [{"type": "audio", "format": "PCMU", "channels": ["external", "internal"],
                       "rate": 8000},
                      {"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}],
            "language": "en-US"})
        return await self.expect("opened")

    async def collect(self) -> None:
        async for message in self.w:
            data = json.loads(message)
            self.received.append(data)
            self.serverseq = data["seq"]


async def audiohook_call(
    url: str, api_key: str, conversation_id: str, legs: Legs
) -> list[dict[str, Any]]:
    headers = {"X-API-KEY": api_key, "Audiohook-Session-Id": str(uuid.uuid4()),
               "Audiohook-Organization-Id": str(uuid.uuid4())}
    async with websockets.connect(url, additional_headers=headers) as w:
        client = AudioHookClient(w)
        await client.open(conversation_id)
        reader = asyncio.create_task(client.collect())
        async for caller, agent in paced(legs):
            codes = mulaw_encode(np.stack([caller, agent], axis=1))
            await w.send(codes.tobytes())
            client.samples += FRAME
        await client.send("close", {"reason": "end"})
        await asyncio.wait_for(reader, 30)  # the server sends closed, then closes the socket
    return client.received


# --- the platforms' back ends ---------------------------------------------------------------

class FakeAmi:
    """A local AMI: banner, Login, Getvar (globals from ``globals``), Setvar, Logoff."""

    def __init__(self, username: str = "callshield", secret: str = "s3cret") -> None:
        self.username, self.secret = username, secret
        self.globals: dict[str, str] = {}
        self.actions: list[dict[str, str]] = []
        self.server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> FakeAmi:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def setvars(self) -> list[dict[str, str]]:
        return [a for a in self.actions if a.get("Action") == "Setvar"]

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"Asterisk Call Manager/9.0.0\r\n")
        authed = False
        packet: dict[str, str] = {}
        while line := await reader.readline():
            text = line.decode().rstrip("\r\n")
            if text:
                key, _, value = text.partition(":")
                packet[key.strip()] = value.strip()
                continue
            if not packet:
                continue
            self.actions.append(packet)
            action, action_id = packet.get("Action", ""), packet.get("ActionID", "")
            reply = {"Response": "Success", "ActionID": action_id}
            if action == "Login":
                authed = (packet.get("Username"), packet.get("Secret")) == (
                    self.username, self.secret)
                if not authed:
                    reply |= {"Response": "Error", "Message": "Authentication failed"}
            elif not authed:
                reply |= {"Response": "Error", "Message": "Permission denied"}
            elif action == "Getvar":
                reply |= {"Variable": packet.get("Variable", ""),
                          "Value": self.globals.get(packet.get("Variable", ""), "")}
            elif action == "Logoff":
                reply |= {"Response": "Goodbye"}
            writer.write(("".join(f"{k}: {v}\r\n" for k, v in reply.items()) + "\r\n").encode())
            await writer.drain()
            packet = {}
            if action == "Logoff":
                break
        writer.close()


@dataclass
class Recorded:
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    at: float = 0.0  # time.monotonic() on arrival


class FakeHttp:
    """A local HTTP server that records every request (Twilio REST, ARI, webhooks) and
    answers with ``statuses`` in turn (then 200), plus ARI's global-variable lookup."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.statuses: list[int] = []
        self.ari_globals: dict[str, str] = {}
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def matching(self, prefix: str) -> list[Recorded]:
        return [r for r in self.requests if r.path.startswith(prefix)]

    async def start(self) -> FakeHttp:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def _handle(self, request: web.Request) -> web.Response:
        self.requests.append(Recorded(request.method, request.path, dict(request.query),
                                      dict(request.headers), await request.read(),
                                      time.monotonic()))
        if request.path.endswith("/asterisk/variable"):
            value = self.ari_globals.get(request.query.get("variable", ""))
            return (web.json_response({"value": value}) if value is not None
                    else web.json_response({"message": "not found"}, status=404))
        status = self.statuses.pop(0) if self.statuses else 200
        return web.json_response({"ok": status < 300}, status=status)


@asynccontextmanager
async def back_ends() -> AsyncIterator[tuple[FakeAmi, FakeHttp]]:
    ami, http = await FakeAmi().start(), await FakeHttp().start()
    try:
        yield ami, http
    finally:
        await ami.stop()
        await http.stop()


# --- the plugins under test -----------------------------------------------------------------

TWILIO_TOKEN = "twilio-auth-token"
AUDIOHOOK_KEY = "audiohook-api-key"
WEBHOOK_SECRET = "webhook-secret"


@asynccontextmanager
async def plugin_stack(
    detector_port: int, ami: FakeAmi, http: FakeHttp, **detector_fields: Any
) -> AsyncIterator[RunningPlugins]:
    """All four plugins on free 127.0.0.1 ports (the WebSocket ones sharing one), talking to
    the detector on ``detector_port`` and to the fake back ends."""
    settings = PluginSettings(
        audiosocket="127.0.0.1:0", twilio="127.0.0.1:0/twilio",
        freeswitch="127.0.0.1:0/fork", audiohook="127.0.0.1:0/audiohook",
        asterisk_alerts=AmiTarget("127.0.0.1", ami.port, ami.username, ami.secret),
        twilio_settings=TwilioSettings(
            auth_token=TWILIO_TOKEN, api_base=http.url,
            alert_url="https://app.example.com/fraud?speaker=$speaker&score=$score"),
        audiohook_api_key=AUDIOHOOK_KEY)
    webhook = WebhookSender([f"{http.url}/hook"], WEBHOOK_SECRET, backoff_seconds=0.05)
    detector = DetectorLink(f"127.0.0.1:{detector_port}", webhook=webhook, **detector_fields)
    running = await start_plugins(settings, detector)
    try:
        yield running
    finally:
        await running.stop()


def ws_url(running: RunningPlugins, path: str) -> str:
    return f"ws://127.0.0.1:{running.ports['twilio']}{path}"
