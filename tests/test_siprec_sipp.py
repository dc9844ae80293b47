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
from devstack import ROOT, child_env, free_port
from models.data.audio import resample
from plugins.app import PluginSettings, start_plugins
from plugins.bridge import DetectorLink
from plugins.siprec.codecs import encode_g722
from plugins.siprec.rtp import build_rtp
from plugins.siprec.server import SiprecSettings
from plugins.webhook import WebhookSender, verify
from server.app import RunningServer
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


# --- G.722 beside PCMU, and BroadWorks' dialect -----------------------------------------------

EXAMPLE_STEREO = ROOT / "examples" / "spoof_call_stereo.wav"
EXAMPLE_TURNS = ((12.3, 15.1), (27.6, 30.0))  # its party B (right) is machine-made here
BROADWORKS_SESSION = "urn:uuid:5b0d2c8e-7a01-11f0-a6ba-000c29f9c2ab"  # in the scenario
BROADWORKS_USER = "sip:2025550147@as.example.net"
BROADWORKS_OTHER = "sip:+15550100@198.51.100.7;user=phone"


def example_legs(seconds: float) -> Legs:
    """examples/spoof_call_stereo.wav cut as :func:`two_speakers` cuts the call it came
    from: the caller is party B (machine-made) over B's turns, played twice; the agent is
    party A (human) over the call's first seconds, so both lanes carry speech."""
    pcm, rate = soundfile.read(EXAMPLE_STEREO, dtype="int16", always_2d=True)
    parts = [pcm[int(a * rate) : int(b * rate), 1] for a, b in EXAMPLE_TURNS]
    caller = np.concatenate(parts * 2)[: int(seconds * rate)]
    start = int(0.5 * rate)
    return Legs(caller=np.ascontiguousarray(caller),
                agent=np.ascontiguousarray(pcm[start : start + caller.size, 0]))


def g722_packets(pcm: np.ndarray, ssrc: int, seq0: int = 3000, ts0: int = 48000
                 ) -> list[bytes]:
    """8 kHz speech sent as a wideband phone sends it: at 16 kHz, G.722 (our encoder),
    160 bytes per 20 ms packet, the timestamp 160 ticks of the 8 kHz RTP clock apart."""
    wide = np.clip(np.rint(resample(pcm.astype(np.float32), 8000, 16000)), -32768, 32767)
    data = encode_g722(wide.astype(np.int16))
    return [build_rtp(9, seq0 + i, ts0 + 160 * i, ssrc, data[j : j + 160])
            for i, j in enumerate(range(0, len(data) - 159, 160))]


async def test_sipp_g722_beside_pcmu_and_a_broadworks_mixed_recording_at_once(
        server: RunningServer, webhook: FakeHttp, tmp_path: Path) -> None:
    """Two SRCs at once against ``python -m plugins serve --siprec``: CUBE recording a
    G.711 caller (PCMU, the machine-made voice) and an agent on a wideband phone (G.722, a
    person) as two streams, and BroadWorks recording its user's call half as one mixed PCMA
    stream with its ``recording_metadata``.

    The G.722 lane must come out as the person's speech: decoded right, the summary finds
    6.4 s of speech in its 8 s (the agent talks from 0.4 s on); with a broken decoder (its
    ADPCM state lost at each packet: the unit test's worst case) only 2.9 s, so the bound is
    5 s. The BroadWorks participants and caller reach the webhook."""
    seconds = 8.0
    legs = example_legs(seconds)
    g722_dir, bw_dir = tmp_path / "g722", tmp_path / "broadworks"
    g722_dir.mkdir()
    bw_dir.mkdir()
    write_rtp_pcap(g722_dir / "streams.pcap", [g722_packets(legs.agent, 0x0A6E0722),
                                               rtp_packets(legs.caller, ssrc=0xCA11E001)],
                   [30000, 30002])
    mixed = np.clip(legs.caller.astype(np.int32) + legs.agent, -32768, 32767).astype(np.int16)
    write_rtp_pcap(bw_dir / "streams.pcap", [rtp_packets(mixed, ssrc=0xB3, payload_type=8)],
                   [30000])
    plugin = await start_cli(server.port, f"{webhook.url}/hook")
    target = ("127.0.0.1", plugin.sip_port)
    pause = {"pause_ms": str(int(seconds * 1000) + 400)}
    try:
        g722, broadworks = await asyncio.gather(
            run_sipp("siprec_call_g722", target, g722_dir, variables=pause),
            run_sipp("siprec_call_broadworks", target, bw_dir, variables=pause))
        assert g722.returncode == 0, g722.output
        assert broadworks.returncode == 0, broadworks.output
        await wait_until(lambda: sum(e["type"] == "call_summary"
                                     for e in webhook_events(webhook)) == 2,
                         "both summaries at the webhook", within=30)
    finally:
        await plugin.stop()
    # the answers: each codec kept where it was offered
    assert [(d, f) for _p, d, f in answered_mlines(g722)] == [("recvonly 2", "9"),
                                                              ("recvonly 1", "0")]
    assert [(d, f) for _p, d, f in answered_mlines(broadworks)] == [("recvonly 1", "8")]
    answered = {tuple(e["codecs"]): e for e in plugin.named("recording answered")}
    assert set(answered) == {("G722", "PCMU"), ("PCMA",)}
    assert answered[("G722", "PCMU")]["metadata"] == "rfc7865"
    assert answered[("PCMA",)]["metadata"] == "broadworks"
    assert answered[("PCMA",)]["lanes"] == ["mixed"]
    closed = plugin.named("recording closed")
    assert sorted(e["packets"] for e in closed) == sorted([int(seconds * 50),
                                                           2 * int(seconds * 50)])
    assert all(e["why"] == "bye" and e["other_payload"] == 0 and e["foreign_ssrc"] == 0
               and e["lost_ms"] == 0 for e in closed), closed
    events = webhook_events(webhook)
    summaries = {e["extra"]["sip_call_id"]: e for e in events if e["type"] == "call_summary"}
    # CUBE's recording: the PCMU caller is the spoof, the G.722 agent a person
    summary = summaries[g722.call_id]
    assert summary["extra"] == {"sip_call_id": g722.call_id, "recording_session_id": SESSION_ID,
                                "caller_aor": CALLER_AOR, "agent_aor": AGENT_AOR}
    states = {s["speaker"]: s for s in summary["speakers"]}
    assert states["caller"]["state"] == "SPEAKER_STATE_SPOOF_SUSPECTED"
    assert states["agent"]["state"] != "SPEAKER_STATE_SPOOF_SUSPECTED"
    assert states["caller"]["speech_seconds"] > 2 and states["agent"]["speech_seconds"] > 5
    alerts = [e for e in events if e["type"] == "spoof_alert"
              and e["extra"]["sip_call_id"] == g722.call_id]
    assert [a["speaker"] for a in alerts] == ["caller"]
    # BroadWorks': one mixed stream, its participants with the caller (the user) first
    summary = summaries[broadworks.call_id]
    assert summary["extra"] == {"sip_call_id": broadworks.call_id,
                                "recording_session_id": BROADWORKS_SESSION,
                                "participants": f"{BROADWORKS_USER},{BROADWORKS_OTHER}",
                                "caller_aor": BROADWORKS_USER}
    assert summary["audio_seconds"] >= seconds - 0.5 and summary["gaps"] == []
    text = "".join(plugin.lines)  # no AOR or number in the logs
    assert "2025550147" not in text and "15550100" not in text

