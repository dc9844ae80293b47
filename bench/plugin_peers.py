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
import re
import shutil
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import soundfile
import websockets
from aiohttp import web

from devstack import SHARED
from models.data.audio import alaw_encode, mulaw_encode
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.asterisk import AmiTarget
from plugins.bridge import DetectorLink
from plugins.siprec.rtp import build_rtp
from plugins.siprec.server import SiprecSettings
from plugins.twilio import TwilioSettings, signature
from plugins.webhook import WebhookSender

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
    """All five plugins on free 127.0.0.1 ports (the WebSocket ones sharing one; SIPREC's
    RTP in :func:`siprec_rtp_range`), talking to the detector on ``detector_port`` and to
    the fake back ends."""
    settings = PluginSettings(
        audiosocket="127.0.0.1:0", twilio="127.0.0.1:0/twilio",
        freeswitch="127.0.0.1:0/fork", audiohook="127.0.0.1:0/audiohook",
        asterisk_alerts=AmiTarget("127.0.0.1", ami.port, ami.username, ami.secret),
        twilio_settings=TwilioSettings(
            auth_token=TWILIO_TOKEN, api_base=http.url,
            alert_url="https://app.example.com/fraud?speaker=$speaker&score=$score"),
        audiohook_api_key=AUDIOHOOK_KEY,
        siprec=SiprecSettings(listen="127.0.0.1:0", rtp_ports=siprec_rtp_range()))
    webhook = WebhookSender([f"{http.url}/hook"], WEBHOOK_SECRET, backoff_seconds=0.05)
    detector = DetectorLink(f"127.0.0.1:{detector_port}", webhook=webhook, **detector_fields)
    running = await start_plugins(settings, detector)
    try:
        yield running
    finally:
        await running.stop()


def ws_url(running: RunningPlugins, path: str) -> str:
    return f"ws://127.0.0.1:{running.ports['twilio']}{path}"


# --- SIPREC (an SRC: SBC or PBX) ------------------------------------------------------------

SIPREC_BOUNDARY = "callshield-boundary"


def siprec_metadata(session_id: str, parties: list[tuple[str, str, str, str]],
                    dialect: str = "rfc7865", caller_flag: str = "") -> str:
    """Recording metadata for ``parties`` (participant id, AOR, stream id, SDP label), each
    sending one stream, in the RFC 7865 form or the older draft form (Oracle/Acme, Avaya:
    ``<participant id=...>`` with ``<send>`` inline). ``caller_flag``: the participant id
    that carries Oracle's ``<apkt:callingParty>true</apkt:callingParty>`` extension."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>',
           '<recording xmlns="urn:ietf:params:xml:ns:recording:1">',
           "<datamode>complete</datamode>"]
    if dialect == "rfc7865":
        out += ['<group group_id="7+OTCyoxTmqmqyA/1weDAg==">',
                "<associate-time>2026-12-07T07:00:00Z</associate-time></group>",
                f'<session session_id="{session_id}">',
                "<sipSessionID>ab30317f1a784dc48ff824d0d3715d86;"
                "remote=47755a9de7794ba387653f2099600ef2</sipSessionID>",
                '<group-ref>7+OTCyoxTmqmqyA/1weDAg==</group-ref></session>']
        for pid, aor, _sid, _label in parties:
            out.append(f'<participant participant_id="{pid}"><nameID aor="{aor}">'
                       f"<name xml:lang=\"en\">{pid[:4]}</name></nameID></participant>")
        for _pid, _aor, sid, label in parties:
            out.append(f'<stream stream_id="{sid}" session_id="{session_id}">'
                       f"<label>{label}</label></stream>")
        for pid, _aor, sid, _label in parties:
            recv = "".join(f"<recv>{s}</recv>" for _p, _a, s, _l in parties if s != sid)
            out.append(f'<participantstreamassoc participant_id="{pid}">'
                       f"<send>{sid}</send>{recv}</participantstreamassoc>")
    else:
        out.append(f'<session id="{session_id}"><start-time>2026-12-07T07:00:00Z'
                   "</start-time></session>")
        for pid, aor, sid, _label in parties:
            flag = ('<extensiondata xmlns:apkt="http://acmepacket.com/siprec/extensiondata">'
                    "<apkt:callingParty>true</apkt:callingParty></extensiondata>"
                    if pid == caller_flag else "")
            out.append(f'<participant id="{pid}" session="{session_id}">'
                       f'<nameID aor="{aor}"><name>{pid[:4]}</name></nameID>'
                       f"<send>{sid}</send>{flag}</participant>")
        for _pid, _aor, sid, label in parties:
            out.append(f'<stream id="{sid}" session="{session_id}"><label>{label}</label>'
                       "</stream>")
    out.append("</recording>")
    return "\r\n".join(out)


def siprec_sdp(address: str, ports: list[int], labels: list[str], codecs: str = "0 101",
               direction: str = "sendonly") -> str:
    lines = ["v=0", f"o=SRC 1234 1 IN IP4 {address}", "s=SIPREC", f"c=IN IP4 {address}",
             "t=0 0"]
    for port, label in zip(ports, labels, strict=True):
        lines += [f"m=audio {port} RTP/AVP {codecs}", "a=rtpmap:0 PCMU/8000",
                  "a=rtpmap:8 PCMA/8000", "a=rtpmap:9 G722/8000",
                  "a=rtpmap:101 telephone-event/8000", f"a=label:{label}", f"a={direction}"]
    return "\r\n".join(lines) + "\r\n"


def siprec_body(sdp: str, metadata: str | None, extra: list[tuple[str, str]] = ()) -> str:
    """The multipart/mixed body: SDP, metadata, then ``extra`` parts (Cisco's GTD...)."""
    parts = [("application/sdp", sdp)]
    if metadata is not None:
        parts.append(("application/rs-metadata+xml", metadata))
    parts += list(extra)
    out = []
    for kind, content in parts:
        disposition = ("\r\nContent-Disposition: recording-session"
                       if kind.startswith("application/rs-metadata") else "")
        out.append(f"--{SIPREC_BOUNDARY}\r\nContent-Type: {kind}{disposition}\r\n\r\n"
                   f"{content.rstrip()}\r\n")
    return "".join(out) + f"--{SIPREC_BOUNDARY}--\r\n"


def sip_request(method: str, uri: str, call_id: str, cseq: int, body: str = "", *,
                local: tuple[str, int], transport: str = "UDP", from_tag: str = "src1",
                to_tag: str = "", content_type: str = "", require: str = "siprec",
                branch: str = "") -> bytes:
    """An SRC's request, as Cisco CUBE writes one (Require: siprec, +sip.src Contact)."""
    host, port = local
    headers = [
        f"Via: SIP/2.0/{transport} {host}:{port};branch={branch or 'z9hG4bK' + uuid.uuid4().hex}",
        "Max-Forwards: 70", f"From: <sip:src@{host}>;tag={from_tag}",
        f"To: <{uri}>" + (f";tag={to_tag}" if to_tag else ""), f"Call-ID: {call_id}",
        f"CSeq: {cseq} {method}", f"Contact: <sip:src@{host}:{port}>;+sip.src",
        "User-Agent: callshield-test-src"]
    if method == "INVITE" and require:
        headers.append(f"Require: {require}")
    if body:
        headers.append("Content-Type: " + (content_type or
                                           f"multipart/mixed;boundary={SIPREC_BOUNDARY}"))
    headers.append(f"Content-Length: {len(body.encode())}")
    return ("\r\n".join([f"{method} {uri} SIP/2.0", *headers]) + "\r\n\r\n" + body).encode()


class SipPeer(asyncio.DatagramProtocol):
    """An SRC's UDP socket: send requests, read what comes back (replies and our BYEs)."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.transport: asyncio.DatagramTransport | None = None

    @classmethod
    async def open(cls, target: tuple[str, int]) -> SipPeer:
        loop = asyncio.get_running_loop()
        _t, peer = await loop.create_datagram_endpoint(cls, local_addr=("127.0.0.1", 0),
                                                       remote_addr=target)
        return peer

    @property
    def local(self) -> tuple[str, int]:
        assert self.transport is not None
        host, port = self.transport.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a datagram endpoint's transport (CPython's is not a DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.inbox.put_nowait(data)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.sendto(data)

    async def receive(self, seconds: float = 10.0) -> bytes:
        return await asyncio.wait_for(self.inbox.get(), seconds)

    async def status(self, seconds: float = 10.0, skip: tuple[int, ...] = (100,)) -> bytes:
        """The next response whose status is not in ``skip``."""
        while True:
            data = await self.receive(seconds)
            if data.startswith(b"SIP/2.0 ") and int(data.split(b" ", 2)[1]) not in skip:
                return data

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def rtp_packets(pcm: np.ndarray, ssrc: int, payload_type: int = 0, seq0: int = 1000,
                ts0: int = 160000) -> list[bytes]:
    """20 ms PCMU (0) or PCMA (8) packets of ``pcm`` (int16, 8 kHz)."""
    encode = mulaw_encode if payload_type == 0 else alaw_encode
    return [build_rtp(payload_type, seq0 + i, ts0 + i * FRAME, ssrc,
                      encode(pcm[i * FRAME : (i + 1) * FRAME]).tobytes())
            for i in range(len(pcm) // FRAME)]


def write_rtp_pcap(path: Any, streams: list[list[bytes]], dst_ports: list[int],
                   src: str = "127.0.0.1", dst: str = "127.0.0.1") -> None:
    """A libpcap file (Ethernet/IPv4/UDP) of RTP ``streams``, packet i of every stream at
    i * 20 ms, stream k to ``dst_ports[k]``: what ``sipp``'s ``play_pcap_audio`` replays, to
    the m-line port of the answer plus each packet's port offset from the lowest one."""
    def checksum(header: bytes) -> int:
        total = sum(struct.unpack(f"!{len(header) // 2}H", header))
        total = (total >> 16) + (total & 0xFFFF)
        return ~(total + (total >> 16)) & 0xFFFF

    src_ip, dst_ip = (bytes(int(x) for x in a.split(".")) for a in (src, dst))
    out = [struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1)]
    for i in range(max(len(s) for s in streams)):
        for stream, port in zip(streams, dst_ports, strict=True):
            if i >= len(stream):
                continue
            udp = struct.pack("!HHHH", 20000 + (port - dst_ports[0]), port,
                              8 + len(stream[i]), 0) + stream[i]
            ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), i & 0xFFFF, 0x4000, 64,
                             17, 0, src_ip, dst_ip)
            ip = ip[:10] + struct.pack("!H", checksum(ip)) + ip[12:]
            frame = b"\x00" * 12 + b"\x08\x00" + ip + udp
            usec = i * 20000
            out.append(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000,
                                   len(frame), len(frame)) + frame)
    with open(path, "wb") as f:
        f.write(b"".join(out))


async def send_rtp(port: int, packets: list[bytes], paced: bool = True,
                   host: str = "127.0.0.1") -> None:
    """RTP to ``port``, one packet per 20 ms on an absolute schedule (or all at once)."""
    loop = asyncio.get_running_loop()
    transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol,
                                                       remote_addr=(host, port))
    try:
        t0 = time.monotonic()
        for i, packet in enumerate(packets):
            if paced and (delay := t0 + i * 0.02 - time.monotonic()) > 0:
                await asyncio.sleep(delay)
            transport.sendto(packet)
    finally:
        transport.close()


# --- SIPp (Debian's sip-tester) as the SRC --------------------------------------------------

SIPP_SCENARIOS = Path(__file__).resolve().parents[1] / "tests" / "sipp"
_LAUGHS = "".join(f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(2, 10))
SIPP_HOSTILE_KEYS = {  # siprec_hostile.xml's DTDs ("[" cannot be written in a scenario)
    "dtd_billion_laughs": f'<!DOCTYPE lolz [<!ENTITY lol1 "lol">{_LAUGHS}]>',
    "dtd_external_entity": '<!DOCTYPE recording [<!ENTITY x SYSTEM "file:///etc/passwd">]>',
}


@dataclass
class SippRun:
    """One finished ``sipp`` run: its exit status (0: every call passed its scenario), the
    Call-ID it used, and its message log (every SIP message sent and received)."""

    returncode: int
    call_id: str
    messages: str
    output: str

    def responses(self, status: int, method: str = "INVITE") -> list[str]:
        """The received responses with ``status`` to ``method``, whole (headers and body)."""
        return [m for m in self._received() if m.startswith(f"SIP/2.0 {status} ")
                and re.search(rf"^CSeq:\s*\d+ {method}\s*$", m, re.M | re.I)]

    def _received(self) -> list[str]:
        blocks = re.split(r"^-{20,}.*$", self.messages, flags=re.M)
        out = []
        for block in blocks:
            head, sep, message = block.partition("message received")
            if sep:
                out.append(message.split("\n", 2)[-1].lstrip("\r\n"))
        return out


def siprec_rtp_range(ports: int = 400) -> tuple[int, int]:
    """A block of UDP ports for SIPREC's RTP starting at a free one (the SRS skips any
    taken in it): 400 is 100 recordings of two streams, RTP and RTCP each."""
    base = free_even_port(4)
    base = min(base, 65534 - ports) & ~1
    return base, base + ports - 1


async def siprec_call(port: int, legs: Legs, call_id: str | None = None) -> str:
    """An SRC's whole recording over UDP, as the bench drives many at once: INVITE (RFC
    7865 metadata, the caller's stream first), ACK, both streams' PCMU at real-time pacing
    to the answered ports, BYE. Returns the BYE's 200 status line; any other answer raises
    (the bench counts it as a failed call)."""
    peer = await SipPeer.open(("127.0.0.1", port))
    call_id = call_id or f"{uuid.uuid4()}@127.0.0.1"
    target = f"sip:srs@127.0.0.1:{port}"
    parties = [("caller-pid", "sip:+15550100@198.51.100.7", "s1", "1"),
               ("agent-pid", "sip:4711@203.0.113.20", "s2", "2")]
    body = siprec_body(siprec_sdp("127.0.0.1", [7000, 7002], ["1", "2"]),
                       siprec_metadata("Ks0Fb3oBEfCmugAMKfnCqw==", parties))
    try:
        peer.send(sip_request("INVITE", target, call_id, 1, body, local=peer.local))
        ok = (await peer.status(30)).decode()
        if not ok.startswith("SIP/2.0 200 "):
            raise RuntimeError(f"INVITE answered {ok.splitlines()[0]!r}")
        tag = re.search(r"^To:.*;tag=([^;\s]+)", ok, re.M)
        ports = [int(p) for p in re.findall(r"^m=audio (\d+) ", ok, re.M)]
        to_tag = tag.group(1) if tag else ""
        peer.send(sip_request("ACK", target, call_id, 1, local=peer.local, to_tag=to_tag))
        ssrc = int.from_bytes(uuid.uuid4().bytes[:4], "big")
        await asyncio.gather(send_rtp(ports[0], rtp_packets(legs.caller, ssrc)),
                             send_rtp(ports[1], rtp_packets(legs.agent, ssrc ^ 1)))
        peer.send(sip_request("BYE", target, call_id, 2, local=peer.local, to_tag=to_tag))
        while True:  # (a retransmitted 200 of the INVITE may come first)
            reply = (await peer.status(30)).decode()
            if re.search(r"^CSeq:\s*2 BYE", reply, re.M):
                if not reply.startswith("SIP/2.0 200 "):
                    raise RuntimeError(f"BYE answered {reply.splitlines()[0]!r}")
                return reply.splitlines()[0]
    finally:
        peer.close()


def sipp_binary() -> str | None:
    return shutil.which("sipp")


def free_even_port(span: int = 4) -> int:
    """An even port with ``span`` UDP ports from it free on 127.0.0.1 now."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            base = probe.getsockname()[1] & ~1
        if base + span > 65535:
            continue
        socks = []
        try:
            for port in range(base, base + span):
                s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free UDP port block")


async def run_sipp(scenario: str, target: tuple[str, int], workdir: Path, *,
                   local_ip: str = "127.0.0.1", transport: str = "u1",
                   variables: dict[str, str] | None = None,
                   keys: dict[str, str] | None = None, limit_seconds: int = 60) -> SippRun:
    """``sipp`` running ``tests/sipp/<scenario>.xml`` once against ``target`` from
    ``local_ip`` (bound: the source address the SRS sees), in ``workdir`` (where the
    scenario finds its pcap and SIPp writes its logs). ``variables``: ``-set`` globals,
    ``keys``: ``-key`` keywords;
    ``limit_seconds``: SIPp's own ``-timeout`` (a scenario stuck waiting fails)."""
    binary = sipp_binary()
    assert binary is not None, "sipp is not installed (Debian package sip-tester)"
    workdir.mkdir(parents=True, exist_ok=True)
    prefix = f"{scenario}-{uuid.uuid4().hex[:12]}"
    messages = workdir / f"{scenario}.messages.log"
    args = [binary, f"{target[0]}:{target[1]}", "-sf", str(SIPP_SCENARIOS / f"{scenario}.xml"),
            "-m", "1", "-nostdin", "-i", local_ip, "-bind_local", "-p", str(free_even_port(1)),
            "-mi", local_ip,
            "-mp", str(free_even_port()), "-t", transport, "-cid_str", f"{prefix}-%u@%s",
            "-trace_msg", "-message_file", str(messages), "-trace_err",
            "-error_file", str(workdir / f"{scenario}.errors.log"),
            "-timeout", f"{limit_seconds}s", "-timeout_error"]
    for name, value in (variables or {}).items():
        args += ["-set", name, value]
    for name, value in (keys or {}).items():
        args += ["-key", name, value]
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=workdir, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), limit_seconds + 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    errors = workdir / f"{scenario}.errors.log"
    text = output.decode("utf-8", "replace")[-3000:]
    if errors.exists():
        text += "\n--- errors.log ---\n" + errors.read_text("utf-8", "replace")[-3000:]
    assert proc.returncode is not None
    return SippRun(proc.returncode, f"{prefix}-1@{local_ip}",
                   messages.read_text("utf-8", "replace") if messages.exists() else "", text)
