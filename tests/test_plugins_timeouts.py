"""The plugins' documented time limits and detector outages, each run out for real: the
AudioSocket idle timeout (10 s without a frame), a detector that stops reading
(``stall_seconds``), a detector that never finishes a stream after hangup
(``finish_seconds``), a detector restarted in the middle of a call (detection resumes in a
new stream, the gap reported), and the first call after a detector outage.

The hung detector is a real gRPC server whose ``StreamDetect`` accepts the stream and then
never reads it, as a wedged server process would.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from bench.plugin_peers import FakeHttp, as_frame
from callshield.v1 import detection_pb2_grpc as pb_grpc
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.audiosocket import IDLE_SECONDS
from plugins.core import FINISH_SECONDS, RECONNECT_SECONDS, STALL_SECONDS, DetectorLink
from plugins.webhook import WebhookSender
from tests.conftest import free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import noise_pcm, serving

HANGUP, UUID, SLIN, ERROR = 0x00, 0x01, 0x10, 0xFF


class _Deaf(pb_grpc.DetectionServiceServicer):
    async def StreamDetect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # never reached: makes this an async generator, as a streaming handler is


@asynccontextmanager
async def _deaf_detector() -> AsyncIterator[int]:
    server = grpc.aio.server()
    pb_grpc.add_DetectionServiceServicer_to_server(_Deaf(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@asynccontextmanager
async def _audiosocket_plugin(detector_port: int,
                              webhook: str | None = None) -> AsyncIterator[RunningPlugins]:
    """The AudioSocket plugin with its shipped limits."""
    sender = WebhookSender([webhook]) if webhook else None
    running = await start_plugins(PluginSettings(audiosocket="127.0.0.1:0"),
                                  DetectorLink(f"127.0.0.1:{detector_port}", webhook=sender))
    try:
        yield running
    finally:
        await running.stop(grace_seconds=1)


async def _asterisk(port: int, seconds: float, *, hangup: bool, paced: bool = False,
                    until_closed: float = 60) -> tuple[bytes, float]:
    """Asterisk's side: UUID, ``seconds`` of slin (paced in real time or as fast as the
    socket takes it), then a 0x00 hangup or nothing; returns what the plugin wrote back and
    when (monotonic) the plugin closed the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pcm = noise_pcm(seconds)
    received = bytearray()

    async def read() -> float:
        while chunk := await reader.read(4096):
            received.extend(chunk)
        return time.monotonic()

    reading = asyncio.create_task(read())
    with suppress(ConnectionError):
        writer.write(as_frame(UUID, uuid.uuid4().bytes))
        start = time.monotonic()
        for i in range(0, len(pcm) - 159, 160):
            if reading.done():
                break
            writer.write(as_frame(SLIN, pcm[i:i + 160].astype("<i2").tobytes()))
            await writer.drain()
            if paced:
                await asyncio.sleep(max(0.0, start + (i + 160) / 8000 - time.monotonic()))
        if hangup:
            writer.write(as_frame(HANGUP))
            await writer.drain()
    closed_at = await asyncio.wait_for(reading, until_closed)
    writer.close()
    return bytes(received), closed_at


async def test_audiosocket_idle_timeout() -> None:
    """No frame for IDLE_SECONDS (Asterisk sends one every 20 ms): error frame, closed."""
    async with _deaf_detector() as detector_port, _audiosocket_plugin(detector_port) as running:
        with capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1",
                                                           running.ports["audiosocket"])
            writer.write(as_frame(UUID, uuid.uuid4().bytes))
            await writer.drain()
            sent = time.monotonic()
            received = await asyncio.wait_for(reader.read(), IDLE_SECONDS + 20)
            waited = time.monotonic() - sent
            writer.close()
    assert received == bytes([ERROR, 0, 0])
    assert waited >= IDLE_SECONDS - 0.5
    assert [e["reason"] for e in logs if e["event"] == "protocol error"] == ["idle"]


async def test_stalled_detector_hangs_the_fork_up() -> None:
    """A detector that takes no audio: once STALL_SECONDS of it are buffered the call's fork
    hangs up (0x00), so the dialplan goes on without us, and the reason is logged."""
    async with _deaf_detector() as detector_port, _audiosocket_plugin(detector_port) as running:
        with capture_logs() as logs:
            received, _ = await _asterisk(running.ports["audiosocket"], 120, hangup=False)
    assert received == bytes([HANGUP, 0, 0])
    errors = [e["reason"] for e in logs if e["event"] == "detector error"]
    assert errors == ["detector stalled: not reading audio"]
    assert STALL_SECONDS <= 120


async def test_detector_that_never_finishes_is_given_up() -> None:
    """After hangup the plugin waits FINISH_SECONDS for the last verdicts, then closes."""
    async with _deaf_detector() as detector_port, _audiosocket_plugin(detector_port) as running:
        with capture_logs() as logs:
            hung_up = time.monotonic() + 1.0  # after one second of paced audio
            _, closed_at = await _asterisk(running.ports["audiosocket"], 1.0, hangup=True,
                                           paced=True)
    assert closed_at - hung_up >= FINISH_SECONDS - 0.5
    events = [e["event"] for e in logs]
    assert "detector did not finish the stream in time" in events
    closed = next(e for e in logs if e["event"] == "call closed")
    assert closed["verdicts"] == {}


async def test_first_call_after_the_detector_returns_is_scored(detector: Any) -> None:
    port = free_port()
    async with _audiosocket_plugin(port) as running:
        plugin_port = running.ports["audiosocket"]
        async with serving(detector, listen=f"127.0.0.1:{port}"):
            with capture_logs() as logs:
                await _asterisk(plugin_port, 2.0, hangup=True)
            assert next(e for e in logs if e["event"] == "call closed")["verdicts"]
        # detector down: a call waits STALL_SECONDS for it, then the fork hangs up
        with capture_logs() as logs:
            received, _ = await _asterisk(plugin_port, STALL_SECONDS + 5, hangup=False,
                                          paced=True)
        assert received == bytes([HANGUP, 0, 0])
        assert [e["reason"] for e in logs if e["event"] == "detector error"] in (
            ["detector unreachable"], ["detector stalled: not reading audio"])
        async with serving(detector, listen=f"127.0.0.1:{port}"):
            with capture_logs() as logs:
                await _asterisk(plugin_port, 2.0, hangup=True)
    # (the previous call's fork may log its own close into this capture: match by call id)
    call_id = next(e["call_id"] for e in logs if e["event"] == "call open")
    closed = next(e for e in logs if e["event"] == "call closed" and e["call_id"] == call_id)
    assert closed["failed"] is False
    assert closed["verdicts"] == {
        "caller": closed["verdicts"]["caller"]}
    assert not [e for e in logs if e["event"] == "detector error" and e["call_id"] == call_id]


async def test_detection_resumes_after_a_detector_restart_mid_call(detector: Any) -> None:
    """The server goes away 4 s into a 16 s call and is back a second later: the call's
    fork stays up, a new stream takes over, and the summary covers the whole call with the
    gap in it."""
    import json

    port = free_port()
    http = await FakeHttp().start()
    try:
        async with _audiosocket_plugin(port, f"{http.url}/hook") as running:
            first = serving(detector, listen=f"127.0.0.1:{port}")
            server = await first.__aenter__()
            with capture_logs() as logs:
                call = asyncio.create_task(_asterisk(running.ports["audiosocket"], 16.0,
                                                     hangup=True, paced=True))
                await asyncio.sleep(4.0)  # the call is under way: 4 s of paced audio
                await first.__aexit__(None, None, None)
                down = time.monotonic()
                await asyncio.sleep(1.0)
                async with serving(detector, listen=f"127.0.0.1:{port}"):
                    back = time.monotonic()
                    received, _ = await call
                    await running.detector.drain(10)
        del server
    finally:
        await http.stop()
    events = [e["event"] for e in logs]
    assert "detector stream lost; reconnecting" in events
    resumed = next(e for e in logs if e["event"] == "detector stream resumed")
    assert 0 < resumed["gap_seconds"] <= (back - down) + RECONNECT_SECONDS
    assert received == b""  # never hung up on: the call ended normally
    closed = next(e for e in logs if e["event"] == "call closed")
    assert closed["failed"] is False and "caller" in closed["verdicts"]
    (summary,) = [json.loads(r.body) for r in http.matching("/hook")
                  if json.loads(r.body)["type"] == "call_summary"]
    assert summary["audio_seconds"] == pytest.approx(16.0, abs=0.05)
    ((start, end),) = summary["gaps"]
    assert 2.0 <= start < end <= 16.0 and end - start == pytest.approx(
        resumed["gap_seconds"], abs=0.01)
    # speech ranges of the second stream are shifted to call time: after the gap
    speech = [r for s in summary["speakers"] for r in s["speech"]]
    assert any(a >= end - 0.05 for a, _ in speech) and max(b for _, b in speech) <= 16.05


@pytest.fixture(autouse=True)
def _limits_as_documented() -> None:
    """docs/telephony.md and the module docstrings state these values."""
    assert (IDLE_SECONDS, STALL_SECONDS, FINISH_SECONDS, RECONNECT_SECONDS) == (
        10.0, 5.0, 10.0, 30.0)
