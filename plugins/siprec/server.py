"""The SIPREC session recording server (SRS): SIP over UDP and TCP on one port (and over TLS
on another, when configured), RTP per recorded stream, each recording streamed to the
detector like any other plugin's call.

The sans-IO parts say what messages and bodies mean (:mod:`.sip`, :mod:`.sdp`,
:mod:`.metadata`, :mod:`.offer`, :mod:`.rtp`, :mod:`.media`); this module is the I/O and the
dialog state of each recording session (RFC 7866: the SRC, an SBC or PBX, calls us; we only
receive):

- INVITE: checked at once (source, limits, SIPREC, body), 100 Trying, then answered 200 OK
  once the detector is reachable (else 503, so the SRC can fail over to another SRS), with
  one ``recvonly`` m-line per recorded stream on consecutive even ports; on UDP the 200 is
  retransmitted until the ACK (RFC 3261 13.3.1.4). A CANCEL before that answer gets 487.
- re-INVITE: ``inactive`` pauses (silence takes the paused time, so call time stays wall
  time), ``sendonly`` resumes, new metadata updates the participants; 491 while another
  INVITE of the dialog is pending.
- BYE (or RTP silent for ``rtp_timeout_seconds``, then we send the BYE): the recording's
  summary goes to the webhook, as at any call's end.

Every failure of one session ends that session only; a message we cannot take gets its
response (400, 403, 415, 421, 481, 488, 491, 503, 513) and a log line, never an exception out
of the socket's handler.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import socket
import ssl
import time
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import structlog

from callshield.v1 import detection_pb2 as pb
from plugins import metrics
from plugins.addresses import Network, allowed, parse_hostport
from plugins.bridge import CallBridge, DetectorGone, DetectorLink
from plugins.protocols.events import AudioFormat
from plugins.siprec.media import Lanes
from plugins.siprec.offer import ACCEPT, Offer, read_offer
from plugins.siprec.rtp import JitterBuffer, parse_rtp
from plugins.siprec.sdp import AnswerLine, answer, session_id
from plugins.siprec.sip import (
    MAX_MESSAGE_BYTES,
    SipError,
    SipMessage,
    StreamFramer,
    answerable,
    new_branch,
    new_tag,
    parse_message,
    response,
    uri_of,
)

PLUGIN = "siprec"
ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS"
SUPPORTED = frozenset({"siprec"})  # Require: anything else is answered 420
MAX_TCP_CONNECTIONS = 256  # SIP over TCP: SRCs keep a few long-lived connections
TLS_HANDSHAKE_SECONDS = 10.0
T1, T2 = 0.5, 4.0  # RFC 3261 timers
FILL_STEP_SECONDS = 0.2
log = structlog.get_logger("callshield.plugins.siprec")
Reply = Callable[[bytes], None]


def parse_port_range(value: str) -> tuple[int, int]:
    """``"40000-40999"`` -> (40000, 40999); RTP uses the even ports, RTCP the odd ones."""
    low, sep, high = value.partition("-")
    first, last = int(low), int(high if sep else low)
    if not 1024 <= first <= last <= 65535 or last - first < 1:
        raise ValueError(f"RTP port range {value!r}: two or more ports within 1024-65535")
    return first, last


@dataclass(frozen=True)
class SiprecSettings:
    listen: str = ""  # "host:port": SIP on UDP and TCP
    rtp_ports: tuple[int, int] = (40000, 40999)
    allow: tuple[Network, ...] = ()  # empty: any source that reaches the listener
    log_call_ids: str = "hashed"  # "plain": Call-IDs and AORs in the logs
    max_streams: int = 2  # recorded per session (the caller's and one other)
    max_sessions: int = 200
    max_sessions_per_source: int = 50
    rtp_timeout_seconds: float = 30.0
    answer_wait_seconds: float = 5.0  # for the detector, before refusing with 503
    tls_listen: str = ""  # "host:port": SIP over TLS as well (RFC 3261 26.2; off when "")
    tls_cert: str = ""  # PEM certificate chain the SRCs verify
    tls_key: str = ""  # its PEM private key

    def __post_init__(self) -> None:
        if self.tls_listen and not (self.tls_cert and self.tls_key):
            raise ValueError("SIP over TLS needs a certificate and its key (PEM files): "
                             "--siprec-tls-cert and --siprec-tls-key")


def tls_context(cert: str, key: str) -> ssl.SSLContext:
    """The server side of SIP over TLS: TLS 1.2 or later, the system's default ciphers.
    SRCs authenticate us by the certificate; we authenticate them by source address
    (``--siprec-allow``), as with UDP and TCP, not by client certificates."""
    if not cert or not key:
        raise ValueError("SIP over TLS needs a certificate and its key (PEM files)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(cert, key)
    return context


def local_address(listen_host: str, peer: str) -> str:
    """The address to put in our SDP and Contact: the listener's, or (listening on any) the
    one the kernel routes to the peer from."""
    if listen_host not in ("0.0.0.0", "::", ""):
        return listen_host
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


class _RtpEndpoint(asyncio.DatagramProtocol):
    def __init__(self, on_packet: Callable[[bytes, tuple[str, int]], None]) -> None:
        self.on_packet = on_packet

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_packet(data, addr)


class _Ignore(asyncio.DatagramProtocol):
    """RTCP: the SRC's reports are accepted and not read."""


@dataclass
class Stream:
    """One recorded m-line: its sockets and its jitter buffer."""

    lane: int
    port: int
    buffer: JitterBuffer
    transports: list[asyncio.DatagramTransport] = field(default_factory=list)


class PortPool:
    """Consecutive even ports out of the configured range, bound before they are offered."""

    def __init__(self, host: str, first: int, last: int) -> None:
        self.host = host
        self.first = first + (first % 2)
        self.last = last
        self._next = self.first
        self.used: set[int] = set()

    async def bind(self, count: int, handlers: list[Callable[[bytes, tuple[str, int]], None]]
                   ) -> list[tuple[int, list[asyncio.DatagramTransport]]] | None:
        """``count`` RTP/RTCP pairs on consecutive even ports; None when none are free."""
        loop = asyncio.get_running_loop()
        span = 2 * count
        size = self.last - self.first + 1
        for _ in range(max(size // 2, 1)):
            base = self._next
            self._next = base + 2 if base + 2 + span - 1 <= self.last else self.first
            wanted = range(base, base + span)
            if base + span - 1 > self.last or any(p in self.used for p in wanted):
                continue
            # reserved before the first await: concurrent INVITEs must not pick the same
            # ports and knock each other's binds out in turn
            self.used.update(wanted)
            bound: list[tuple[int, list[asyncio.DatagramTransport]]] = []
            try:
                for i in range(count):
                    port = base + 2 * i
                    rtp, _ = await loop.create_datagram_endpoint(
                        lambda h=handlers[i]: _RtpEndpoint(h), local_addr=(self.host, port))
                    pair = [rtp]
                    bound.append((port, pair))
                    rtcp, _ = await loop.create_datagram_endpoint(
                        _Ignore, local_addr=(self.host, port + 1))
                    pair.append(rtcp)
            except BaseException as exc:
                for _port, pair in bound:
                    for t in pair:
                        t.close()
                self.used.difference_update(wanted)
                if isinstance(exc, OSError):
                    continue  # a port of the span is another process's: try the next
                raise
            return bound
        return None

    def release(self, ports: list[int]) -> None:
        for port in ports:
            self.used.difference_update((port, port + 1))


class RecordingSession:
    """One SIPREC dialog: its INVITE transaction, media and detection stream."""

    def __init__(self, srs: SiprecServer, invite: SipMessage, source: tuple[str, int],
                 reply: Reply, transport: str, offer: Offer, log_id: str) -> None:
        self.srs = srs
        self.invite = invite
        self.call_id = invite.call_id
        self.from_tag = invite.from_tag()  # with the Call-ID: which requests are this dialog's
        self.source = source
        self.reply = reply
        self.transport = transport
        self.offer = offer
        self.tag = new_tag()
        self.log = log.bind(session=log_id)
        self.log_id = log_id
        self.state = "proceeding"  # -> answered -> confirmed -> ended
        self.pending: SipMessage | None = invite  # the INVITE awaiting its ACK
        self.last_response: bytes = b""
        self.streams: list[Stream] = []
        self.lanes = Lanes(1)
        self.bridge: CallBridge | None = None
        self.paused = False
        self.started_at: float | None = None  # the first RTP packet
        self.last_rtp = time.monotonic()
        self.sdp_version = 1
        self.sdp_session = session_id()
        self.local = local_address(srs.host, source[0])
        self.cseq = 0
        self.extra: dict[str, str] = {}
        self.dropped_source = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.ended = asyncio.Event()

    # --- signalling ---------------------------------------------------------------------

    def send(self, message: SipMessage) -> None:
        data = message.encode()
        if message.status >= 200 and message.cseq[1] == "INVITE":
            self.last_response = data
        with suppress(OSError, RuntimeError):
            self.reply(data)

    def respond(self, request: SipMessage, status: int, *, reason: str = "",
                headers: list[tuple[str, str]] | None = None, body: bytes = b"") -> None:
        self.send(response(request, status, to_tag=self.tag, reason=reason,
                           headers=headers, body=body))

    def contact(self) -> str:
        host = f"[{self.local}]" if ":" in self.local else self.local
        return f"<sip:srs@{host}:{self.srs.port_for(self.transport)};transport={self.transport}>"

    def spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def answer_invite(self) -> None:
        """The initial INVITE, after its 100: wait for the detector, bind, answer."""
        ready = await self.srs.detector.client.wait_ready(self.srs.settings.answer_wait_seconds)
        if self.state != "proceeding":
            return  # cancelled meanwhile
        if not ready:
            self.log.error("INVITE refused: detector unreachable", status=503)
            self.refuse(503, "detector unavailable", [("Retry-After", "30")])
            return
        # ports in m-line order (the first m-line the lowest): an SRC that sends each stream
        # to the first port plus its offset, as SIPp's pcap playback does, reaches them all
        ordered = sorted(self.offer.recorded, key=lambda r: r.index)
        handlers = [self._rtp_handler(i) for i in range(len(ordered))]
        bound = await self.srs.ports.bind(len(ordered), handlers)
        if self.state != "proceeding":
            if bound:
                self._close_media(bound)
            return
        if bound is None:
            self.log.error("INVITE refused: no RTP ports free in --siprec-rtp-ports", status=503)
            self.refuse(503, "no RTP ports free", [("Retry-After", "10")])
            return
        for r, (port, transports) in zip(ordered, bound, strict=True):
            buffer = JitterBuffer(r.payload, r.codec, r.media.telephone_event())
            self.streams.append(Stream(r.lane, port, buffer, transports))
        self.lanes = Lanes(len(self.offer.lanes))
        self._set_extra(self.offer)
        fmt = AudioFormat(pb.AUDIO_ENCODING_LINEAR16, 8000, self.offer.lanes,
                          mixed=self.offer.mixed)
        self.bridge = self.srs.detector.open_call(PLUGIN, self.log_id, fmt, deliver=None,
                                                  on_failure=self._detector_failed,
                                                  extra=self.extra)
        self.state = "answered"
        self.send(self._ok(self.invite, self.offer))
        self.log.info("recording answered", streams=len(self.streams),
                      lanes=list(self.offer.lanes), refused_mlines=len(self.offer.refused),
                      codecs=[r.codec for r in ordered],
                      metadata=self.offer.metadata.dialect if self.offer.metadata else "none",
                      transport=self.transport,
                      **self.srs.private(caller=self.offer.aor(0),
                                         agent=self.offer.aor(1) if not self.offer.mixed else ""))
        self.last_rtp = time.monotonic()
        self.spawn(self._watch())
        if self.transport == "udp":
            self.spawn(self._retransmit(self.invite))

    def refuse(self, status: int, reason: str,
               headers: list[tuple[str, str]] | None = None) -> None:
        self.state = "ended"
        self.respond(self.invite, status, headers=[
            ("Warning", f'399 callshield "{reason}"'), *(headers or [])])
        self.srs.forget(self)
        self.ended.set()

    def _ok(self, request: SipMessage, offer: Offer) -> SipMessage:
        lines = []
        by_index = {r.index: r for r in offer.recorded}
        ports = {s.lane: s.port for s in self.streams}
        for i, m in enumerate(offer.sdp.media):
            r = by_index.get(i)
            if r is None or r.lane not in ports:
                lines.append(AnswerLine(m.kind, m.proto, 0, int(m.formats[0])
                                        if m.formats and m.formats[0].isdigit() else 0))
                continue
            direction = "inactive" if m.direction == "inactive" else "recvonly"
            lines.append(AnswerLine(m.kind, m.proto, ports[r.lane], r.payload, r.codec,
                                    direction, m.label))
        body = answer(lines, self.local, self.sdp_session, self.sdp_version)
        self.sdp_version += 1
        return response(request, 200, to_tag=self.tag, body=body, headers=[
            ("Contact", self.contact()), ("Allow", ALLOW), ("Supported", "siprec"),
            ("Content-Type", "application/sdp")])

    async def _retransmit(self, invite: SipMessage) -> None:
        """UDP: the 200 again at T1, 2T1, ... (capped at T2) until the ACK, for 64*T1."""
        interval, waited = T1, 0.0
        while self.pending is invite and waited < 64 * T1:
            await asyncio.sleep(interval)
            waited += interval
            if self.pending is invite:
                with suppress(OSError, RuntimeError):
                    self.reply(self.last_response)
            interval = min(2 * interval, T2)
        if self.pending is invite and self.state != "ended":
            self.log.warning("no ACK for the 200 OK: ending the recording")
            await self.end("no ACK", bye=True)

    def on_ack(self, request: SipMessage) -> None:
        if self.pending is not None and request.cseq[0] == self.pending.cseq[0]:
            self.pending = None
            if self.state == "answered":
                self.state = "confirmed"

    def on_cancel(self, request: SipMessage) -> None:
        self.respond(request, 200)  # to the CANCEL itself
        if self.state != "proceeding":
            return  # answered already: the CANCEL has no effect; the BYE will come
        self.log.info("recording cancelled before answer")
        self.refuse(487, "cancelled")

    def on_reinvite(self, request: SipMessage) -> None:
        if self.pending is not None:
            self.log.info("re-INVITE while another INVITE is pending", status=491)
            self.respond(request, 491)
            return
        if request.cseq[0] <= self.invite.cseq[0]:
            if self.last_response:  # a retransmission
                with suppress(OSError, RuntimeError):
                    self.reply(self.last_response)
            return
        try:
            offer = read_offer(request, self.srs.settings.max_streams)
        except SipError as exc:
            self.log.warning("re-INVITE refused", status=exc.status, reason=str(exc))
            self.respond(request, exc.status, headers=[("Warning", f'399 callshield "{exc}"')])
            return
        self.invite, self.pending = request, request
        if offer.metadata is not None:
            self._set_extra(offer)
        # the streams keep their lanes and ports: match them up by lane
        offer.recorded = [r for r in offer.recorded if r.lane < len(self.streams)]
        paused = all(r.media.direction == "inactive" for r in offer.recorded)
        self.offer = offer
        self.send(self._ok(request, offer))
        if paused and not self.paused:
            self._pause()
        elif not paused and self.paused:
            self._resume()
        if self.transport == "udp":
            self.spawn(self._retransmit(request))
        else:
            self.pending = None if self.transport != "udp" else self.pending

    def _set_extra(self, offer: Offer) -> None:
        md = offer.metadata
        self.extra["sip_call_id"] = self.call_id
        if md is not None:
            self.extra["recording_session_id"] = md.session_id
            if offer.mixed:  # one stream for everyone (BroadWorks records this way)
                caller = md.caller()
                ordered = sorted(md.participants, key=lambda p: p is not caller)
                self.extra["participants"] = ",".join(p.aor for p in ordered if p.aor)
                self.extra["caller_aor"] = caller.aor if caller is not None else ""
            else:
                self.extra["caller_aor"] = offer.aor(0)
                self.extra["agent_aor"] = offer.aor(1)

    async def on_bye(self, request: SipMessage) -> None:
        self.respond(request, 200)
        self.log.info("BYE: recording ended by the SRC")
        await self.end("bye")

    def send_bye(self) -> None:
        self.cseq += 1
        invite = self.invite
        host = f"[{self.local}]" if ":" in self.local else self.local
        to = invite.get("To")
        if ";tag=" not in to:
            to = f"{to};tag={self.tag}"
        remote = invite.get("Contact")
        target = uri_of(remote) if remote else uri_of(invite.get("From"))
        bye = SipMessage(method="BYE", uri=target, headers=[
            ("Via", f"SIP/2.0/{self.transport.upper()} {host}:"
                    f"{self.srs.port_for(self.transport)};branch="
                    f"{new_branch()};rport"),
            ("Max-Forwards", "70"), ("From", to), ("To", invite.get("From")),
            ("Call-ID", self.call_id), ("CSeq", f"{self.cseq} BYE")])
        with suppress(OSError, RuntimeError):
            self.reply(bye.encode())

    # --- media ---------------------------------------------------------------------------

    def _rtp_handler(self, index: int) -> Callable[[bytes, tuple[str, int]], None]:
        def on_packet(data: bytes, addr: tuple[str, int]) -> None:
            self.on_rtp(index, data, addr)
        return on_packet

    def on_rtp(self, index: int, data: bytes, addr: tuple[str, int]) -> None:
        arrived = time.perf_counter()  # the added latency is counted from here
        if self.state == "ended" or index >= len(self.streams):
            return
        if not allowed(self.srs.settings.allow, addr[0]):
            self.dropped_source += 1
            metrics.RTP_DROPPED.labels(PLUGIN, "source").inc()
            return
        packet = parse_rtp(data)
        if packet is None:
            metrics.RTP_DROPPED.labels(PLUGIN, "malformed").inc()
            return
        stream = self.streams[index]
        before = stream.buffer.stats.foreign_ssrc
        pcm = stream.buffer.push(packet)
        if stream.buffer.stats.foreign_ssrc != before:
            metrics.RTP_DROPPED.labels(PLUGIN, "foreign_ssrc").inc()
            return
        now = time.monotonic()
        self.last_rtp = now
        if self.paused or self.bridge is None:
            return
        if self.started_at is None:
            self.started_at = now
        self.lanes.add(stream.lane, pcm, now - self.started_at)
        self._feed(self.lanes.take(), arrived)

    def _feed(self, audio: bytes, arrived: float | None = None) -> None:
        """``arrived``: when the RTP packet that released this audio came off the socket,
        so the added latency per packet counts decoding, lanes and the hand-off to gRPC
        (earlier packets that waited for it in the jitter buffer waited for the network,
        not for us)."""
        if not audio or self.bridge is None:
            return
        try:
            self.bridge.feed(audio, arrived)
        except DetectorGone:
            pass  # on_failure ends the session

    def _flush_media(self) -> None:
        for stream in self.streams:
            if self.started_at is None and any(stream.buffer._held.values()):
                self.started_at = time.monotonic()
            self.lanes.add(stream.lane, stream.buffer.flush(),
                           time.monotonic() - (self.started_at or time.monotonic()))
        self._feed(self.lanes.take(final=True))

    def _pause(self) -> None:
        self.paused = True
        self._flush_media()
        self.log.info("recording paused")
        self.spawn(self._fill())

    def _resume(self) -> None:
        self.paused = False
        for stream in self.streams:
            stream.buffer.relock()
        self.last_rtp = time.monotonic()
        self.log.info("recording resumed")

    async def _fill(self) -> None:
        """Silence for the paused time, in real time (call time stays wall time)."""
        lanes = len(self.offer.lanes) if self.bridge is None else self.bridge.format.channels
        start, filled = time.monotonic(), 0
        while self.paused and self.state != "ended":
            await asyncio.sleep(FILL_STEP_SECONDS)
            due = int((time.monotonic() - start) * 8000) - filled
            self._feed(np.zeros(due * lanes, np.int16).tobytes())
            filled += due

    async def _watch(self) -> None:
        timeout = self.srs.settings.rtp_timeout_seconds
        while self.state != "ended":
            await asyncio.sleep(min(1.0, timeout / 4))
            if not self.paused and time.monotonic() - self.last_rtp > timeout:
                self.log.warning("no RTP: ending the recording", seconds=timeout)
                await self.end("rtp timeout", bye=True)
                return

    async def _detector_failed(self, reason: str) -> None:
        """The detection stream failed: end the recording (the call itself goes on)."""
        if self.state != "ended":
            self.log.error("recording ended: detector failed", reason=reason)
            await self.end("detector", bye=True, finish=False)

    # --- the end -------------------------------------------------------------------------

    async def end(self, why: str, *, bye: bool = False, finish: bool = True) -> None:
        if self.state == "ended":
            return
        self.state = "ended"
        self.pending = None
        if bye:
            self.send_bye()
        if finish and not self.paused:
            self._flush_media()
        self._close_media([(s.port, s.transports) for s in self.streams])
        self.srs.forget(self)
        stats = [s.buffer.stats for s in self.streams]
        lost = sum(s.lost_samples for s in stats)
        if lost:
            metrics.RTP_LOST_SECONDS.labels(PLUGIN).inc(lost / 8000)
        self.log.info("recording closed", why=why,
                      packets=sum(s.packets for s in stats),
                      foreign_ssrc=sum(s.foreign_ssrc for s in stats),
                      lost_ms=lost // 8, late=sum(s.late for s in stats),
                      gap_ms=sum(s.gap_samples for s in stats) // 8,
                      dtmf=sum(s.events for s in stats), padded_ms=self.lanes.padded // 8,
                      other_payload=sum(s.other_payload for s in stats),
                      wrong_source=self.dropped_source)
        try:
            if self.bridge is not None:
                if finish:
                    await self.bridge.finish()
                else:
                    await self.bridge.abort(why)
        finally:
            self.ended.set()
            for task in list(self.tasks):
                if task is not asyncio.current_task():
                    task.cancel()

    def _close_media(self, bound: list[tuple[int, list[asyncio.DatagramTransport]]]) -> None:
        for _port, transports in bound:
            for t in transports:
                t.close()
        self.srs.ports.release([port for port, _ in bound])


class _SipUdp(asyncio.DatagramProtocol):
    def __init__(self, srs: SiprecServer) -> None:
        self.srs = srs
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a datagram endpoint's transport (CPython's is not a DatagramTransport subclass)
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        transport = self.transport
        assert transport is not None

        def reply(message: bytes) -> None:
            transport.sendto(message, addr)
        self.srs.receive(data, (addr[0], addr[1]), reply, "udp")


class _TlsAccept(asyncio.Protocol):
    """A connection to the TLS port: admitted by source first (no handshake for a stranger),
    then the handshake, then SIP as over TCP. Reading is paused until the handshake takes
    the connection over, so the ClientHello reaches TLS rather than a stream buffer; a
    failed handshake (an SRC that does not trust our certificate, plain SIP sent to this
    port, a client that stalls) is logged, which asyncio's own TLS server does not do."""

    def __init__(self, srs: SiprecServer, context: ssl.SSLContext) -> None:
        self.srs = srs
        self.context = context

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        tcp = cast(asyncio.Transport, transport)
        tcp.pause_reading()
        peer = tcp.get_extra_info("peername") or ("?", 0)
        if not self.srs.admit(str(peer[0]), "tls"):
            tcp.close()
            return
        self.srs._spawn(self._upgrade(tcp, str(peer[0])))

    async def _upgrade(self, tcp: asyncio.Transport, source: str) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 * MAX_MESSAGE_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        self.srs.handshakes += 1
        try:
            secure = await loop.start_tls(tcp, protocol, self.context, server_side=True,
                                          ssl_handshake_timeout=TLS_HANDSHAKE_SECONDS)
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "tls").inc()
            log.warning("SIP over TLS handshake failed", transport="tls", source=source,
                        reason=(str(exc) or type(exc).__name__)[:160])
            tcp.close()
            return
        finally:
            self.srs.handshakes -= 1
        if secure is None:  # the peer closed during the handshake
            tcp.close()
            return
        protocol.connection_made(secure)
        writer = asyncio.StreamWriter(secure, protocol, reader, loop)
        await self.srs._handle_tcp(reader, writer, "tls")


class SiprecServer:
    """The SRS: one UDP endpoint and one TCP listener on the same port, and optionally a
    TLS listener on another (``tls_listen``)."""

    def __init__(self, detector: DetectorLink, settings: SiprecSettings) -> None:
        self.detector = detector
        self.settings = settings
        self.host = "127.0.0.1"
        self.port = 0
        self.tls_port = 0
        self.ports = PortPool(self.host, *settings.rtp_ports)
        self.sessions: dict[str, RecordingSession] = {}
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tls: asyncio.Server | None = None
        self._connections: set[asyncio.StreamWriter] = set()
        self.handshakes = 0  # TLS handshakes in progress: they count against the limit too
        self._tasks: set[asyncio.Task[None]] = set()

    # --- privacy ---------------------------------------------------------------------------

    def log_id(self, call_id: str) -> str:
        """What logs and the detection stream call this recording: the Call-ID (``plain``)
        or a digest of it (the default: Call-IDs often carry numbers or addresses)."""
        if self.settings.log_call_ids == "plain":
            return call_id
        return "sip-" + hashlib.sha256(call_id.encode()).hexdigest()[:16]

    def private(self, **fields: str) -> dict[str, str]:
        """AORs for a log line: only with ``--log-call-ids plain``."""
        if self.settings.log_call_ids != "plain":
            return {}
        return {f"{k}_aor": v for k, v in fields.items() if v}

    # --- sockets ---------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        s = self.settings
        # read before binding anything: a bad certificate is the operator's error, at once
        context = tls_context(s.tls_cert, s.tls_key) if s.tls_listen else None
        self.host = host
        self.ports.host = host
        # Port 0: the system picks a free UDP port, and TCP needs the same number, which a
        # TCP socket may hold already; pick again rather than fail (a fixed port fails at once).
        for attempt in range(20):
            self._udp, _ = await loop.create_datagram_endpoint(
                lambda: _SipUdp(self), local_addr=(host, port))
            self.port = int(self._udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(self._handle_tcp, host, self.port)
            except OSError as exc:
                self._udp.close()
                if port != 0 or exc.errno != errno.EADDRINUSE or attempt == 19:
                    raise
                continue
            if context is not None:
                await self._start_tls(context)
            return self.port
        raise AssertionError("unreachable")

    async def _start_tls(self, context: ssl.SSLContext) -> None:
        host, port = parse_hostport(self.settings.tls_listen)
        loop = asyncio.get_running_loop()
        try:  # the handshake is ours (after the allowlist), so that its failure is logged
            self._tls = await loop.create_server(lambda: _TlsAccept(self, context), host, port)
        except BaseException:
            self._close_listeners()
            raise
        self.tls_port = int(self._tls.sockets[0].getsockname()[1])
        log.info("SIP over TLS listening", host=host, port=self.tls_port)

    def _close_listeners(self) -> None:
        for server in (self._tcp, self._tls):
            if server is not None:
                server.close()
        if self._udp is not None:
            self._udp.close()

    def port_for(self, transport: str) -> int:
        """Our port on ``transport``, for a Contact or Via of ours."""
        return self.tls_port if transport == "tls" else self.port

    async def stop(self) -> None:
        """Stop listening; end every recording (BYE to the SRC, summary to the webhook)."""
        for listener in (self._tcp, self._tls):
            if listener is not None:
                listener.close()
        for session in list(self.sessions.values()):
            if session.state == "proceeding":  # not answered yet: the SRC tries another SRS
                session.refuse(503, "shutting down", [("Retry-After", "30")])
        await asyncio.gather(*(s.end("shutdown", bye=True)
                               for s in list(self.sessions.values())),
                             return_exceptions=True)
        for task in list(self._tasks):  # answers still waiting for the detector
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._udp is not None:
            self._udp.close()
        for writer in list(self._connections):
            writer.close()
        for listener in (self._tcp, self._tls):
            if listener is not None:
                with suppress(Exception):
                    await asyncio.wait_for(listener.wait_closed(), 2)

    def admit(self, source: str, transport: str) -> bool:
        """Whether a new SIP connection from ``source`` is taken (allowlist, limit)."""
        if not allowed(self.settings.allow, source):
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "source").inc()
            log.warning("SIP refused: source not in --siprec-allow", transport=transport,
                        source=source)
            return False
        if len(self._connections) + self.handshakes >= MAX_TCP_CONNECTIONS:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "connections").inc()
            log.warning("SIP over TCP refused: too many connections", transport=transport,
                        limit=MAX_TCP_CONNECTIONS)
            return False
        return True

    async def _handle_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          transport: str = "tcp") -> None:
        """One SIP connection over TCP or (``transport`` "tls", admitted and handshaken by
        :class:`_TlsAccept`) TLS, framed alike."""
        peer = writer.get_extra_info("peername") or ("?", 0)
        source = (str(peer[0]), int(peer[1]))
        if transport == "tcp" and not self.admit(source[0], transport):
            writer.close()
            return
        framer = StreamFramer(MAX_MESSAGE_BYTES)
        self._connections.add(writer)

        def reply(message: bytes) -> None:
            if not writer.is_closing():
                writer.write(message)
        try:
            while data := await reader.read(65536):
                try:
                    frames = framer.feed(data)
                except SipError as exc:
                    metrics.PROTOCOL_ERRORS.labels(PLUGIN, "malformed").inc()
                    log.warning("SIP stream unreadable: connection closed", status=exc.status,
                                reason=str(exc), transport=transport)
                    break
                for frame in frames:
                    self.receive(frame, source, reply, transport)
        except (ConnectionError, ssl.SSLError):
            pass
        finally:
            self._connections.discard(writer)
            writer.close()

    # --- messages --------------------------------------------------------------------------

    def receive(self, data: bytes, source: tuple[str, int], reply: Reply,
                transport: str) -> None:
        """One message off either transport; never raises."""
        try:
            self._receive(data, source, reply, transport)
        except Exception:
            log.exception("internal error handling a SIP message", transport=transport)

    def _receive(self, data: bytes, source: tuple[str, int], reply: Reply,
                 transport: str) -> None:
        if not data.strip():
            return  # keep-alive
        if not allowed(self.settings.allow, source[0]):
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "source").inc()
            log.warning("SIP refused: source not in --siprec-allow", transport=transport,
                        source=source[0])
            with suppress(SipError):
                message = parse_message(data)
                if answerable(message):
                    reply(response(message, 403, to_tag=new_tag()).encode())
            return
        try:
            message = parse_message(data)
        except SipError as exc:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, "malformed").inc()
            log.warning("malformed SIP message", status=exc.status, reason=str(exc),
                        transport=transport, answered=answerable(exc.message))
            if exc.message is not None and answerable(exc.message):
                reply(response(exc.message, exc.status, to_tag=new_tag(), headers=[
                    ("Warning", f'399 callshield "{exc}"')]).encode())
            return
        if not message.is_request:
            return  # a response to our BYE
        session = self.sessions.get(message.call_id)
        method = message.method
        if session is not None and message.from_tag() != session.from_tag:
            # the same Call-ID from another dialog (a stray or forged request): it must not
            # reach, end or re-route this recording
            log.warning("SIP request for another dialog's Call-ID refused", method=method,
                        session=session.log_id, transport=transport)
            if method != "ACK":
                status = 481 if message.to_tag() or method != "INVITE" else 400
                reply(response(message, status, to_tag=new_tag(), headers=[
                    ("Warning", '399 callshield "Call-ID in use by another dialog"')]).encode())
            return
        if method == "OPTIONS" and session is None:
            reply(response(message, 200, to_tag=new_tag(), headers=[
                ("Allow", ALLOW), ("Accept", ACCEPT), ("Supported", "siprec")]).encode())
        elif method == "INVITE":
            if session is None:
                if message.to_tag():
                    reply(response(message, 481).encode())
                else:
                    self._new_invite(message, source, reply, transport)
            elif message.to_tag():
                session.reply = reply
                session.on_reinvite(message)
            elif message.branch == session.invite.branch and session.last_response:
                reply(session.last_response)  # a retransmission of the initial INVITE
            elif message.branch == session.invite.branch:
                reply(response(message, 100).encode())
            else:
                reply(response(message, 482, reason="Loop Detected").encode())
        elif method == "ACK":
            if session is not None:
                session.on_ack(message)
        elif session is None:
            if method in ("BYE", "CANCEL"):
                reply(response(message, 481, to_tag=new_tag()).encode())
            else:
                reply(response(message, 405, to_tag=new_tag(),
                               headers=[("Allow", ALLOW)]).encode())
        elif method == "BYE":
            self._spawn(session.on_bye(message))
        elif method == "CANCEL":
            session.on_cancel(message)
        elif method == "OPTIONS":
            session.respond(message, 200, headers=[("Allow", ALLOW), ("Accept", ACCEPT)])
        else:
            session.respond(message, 405, headers=[("Allow", ALLOW)])

    def _new_invite(self, invite: SipMessage, source: tuple[str, int], reply: Reply,
                    transport: str) -> None:
        s = self.settings
        log_id = self.log_id(invite.call_id)
        bound = log.bind(session=log_id, transport=transport)

        def refuse(status: int, reason: str, event: str,
                   headers: list[tuple[str, str]] | None = None) -> None:
            metrics.PROTOCOL_ERRORS.labels(PLUGIN, str(status)).inc()
            bound.warning(event, status=status, reason=reason)
            reply(response(invite, status, to_tag=new_tag(), headers=[
                ("Warning", f'399 callshield "{reason}"'), *(headers or [])]).encode())

        if len(self.sessions) >= s.max_sessions:
            refuse(503, "too many recordings", "INVITE refused: --siprec session limit",
                   [("Retry-After", "30")])
            return
        if sum(x.source[0] == source[0] for x in self.sessions.values()) \
                >= s.max_sessions_per_source:
            refuse(503, "too many recordings from this source",
                   "INVITE refused: sessions per source limit", [("Retry-After", "30")])
            return
        try:
            offer = read_offer(invite, s.max_streams)
        except SipError as exc:
            headers = [("Accept", ACCEPT)] if exc.status == 415 else []
            refuse(exc.status, str(exc), "INVITE refused", headers)
            return
        unsupported = invite.tokens("Require") - SUPPORTED
        if unsupported:
            refuse(420, f"unsupported extension {', '.join(sorted(unsupported))[:60]}",
                   "INVITE refused: Require names an extension we do not support",
                   [("Unsupported", ", ".join(sorted(unsupported)))])
            return
        if "siprec" not in invite.tokens("Require") and offer.metadata is None:
            refuse(421, "not a SIPREC session: no Require: siprec, no rs-metadata",
                   "INVITE refused: not a SIPREC recording session",
                   [("Require", "siprec")])
            return
        reply(response(invite, 100).encode())
        session = RecordingSession(self, invite, source, reply, transport, offer, log_id)
        self.sessions[invite.call_id] = session
        self._spawn(session.answer_invite())

    def forget(self, session: RecordingSession) -> None:
        if self.sessions.get(session.call_id) is session:
            del self.sessions[session.call_id]

    def _spawn(self, coro: object) -> None:
        task = asyncio.ensure_future(coro)  # type: ignore[arg-type]
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("internal error in a recording session", exc_info=task.exception())
