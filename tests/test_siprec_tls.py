"""SIP over TLS to the SRS: a recording client that verifies our certificate (made here,
self-signed for 127.0.0.1) sends a real SIPREC INVITE over TLS, its RTP, and a BYE, through
the real plugin and the real detection server; the summary reaches the webhook. A client
that speaks plain TCP to the TLS port, or never finishes its handshake, harms nothing.

SIPp would be the natural client, but Debian's ``sip-tester`` is built without OpenSSL
(``-t l1``: "To use a TLS transport you must compile SIPp with OpenSSL"), so Python's ssl
module plays the SRC here."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import ssl
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from bench.plugin_peers import (
    WEBHOOK_SECRET,
    FakeHttp,
    free_even_port,
    rtp_packets,
    send_rtp,
    sip_request,
    siprec_body,
    siprec_metadata,
    siprec_sdp,
)
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.bridge import DetectorLink
from plugins.siprec.server import SiprecSettings
from plugins.webhook import WebhookSender
from server.app import RunningServer
from tests.paths import missing
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import noise_pcm, wait_until

SESSION = "Ks0Fb3oBEfCmugAMKfnCqw=="
PARTIES = [("caller-pid", "sip:+15550100@carrier.example", "s1", "1"),
           ("agent-pid", "sip:4711@pbx.example", "s2", "2")]


def make_certificate(directory: Path) -> tuple[Path, Path]:
    if not any((Path(p) / "openssl").exists() for p in os.environ["PATH"].split(os.pathsep)):
        missing("openssl is not installed")
    cert, key = directory / "srs.pem", directory / "srs.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=callshield-srs",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True)
    return cert, key


@pytest.fixture
async def webhook() -> AsyncIterator[FakeHttp]:
    http = await FakeHttp().start()
    yield http
    await http.stop()


@pytest.fixture
async def tls_plugin(server: RunningServer, webhook: FakeHttp, tmp_path: Path
                     ) -> AsyncIterator[tuple[RunningPlugins, Path]]:
    cert, key = make_certificate(tmp_path)
    base = free_even_port(8)
    settings = PluginSettings(siprec=SiprecSettings(
        listen="127.0.0.1:0", rtp_ports=(base, base + 7), tls_listen="127.0.0.1:0",
        tls_cert=str(cert), tls_key=str(key)))
    detector = DetectorLink(f"127.0.0.1:{server.port}", webhook=WebhookSender(
        [f"{webhook.url}/hook"], WEBHOOK_SECRET, backoff_seconds=0.05))
    running = await start_plugins(settings, detector)
    yield running, cert
    await running.stop()


class TlsSrc:
    """An SRC's SIP over TLS connection: requests out, messages in (framed by
    Content-Length)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def connect(cls, port: int, cafile: Path) -> TlsSrc:
        context = ssl.create_default_context(cafile=str(cafile))  # verifies us, by IP SAN
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=context)
        return cls(reader, writer)

    @property
    def local(self) -> tuple[str, int]:
        host, port = self.writer.get_extra_info("sockname")[:2]
        return str(host), int(port)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def message(self) -> bytes:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 10)
        length = re.search(rb"^(?:Content-Length|l):\s*(\d+)", head, re.M | re.I)
        body = await self.reader.readexactly(int(length.group(1))) if length else b""
        return head + body

    async def status(self, skip: tuple[int, ...] = (100,)) -> bytes:
        while True:
            data = await self.message()
            if data.startswith(b"SIP/2.0 ") and int(data.split(b" ", 2)[1]) not in skip:
                return data

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, ssl.SSLError):
            pass


async def test_a_recording_over_tls_beside_a_plain_tcp_client(
        tls_plugin: tuple[RunningPlugins, Path], webhook: FakeHttp) -> None:
    running, cert = tls_plugin
    logs = capture_logs()
    captured = logs.__enter__()
    assert running.siprec is not None
    port = running.siprec.tls_port
    assert port and port != running.ports["siprec"]
    # first, a client that speaks plain SIP to the TLS port, and one that stalls mid-way
    plain_reader, plain = await asyncio.open_connection("127.0.0.1", port)
    plain.write(sip_request("OPTIONS", "sip:srs@127.0.0.1", "plain-1", 1,
                            local=("127.0.0.1", 5060), transport="TCP"))
    try:  # dropped at the handshake: no SIP answer
        assert await asyncio.wait_for(plain_reader.read(), 15) == b""
    except ConnectionResetError:
        pass
    plain.close()
    _stall_reader, stall = await asyncio.open_connection("127.0.0.1", port)
    stall.write(b"\x16\x03\x01\x00")  # the start of a ClientHello, never finished

    src = await TlsSrc.connect(port, cert)
    call_id = f"{uuid.uuid4()}@127.0.0.1"
    target = f"sip:srs@127.0.0.1:{port};transport=tls"
    body = siprec_body(siprec_sdp("127.0.0.1", [7000, 7002], ["1", "2"]),
                       siprec_metadata(SESSION, PARTIES))
    try:
        src.send(sip_request("INVITE", target, call_id, 1, body, local=src.local,
                             transport="TLS"))
        ok = (await src.status()).decode()
        assert ok.startswith("SIP/2.0 200 "), ok
        # our Contact names the TLS port and transport: in-dialog requests come back here
        assert re.search(rf"^Contact: <sip:srs@127\.0\.0\.1:{port};transport=tls>", ok, re.M)
        to_tag = re.search(r"^To:.*;tag=([^;\s]+)", ok, re.M).group(1)  # type: ignore[union-attr]
        ports = [int(p) for p in re.findall(r"^m=audio (\d+) ", ok, re.M)]
        src.send(sip_request("ACK", target, call_id, 1, local=src.local, to_tag=to_tag,
                             transport="TLS"))
        pcm = noise_pcm(2.0, channels=2)
        await asyncio.gather(send_rtp(ports[0], rtp_packets(pcm[:, 0].copy(), ssrc=11)),
                             send_rtp(ports[1], rtp_packets(pcm[:, 1].copy(), ssrc=12)))
        src.send(sip_request("BYE", target, call_id, 2, local=src.local, to_tag=to_tag,
                             transport="TLS"))
        bye = (await src.status()).decode()
        assert bye.startswith("SIP/2.0 200 ") and re.search(r"^CSeq:\s*2 BYE", bye, re.M)
    finally:
        await src.close()
        stall.close()
    await wait_until(lambda: any(json.loads(h.body)["type"] == "call_summary"
                                 for h in webhook.matching("/hook")), "the summary")
    logs.__exit__(None, None, None)
    # the plain client's failed handshake is the operator's log line (docs/siprec.md)
    failed = [e for e in captured if e["event"] == "SIP over TLS handshake failed"]
    assert failed and failed[0]["source"] == "127.0.0.1" and failed[0]["reason"]
    (summary,) = [json.loads(h.body) for h in webhook.matching("/hook")
                  if json.loads(h.body)["type"] == "call_summary"]
    assert summary["extra"]["sip_call_id"] == call_id
    assert summary["audio_seconds"] >= 1.5


async def test_tls_without_a_certificate_or_with_a_bad_one_is_refused_at_start(
        tmp_path: Path) -> None:
    """Settings that name TLS without its files are a usage error; an unreadable key is
    refused before any listener is bound, so nothing is left half started."""
    with pytest.raises(ValueError, match="certificate"):
        SiprecSettings(listen="127.0.0.1:0", tls_listen="127.0.0.1:0")
    cert, key = make_certificate(tmp_path)
    key.write_text("not a key")
    port = free_even_port(2)
    settings = PluginSettings(siprec=SiprecSettings(
        listen=f"127.0.0.1:{port}", tls_listen="127.0.0.1:0", tls_cert=str(cert),
        tls_key=str(key)))
    with pytest.raises(ssl.SSLError):
        await start_plugins(settings, DetectorLink("127.0.0.1:9"))
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:  # SIP's port is free
        probe.bind(("127.0.0.1", port))
