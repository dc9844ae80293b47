"""The SIPREC server's dialogs and media against hostile and unusual SRC behaviour, driven
from Python where SIPp cannot do it (RTP from a second source mid-call, a forged BYE, a
re-INVITE before the ACK), through the real plugin, real sockets and the real detection
server: a flood from a wrong SSRC and a request of another dialog change nothing of the
recording, and a pause keeps call time."""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator
from ipaddress import ip_network
from typing import Any

import pytest
from structlog.testing import capture_logs

from bench.plugin_peers import (
    WEBHOOK_SECRET,
    FakeHttp,
    SipPeer,
    free_even_port,
    rtp_packets,
    send_rtp,
    sip_request,
    siprec_body,
    siprec_metadata,
    siprec_sdp,
)
from devstack import free_port
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.bridge import DetectorLink
from plugins.siprec.rtp import build_rtp
from plugins.siprec.server import PortPool, SiprecSettings
from plugins.webhook import WebhookSender
from server.app import RunningServer
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import noise_pcm, wait_until

SESSION = "Ks0Fb3oBEfCmugAMKfnCqw=="
PARTIES = [("caller-pid", "sip:+15550100@carrier.example", "s1", "1"),
           ("agent-pid", "sip:4711@pbx.example", "s2", "2")]


@pytest.fixture
async def webhook() -> AsyncIterator[FakeHttp]:
    http = await FakeHttp().start()
    yield http
    await http.stop()


@pytest.fixture
async def plugin(server: RunningServer, webhook: FakeHttp) -> AsyncIterator[RunningPlugins]:
    base = free_even_port(16)
    settings = PluginSettings(siprec=SiprecSettings(
        listen="127.0.0.1:0", rtp_ports=(base, base + 15),
        allow=(ip_network("127.0.0.1/32"),)))
    detector = DetectorLink(f"127.0.0.1:{server.port}", webhook=WebhookSender(
        [f"{webhook.url}/hook"], WEBHOOK_SECRET, backoff_seconds=0.05))
    running = await start_plugins(settings, detector)
    yield running
    await running.stop()


class Src:
    """One recording dialog as an SRC runs it over UDP."""

    def __init__(self, peer: SipPeer, target: str) -> None:
        self.peer = peer
        self.target = target
        self.call_id = f"{uuid.uuid4()}@192.0.2.10"
        self.to_tag = ""
        self.cseq = 0

    def request(self, method: str, body: str = "", *, cseq: int | None = None,
                from_tag: str = "src1", **kw: Any) -> bytes:
        if cseq is None:
            self.cseq += 1
            cseq = self.cseq
        return sip_request(method, self.target, self.call_id, cseq, body,
                           local=self.peer.local, to_tag=self.to_tag, from_tag=from_tag, **kw)

    async def response(self, cseq: int, method: str) -> str:
        """The final response to our request ``cseq`` (a retransmitted 200 of an earlier
        INVITE, which UDP brings until the ACK lands, is skipped)."""
        while True:
            data = (await self.peer.status()).decode()
            if re.search(rf"^CSeq:\s*{cseq} {method}\s*$", data, re.M):
                return data

    async def invite(self, direction: str = "sendonly") -> list[int]:
        """INVITE (or re-INVITE once answered), its 200, the ACK; the answer's ports."""
        body = siprec_body(siprec_sdp("127.0.0.1", [7000, 7002], ["1", "2"],
                                      direction=direction), siprec_metadata(SESSION, PARTIES))
        self.peer.send(self.request("INVITE", body))
        ok = await self.response(self.cseq, "INVITE")
        assert ok.startswith("SIP/2.0 200 "), ok
        self.to_tag = re.search(r"^To:.*;tag=([^;\s]+)", ok, re.M).group(1)  # type: ignore[union-attr]
        self.peer.send(self.request("ACK", cseq=self.cseq))
        return [int(p) for p in re.findall(r"^m=audio (\d+) ", ok, re.M)]


def summaries(http: FakeHttp) -> list[dict[str, Any]]:
    return [e for e in (json.loads(h.body) for h in http.matching("/hook"))
            if e["type"] == "call_summary"]


async def test_wrong_ssrc_flood_and_a_forged_bye_do_not_touch_the_recording(
        plugin: RunningPlugins, webhook: FakeHttp) -> None:
    peer = await SipPeer.open(("127.0.0.1", plugin.ports["siprec"]))
    src = Src(peer, f"sip:srs@127.0.0.1:{plugin.ports['siprec']}")
    seconds = 2.0
    pcm = noise_pcm(seconds)[:, 0]
    with capture_logs() as logs:
        ports = await src.invite()
        assert len(ports) == 2 and ports[1] == ports[0] + 2 and ports[0] % 2 == 0
        caller = rtp_packets(pcm, ssrc=0x1111)
        agent = rtp_packets(pcm, ssrc=0x2222)
        # a stranger's stream on the caller's port: loud, a different SSRC, all at once
        flood = [build_rtp(0, i, i * 160, 0xBAD, b"\x00" * 160) for i in range(300)]

        async def flood_later() -> None:
            await asyncio.sleep(0.3)  # the caller's source is locked by then
            for i in range(0, len(flood), 25):  # 25 at once: what a socket buffer holds
                await send_rtp(ports[0], flood[i : i + 25], paced=False)
                await asyncio.sleep(0.01)

        await asyncio.gather(send_rtp(ports[0], caller), send_rtp(ports[1], agent),
                             flood_later())
        # a BYE of another dialog (same Call-ID, another From tag) must not end this one
        peer.send(src.request("BYE", from_tag="forged"))
        forged = await src.response(src.cseq, "BYE")
        assert forged.startswith("SIP/2.0 481 "), forged
        assert plugin.siprec is not None and src.call_id in plugin.siprec.sessions
        peer.send(src.request("BYE"))
        assert (await src.response(src.cseq, "BYE")).startswith("SIP/2.0 200 ")
        await wait_until(lambda: summaries(webhook), "the summary")
    peer.close()
    (closed,) = [e for e in logs if e["event"] == "recording closed"]
    assert closed["foreign_ssrc"] == len(flood)
    assert closed["packets"] == len(caller) + len(agent)
    (summary,) = summaries(webhook)
    assert summary["extra"]["sip_call_id"] == src.call_id
    # exactly the call's audio: the flood added nothing to the caller's lane
    assert abs(summary["audio_seconds"] - seconds) < 0.2, summary["audio_seconds"]


async def test_reinvite_pauses_and_resumes_and_a_second_one_before_the_ack_is_491(
        plugin: RunningPlugins, webhook: FakeHttp) -> None:
    peer = await SipPeer.open(("127.0.0.1", plugin.ports["siprec"]))
    src = Src(peer, f"sip:srs@127.0.0.1:{plugin.ports['siprec']}")
    pcm = noise_pcm(0.6)[:, 0]
    with capture_logs() as logs:
        ports = await src.invite()
        await asyncio.gather(send_rtp(ports[0], rtp_packets(pcm, 1)),
                             send_rtp(ports[1], rtp_packets(pcm, 2)))
        # pause: re-INVITE with inactive streams; a second re-INVITE before its ACK: 491
        body = siprec_body(siprec_sdp("127.0.0.1", [7000, 7002], ["1", "2"],
                                      direction="inactive"), None)
        peer.send(src.request("INVITE", body))
        paused = await src.response(src.cseq, "INVITE")
        assert paused.startswith("SIP/2.0 200 ") and paused.count("a=inactive") == 2, paused
        peer.send(src.request("INVITE", body))
        glare = await src.response(src.cseq, "INVITE")
        assert glare.startswith("SIP/2.0 491 "), glare
        peer.send(src.request("ACK", cseq=src.cseq - 1))
        await asyncio.sleep(0.6)  # paused: no RTP, no timeout, call time goes on
        resumed = await src.invite("sendonly")
        assert resumed == ports  # the streams keep their ports
        await asyncio.gather(send_rtp(ports[0], rtp_packets(pcm, 1, seq0=5000, ts0=900000)),
                             send_rtp(ports[1], rtp_packets(pcm, 2, seq0=5000, ts0=900000)))
        peer.send(src.request("BYE"))
        assert (await src.response(src.cseq, "BYE")).startswith("SIP/2.0 200 ")
        await wait_until(lambda: summaries(webhook), "the summary")
    peer.close()
    events = [e["event"] for e in logs]
    assert "recording paused" in events and "recording resumed" in events
    (summary,) = summaries(webhook)
    # 0.6 s of audio, 0.6 s or more paused (silence), 0.6 s of audio: call time, not only
    # the audio's time (1.2 s)
    assert 1.7 < summary["audio_seconds"] < 3.5, summary["audio_seconds"]
    assert summary["gaps"] == []


async def test_concurrent_answers_get_distinct_consecutive_port_blocks() -> None:
    """Many INVITEs answered at once (a call-center shift start): each recording gets its
    own consecutive even ports, none is refused while the range has room, and a full range
    says so (the INVITE is then answered 503)."""
    base = free_even_port(4)
    pool = PortPool("127.0.0.1", base, base + 39)  # 10 recordings of two streams
    blocks = await asyncio.gather(*(pool.bind(2, [lambda _d, _a: None] * 2)
                                    for _ in range(10)))
    try:
        ports = [[p for p, _t in b] for b in blocks if b is not None]
        assert len(ports) == 10
        assert all(p[0] % 2 == 0 and p[1] == p[0] + 2 for p in ports)
        assert len({q for p in ports for q in p}) == 20
        assert await pool.bind(2, [lambda _d, _a: None] * 2) is None
    finally:
        for b in blocks:
            for _port, transports in b or []:
                for t in transports:
                    t.close()


async def _peer_from(host: str, target: tuple[str, int]) -> SipPeer:
    loop = asyncio.get_running_loop()
    _t, peer = await loop.create_datagram_endpoint(SipPeer, local_addr=(host, 0),
                                                   remote_addr=target)
    return peer


async def test_an_invite_storm_meets_the_session_limits_and_options_still_answer() -> None:
    """INVITEs faster than they can be answered (the detector is not there yet, so each
    waits): beyond the per-source limit, then beyond the total, each is refused 503 with
    Retry-After at once; OPTIONS pings are still answered; at shutdown the ones still
    waiting are refused 503 (the SRC moves to another recorder), not left hanging."""
    base = free_even_port(8)
    settings = PluginSettings(siprec=SiprecSettings(
        listen="127.0.0.1:0", rtp_ports=(base, base + 7), max_sessions=6,
        max_sessions_per_source=4, answer_wait_seconds=30))
    running = await start_plugins(settings, DetectorLink(f"127.0.0.1:{free_port()}"))
    target = ("127.0.0.1", running.ports["siprec"])
    first, second = await SipPeer.open(target), await _peer_from("127.0.0.2", target)
    uri = f"sip:srs@127.0.0.1:{target[1]}"
    body = siprec_body(siprec_sdp("127.0.0.1", [7000, 7002], ["1", "2"]),
                       siprec_metadata(SESSION, PARTIES))
    try:
        answers = []
        for peer, count in ((first, 5), (second, 3)):
            for _ in range(count):
                peer.send(sip_request("INVITE", uri, f"{uuid.uuid4()}@src", 1, body,
                                      local=peer.local))
                answers.append((await peer.receive()).decode())
        codes = [int(a.split(" ", 2)[1]) for a in answers]
        assert codes == [100, 100, 100, 100, 503, 100, 100, 503], codes
        assert "Retry-After: 30" in answers[4] and "per source" not in answers[7]
        first.send(sip_request("OPTIONS", uri, "ping@src", 1, local=first.local))
        assert (await first.status()).startswith(b"SIP/2.0 200 ")
        assert running.siprec is not None and len(running.siprec.sessions) == 6
    finally:
        await running.stop(0)
    shut = [(await peer.status()).decode() for peer in (first,) * 4 + (second,) * 2]
    assert all(s.startswith("SIP/2.0 503 ") for s in shut), shut
    first.close()
    second.close()


async def test_rtp_silence_ends_the_recording_with_a_bye_and_its_summary(
        server: RunningServer, webhook: FakeHttp) -> None:
    """An SRC that stops sending media without a BYE (it crashed, a firewall changed): after
    the RTP timeout the SRS sends the BYE itself, and the summary still reaches the
    webhook."""
    base = free_even_port(4)
    settings = PluginSettings(siprec=SiprecSettings(
        listen="127.0.0.1:0", rtp_ports=(base, base + 3), rtp_timeout_seconds=1.0))
    detector = DetectorLink(f"127.0.0.1:{server.port}", webhook=WebhookSender(
        [f"{webhook.url}/hook"], WEBHOOK_SECRET, backoff_seconds=0.05))
    running = await start_plugins(settings, detector)
    peer = await SipPeer.open(("127.0.0.1", running.ports["siprec"]))
    src = Src(peer, f"sip:srs@127.0.0.1:{running.ports['siprec']}")
    try:
        with capture_logs() as logs:
            ports = await src.invite()
            pcm = noise_pcm(0.5)[:, 0]
            await asyncio.gather(send_rtp(ports[0], rtp_packets(pcm, 1)),
                                 send_rtp(ports[1], rtp_packets(pcm, 2)))
            while not (bye := (await peer.receive(10)).decode()).startswith("BYE "):
                pass  # (a 200 retransmitted before our ACK landed)
            assert f"Call-ID: {src.call_id}" in bye and f"tag={src.to_tag}" in bye
            await wait_until(lambda: summaries(webhook), "the summary")
    finally:
        peer.close()
        await running.stop()
    assert [e["why"] for e in logs if e["event"] == "recording closed"] == ["rtp timeout"]
    assert summaries(webhook)[0]["extra"]["sip_call_id"] == src.call_id
