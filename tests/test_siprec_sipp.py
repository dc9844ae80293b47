"""SIPREC against a real recording client: SIPp (Debian's ``sip-tester``) plays the SRC with
the scenarios in ``tests/sipp/``, against ``python -m plugins serve --siprec`` (a real child
process, as an operator runs it) and the real detection server with the default model.

The recording is the spoofed call (``call_dev_03``, the source of the stereo example: the
caller's voice is machine-made) as two participant streams of PCMU RTP, replayed in real
time by SIPp from a pcap this test writes. Beside it, in the same plugin process, run an
OPTIONS ping, a string of malformed and hostile INVITEs (billion laughs, an external entity,
truncated XML, broken SDP, codecs we cannot decode, a foreign body type, a non-SIPREC INVITE,
a truncated datagram) and a client outside ``--siprec-allow``: each gets its error status,
and the recording in progress is complete all the same.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile

from bench.plugin_peers import (
    SIPP_HOSTILE_KEYS,
    WEBHOOK_SECRET,
    FakeHttp,
    Legs,
    SippRun,
    free_even_port,
    rtp_packets,
    run_sipp,
    sipp_binary,
    spoof_legs,
    write_rtp_pcap,
)
from plugins.app import PluginSettings, start_plugins
from plugins.core import DetectorLink
from plugins.siprec.server import SiprecSettings
from plugins.webhook import WebhookSender, verify
from server.app import RunningServer
from server.devstack import ROOT, child_env, free_port
from tests.paths import missing, require
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import SHARED_CALLS, wait_until

CALL_SECONDS = 14.0
CALLER_AOR = "sip:+15550100@198.51.100.7"  # as written in tests/sipp/siprec_call.xml
AGENT_AOR = "sip:4711@203.0.113.20"
SESSION_ID = "Ks0Fb3oBEfCmugAMKfnCqw=="


@pytest.fixture(autouse=True)
def _sipp() -> None:
    if sipp_binary() is None:
        missing("sipp is not installed (Debian package sip-tester: scripts/install-system.sh)")
    require(SHARED_CALLS / "call_dev_03_stereo.flac")


class PluginProcess:
    """``python -m plugins serve`` in a child process; its JSON log lines, parsed."""

    def __init__(self, proc: asyncio.subprocess.Process, sip_port: int) -> None:
        self.proc = proc
        self.sip_port = sip_port
        self.lines: list[str] = []
        self.reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            self.lines.append(line.decode("utf-8", "replace"))

    @property
    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def named(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def stop(self) -> None:
        if self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 20)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        await self.reader


@pytest.fixture
async def webhook() -> AsyncIterator[FakeHttp]:
    http = await FakeHttp().start()
    yield http
    await http.stop()


async def start_cli(detector_port: int, webhook_url: str) -> PluginProcess:
    sip_port, rtp_base = free_port(), free_even_port(40)
    args = [sys.executable, "-m", "plugins", "serve", "--siprec", f"127.0.0.1:{sip_port}",
            "--siprec-rtp-ports", f"{rtp_base}-{rtp_base + 39}",
            "--siprec-allow", "127.0.0.1/32", "--detector", f"127.0.0.1:{detector_port}",
            "--webhook", webhook_url]
    env = child_env() | {"CALLSHIELD_PLUGINS_WEBHOOK_SECRET": WEBHOOK_SECRET}
    proc = await asyncio.create_subprocess_exec(
        *args, cwd=ROOT, env=env, stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    plugin = PluginProcess(proc, sip_port)
    try:
        await wait_until(lambda: plugin.named("plugin listening") or proc.returncode is not None,
                         "the plugin process listening", within=60)
    except AssertionError:
        await plugin.stop()
        raise
    assert proc.returncode is None, "".join(plugin.lines)[-3000:]
    return plugin


def two_speakers(seconds: float) -> Legs:
    """The spoofed caller (party B's machine-made turns, :func:`spoof_legs`) and, on the
    agent's stream, party A (human) speaking over the call's first seconds: both lanes carry
    speech, so the summary shows each stream reached its own lane."""
    caller = spoof_legs(seconds).caller
    pcm, rate = soundfile.read(SHARED_CALLS / "call_dev_03_stereo.flac", dtype="int16",
                               always_2d=True)
    start = int(0.5 * rate)
    agent = np.ascontiguousarray(pcm[start : start + caller.size, 0])
    return Legs(caller=caller, agent=agent)


def webhook_events(http: FakeHttp) -> list[dict[str, Any]]:
    hooks = http.matching("/hook")
    assert all(verify(WEBHOOK_SECRET, h.body, h.headers["X-Callshield-Signature"])
               for h in hooks)
    return [json.loads(h.body) for h in hooks]


def answered_mlines(run: SippRun) -> list[tuple[int, str, str]]:
    """The 200 OK's m-lines: (port, payload types, direction), with each one's label."""
    (ok,) = run.responses(200, "INVITE")
    body = ok.replace("\r\n", "\n").split("\n\n", 1)[1]
    out = []
    for block in body.split("\nm=")[1:]:
        port, fmt = re.match(r"audio (\d+) RTP/AVP ([\d ]+)", block).groups()  # type: ignore[union-attr]
        direction = re.search(r"^a=(sendonly|recvonly|sendrecv|inactive)", block, re.M)
        label = re.search(r"^a=label:(\S+)", block, re.M)
        out.append((int(port), f"{direction.group(1) if direction else ''}"
                    f" {label.group(1) if label else ''}", fmt.strip()))
    return out


async def test_sipp_recording_end_to_end_beside_hostile_and_refused_clients(
        server: RunningServer, webhook: FakeHttp, tmp_path: Path) -> None:
    legs = two_speakers(CALL_SECONDS)
    # m-line 1 is the agent's stream (label 2), m-line 2 the caller's (label 1): SIPp sends
    # the pcap's lowest destination port to the first m-line's port, the next to +2
    call_dir = tmp_path / "call"
    call_dir.mkdir()
    write_rtp_pcap(call_dir / "streams.pcap",
                   [rtp_packets(legs.agent, ssrc=0x0A6E0001), rtp_packets(legs.caller,
                                                                          ssrc=0xCA11E001)],
                   [30000, 30002])
    plugin = await start_cli(server.port, f"{webhook.url}/hook")
    target = ("127.0.0.1", plugin.sip_port)
    try:
        call = asyncio.create_task(run_sipp(
            "siprec_call", target, call_dir,
            variables={"pause_ms": str(int(CALL_SECONDS * 1000) + 600)}))
        await wait_until(lambda: plugin.named("recording answered") or call.done(),
                         "the recording answered", within=30)
        assert not call.done(), call.result().output
        options, hostile, refused = await asyncio.gather(
            run_sipp("siprec_options", target, tmp_path / "options"),
            run_sipp("siprec_hostile", target, tmp_path / "hostile", keys=SIPP_HOSTILE_KEYS),
            run_sipp("siprec_refused", target, tmp_path / "refused", local_ip="127.0.0.2"))
        assert not call.done()  # all of that while the recording was going on
        run = await call
        assert run.returncode == 0, run.output
        await wait_until(lambda: any(e["type"] == "call_summary"
                                     for e in webhook_events(webhook)),
                         "the call_summary at the webhook", within=30)
    finally:
        await plugin.stop()
    for other in (options, hostile, refused):  # each scenario checks its statuses itself
        assert other.returncode == 0, other.output
    # the answer: both m-lines in place, recvonly, PCMU, on consecutive even ports
    mlines = answered_mlines(run)
    assert [(d, f) for _p, d, f in mlines] == [("recvonly 2", "0"), ("recvonly 1", "0")]
    ports = [p for p, _d, _f in mlines]
    assert ports[0] % 2 == 0 and ports[1] == ports[0] + 2, ports
    # one recording (the refused and hostile clients started none), as two lanes
    assert len(plugin.named("recording answered")) == 1
    (opened,) = plugin.named("call open")
    assert opened["parties"] == ["caller", "agent"]
    (closed,) = plugin.named("recording closed")
    assert closed["why"] == "bye" and closed["foreign_ssrc"] == 0
    assert closed["packets"] == 2 * int(CALL_SECONDS * 50)
    # the caller's stream (the second m-line, mapped by the metadata) is the spoof
    events = webhook_events(webhook)
    alerts = [e for e in events if e["type"] == "spoof_alert"]
    assert [a["speaker"] for a in alerts] == ["caller"]
    assert 0.0 <= alerts[0]["start_seconds"] < alerts[0]["end_seconds"] <= CALL_SECONDS + 1
    (summary,) = [e for e in events if e["type"] == "call_summary"]
    expected = {"sip_call_id": run.call_id, "recording_session_id": SESSION_ID,
                "caller_aor": CALLER_AOR, "agent_aor": AGENT_AOR}
    assert alerts[0]["extra"] == expected and summary["extra"] == expected
    states = {s["speaker"]: s["state"] for s in summary["speakers"]}
    assert states["caller"] == "SPEAKER_STATE_SPOOF_SUSPECTED"
    assert set(states) == {"caller", "agent"}  # the agent's stream, in its own lane
    (agent,) = [x for x in summary["speakers"] if x["speaker"] == "agent"]
    assert agent["speech_seconds"] > 5 and agent["state"] != "SPEAKER_STATE_SPOOF_SUSPECTED"
    assert summary["gaps"] == [] and summary["audio_seconds"] >= CALL_SECONDS - 0.5
    # the logs name the recording by a digest: no Call-ID, no number, no AOR
    text = "".join(plugin.lines)
    assert run.call_id not in text and "+15550100" not in text and "4711@" not in text
    assert summary["call_id"] == opened["call_id"] != run.call_id
    refusals = plugin.named("INVITE refused") + plugin.named(
        "INVITE refused: not a SIPREC recording session")
    assert sorted(e["status"] for e in refusals) == [400, 400, 400, 415, 421, 488, 488]
    assert plugin.named("SIP refused: source not in --siprec-allow")


async def test_sipp_oracle_dialect_over_tcp_with_an_invite_larger_than_a_datagram(
        server: RunningServer, webhook: FakeHttp, tmp_path: Path) -> None:
    """An Oracle SBC's recording over TCP (SIP framed by Content-Length): the draft
    metadata, whose caller is the participant flagged ``apkt:callingParty`` though listed
    second, PCMA, and an INVITE over 1300 bytes, more than a UDP datagram on a typical
    path MTU carries."""
    seconds = 3.0
    legs = two_speakers(seconds)
    write_rtp_pcap(tmp_path / "streams.pcap",  # the caller's stream is the first m-line
                   [rtp_packets(legs.caller, ssrc=1, payload_type=8),
                    rtp_packets(legs.agent, ssrc=2, payload_type=8)], [30000, 30002])
    base = free_even_port(8)
    settings = PluginSettings(siprec=SiprecSettings(listen="127.0.0.1:0",
                                                    rtp_ports=(base, base + 7)))
    detector = DetectorLink(f"127.0.0.1:{server.port}", webhook=WebhookSender(
        [f"{webhook.url}/hook"], WEBHOOK_SECRET, backoff_seconds=0.05))
    running = await start_plugins(settings, detector)
    try:
        run = await run_sipp("siprec_call_oracle", ("127.0.0.1", running.ports["siprec"]),
                             tmp_path, transport="t1",
                             variables={"pause_ms": str(int(seconds * 1000))})
        assert run.returncode == 0, run.output
        await wait_until(lambda: any(e["type"] == "call_summary"
                                     for e in webhook_events(webhook)), "the summary")
    finally:
        await running.stop()
    sent = re.findall(r"TCP message sent \((\d+) bytes\):\s+INVITE ", run.messages)
    assert sent and int(sent[0]) > 1300, sent
    assert [f for _p, _d, f in answered_mlines(run)] == ["8", "8"]  # PCMA kept
    (summary,) = [e for e in webhook_events(webhook) if e["type"] == "call_summary"]
    assert summary["extra"] == {"sip_call_id": run.call_id,
                                "recording_session_id": "ykwnHG6qQyqq0GXP8J9aMQ==",
                                "caller_aor": CALLER_AOR, "agent_aor": AGENT_AOR}
    speech = {s["speaker"]: s["speech_seconds"] for s in summary["speakers"]}
    assert set(speech) == {"caller", "agent"} and min(speech.values()) > 0.5, speech


async def test_sipp_cancel_before_the_answer(tmp_path: Path) -> None:
    """No detector reachable yet: the SRS holds its answer (then 503, for the SRC to fail
    over), and the SRC's CANCEL meanwhile gets 200 and the INVITE 487."""
    base = free_even_port(4)
    settings = PluginSettings(siprec=SiprecSettings(listen="127.0.0.1:0",
                                                    rtp_ports=(base, base + 3)))
    running = await start_plugins(settings, DetectorLink(f"127.0.0.1:{free_port()}"))
    try:
        run = await run_sipp("siprec_cancel", ("127.0.0.1", running.ports["siprec"]),
                             tmp_path, limit_seconds=20)
        assert running.siprec is not None and not running.siprec.sessions
    finally:
        await running.stop(0)
    assert run.returncode == 0, run.output
    assert run.responses(487, "INVITE") and run.responses(200, "CANCEL")
