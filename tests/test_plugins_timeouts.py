"""The plugins' documented time limits and detector outages, each run out for real: the
AudioSocket idle timeout (10 s without a frame), a detector that stops reading
(``stall_seconds``), a detector that never finishes a stream after hangup
(``finish_seconds``), a detector restarted in the middle of a call (detection resumes in a
new stream, the gap reported), and the first call after a detector outage.

The hung detector is a real gRPC server, with the detection server's own transport options
(``server.app.GRPC_SERVER_OPTIONS``), whose ``StreamDetect`` accepts the stream and then never
reads it; the stalled one is the detection server itself, its event loop blocked in a thread
of its own while its gRPC core goes on taking connections and bytes.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import grpc
import pytest
from structlog.testing import capture_logs

from bench.plugin_peers import FakeHttp, as_frame
from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.bridge import DetectorLink
from plugins.webhook import WebhookSender
from server.app import GRPC_SERVER_OPTIONS
from tests.conftest import free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import noise_pcm, serving

HANGUP, UUID, SLIN, ERROR = 0x00, 0x01, 0x10, 0xFF
# The plugins' limits as the telephony guide documents them. The tests measure the running
# plugins against these numbers, not against the constants in the code, so a limit changed
# in the code and not in the docs fails here.
DOCUMENTED_IDLE_SECONDS = 10.0  # AudioSocket: no frame for this long ends the call's fork
DOCUMENTED_STALL_SECONDS = 5.0  # audio held for a detector that stopped reading
DOCUMENTED_FINISH_SECONDS = 10.0  # wait for the last verdicts after hangup
DOCUMENTED_RECONNECT_SECONDS = 30.0  # a detector gone mid-call: reconnect within this long


class _Deaf(pb_grpc.DetectionServiceServicer):
    async def StreamDetect(self, request_iterator: Any, context: Any) -> AsyncIterator[Any]:
        await asyncio.Event().wait()
        yield  # never reached: makes this an async generator, as a streaming handler is


@asynccontextmanager
async def _deaf_detector() -> AsyncIterator[int]:
    server = grpc.aio.server(options=list(GRPC_SERVER_OPTIONS))
    pb_grpc.add_DetectionServiceServicer_to_server(_Deaf(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        yield port
    finally:
        await server.stop(0)


@asynccontextmanager
async def _wedged_server(detector: Any) -> AsyncIterator[int]:
    """The detection server (``start_server``, its real transport options) on an event loop
    in a thread of its own, which is then blocked until the test is over: its port answers,
    its gRPC core accepts the stream and reads ahead what flow control lets it, and nothing
    ever reads the stream, as when a server's loop is stuck."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    async def call(coroutine: Any) -> Any:
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coroutine, loop))

    context = serving(detector)
    running = await call(context.__aenter__())
    release = threading.Event()
    loop.call_soon_threadsafe(release.wait)
    try:
        yield running.port
    finally:
        release.set()
        await call(context.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        await asyncio.to_thread(thread.join, 30)
        loop.close()


@asynccontextmanager
async def _audiosocket_plugin(detector_port: int, webhook: str | None = None,
                              **limits: float) -> AsyncIterator[RunningPlugins]:
    """The AudioSocket plugin with its shipped limits (``limits``: but these)."""
    sender = WebhookSender([webhook]) if webhook else None
    running = await start_plugins(PluginSettings(audiosocket="127.0.0.1:0"),
                                  DetectorLink(f"127.0.0.1:{detector_port}", webhook=sender,
                                               **limits))
    try:
        yield running
    finally:
        await running.stop(grace_seconds=1)


async def _asterisk(port: int, seconds: float, *, hangup: bool, paced: bool = False,
                    until_closed: float = 60) -> tuple[bytes, float, float]:
    """Asterisk's side: UUID, ``seconds`` of slin (paced in real time or as fast as the
    socket takes it), then a 0x00 hangup or nothing; returns what the plugin wrote back,
    when (monotonic) the first audio frame was sent and when the plugin closed the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    pcm = noise_pcm(seconds)
    received = bytearray()

    async def read() -> float:
        while chunk := await reader.read(4096):
            received.extend(chunk)
        return time.monotonic()

    reading = asyncio.create_task(read())
    start = time.monotonic()
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
    try:
        closed_at = await asyncio.wait_for(reading, until_closed)
    finally:
        writer.close()
    return bytes(received), start, closed_at


async def test_audiosocket_idle_timeout() -> None:
    """No frame for the documented 10 s (Asterisk sends one every 20 ms): error frame,
    closed. Not before 10 s, and not never: a plugin without the timeout, or with twice
    it, is still waiting at 20 s."""
    async with _deaf_detector() as detector_port, _audiosocket_plugin(detector_port) as running:
        with capture_logs() as logs:
            reader, writer = await asyncio.open_connection("127.0.0.1",
                                                           running.ports["audiosocket"])
            writer.write(as_frame(UUID, uuid.uuid4().bytes))
            await writer.drain()
            sent = time.monotonic()
            received = await asyncio.wait_for(reader.read(), 2 * DOCUMENTED_IDLE_SECONDS)
            waited = time.monotonic() - sent
            writer.close()
    assert received == bytes([ERROR, 0, 0])
    assert waited >= DOCUMENTED_IDLE_SECONDS - 0.5
    assert [e["reason"] for e in logs if e["event"] == "protocol error"] == ["idle"]


# What the plugin may hold for a detector that takes nothing: the documented 5 s of audio in
# its own buffer, plus what the detector's transport reads ahead before the HTTP/2 flow
# control window of the stream (64 KiB) is full: 4.1 s of 8 kHz 16-bit audio. A bridge whose
# bound never bites is still streaming at twice that; one that hung up on the clock rather
# than on audio held (or on a window not yet full) does so before 5 s. (With grpc's default
# BDP probing a server read ahead 4 MiB of a stream it never read, 262 s of this audio.)
GRPC_WINDOW_SECONDS = 65536 / 16000
STALL_HANGUP_BY = 2 * (DOCUMENTED_STALL_SECONDS + GRPC_WINDOW_SECONDS)


async def test_stalled_detector_hangs_the_fork_up(detector: Any) -> None:
    """A detector that takes no audio: once the documented 5 s of it are held the call's
    fork hangs up (0x00), so the dialplan goes on without us, and the reason is logged.
    Audio is paced as Asterisk sends it (a burst faster than real time fills the plugin's
    own queue in any case), so when the hangup comes says how much was held: not before the
    documented 5 s, and before twice what the plugin and the transport's window hold
    together. (The wait for a finish after the socket closes is cut to 1 s: nothing here
    depends on it.)"""
    async with _wedged_server(detector) as detector_port, _audiosocket_plugin(
            detector_port, finish_seconds=1.0) as running:
        with capture_logs() as logs:
            received, start, closed_at = await _asterisk(
                running.ports["audiosocket"], STALL_HANGUP_BY, hangup=False, paced=True,
                until_closed=1.0)
    assert received == bytes([HANGUP, 0, 0])
    held = closed_at - start  # seconds of paced audio sent when the fork was hung up
    assert DOCUMENTED_STALL_SECONDS <= held < STALL_HANGUP_BY, held
    errors = [e["reason"] for e in logs if e["event"] == "detector error"]
    assert errors == ["detector stalled: not reading audio"]


async def test_detector_that_never_finishes_is_given_up() -> None:
    """After hangup the plugin waits the documented 10 s for the last verdicts, then closes:
    not sooner, and not never (a plugin that waited for ever, or twice as long, is still
    open at 20 s)."""
    async with _deaf_detector() as detector_port, _audiosocket_plugin(detector_port) as running:
        with capture_logs() as logs:
            _, start, closed_at = await _asterisk(running.ports["audiosocket"], 1.0,
                                                  hangup=True, paced=True,
                                                  until_closed=2 * DOCUMENTED_FINISH_SECONDS)
    hung_up = start + 1.0  # after one second of paced audio
    assert closed_at - hung_up >= DOCUMENTED_FINISH_SECONDS - 0.5
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
            assert list(next(e for e in logs if e["event"] == "call closed")["verdicts"]) == [
                "caller"]
        # detector down: a call waits the stall limit for it, then the fork hangs up
        with capture_logs() as logs:
            received, _, _ = await _asterisk(plugin_port, DOCUMENTED_STALL_SECONDS + 5,
                                             hangup=False, paced=True)
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
    # the detector's summary came back: one verdict, for the AudioSocket party
    assert list(closed["verdicts"]) == ["caller"]
    assert closed["verdicts"]["caller"] in pb.SpeakerState.keys()
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
                    received, _, _ = await call
                    await running.detector.drain(10)
        del server
    finally:
        await http.stop()
    events = [e["event"] for e in logs]
    assert "detector stream lost; reconnecting" in events
    resumed = next(e for e in logs if e["event"] == "detector stream resumed")
    assert 0 < resumed["gap_seconds"] <= (back - down) + DOCUMENTED_RECONNECT_SECONDS
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
    assert any(a >= end - 0.05 for a, _ in speech)
    # and the first stream's, lost without its summary (the server stopped at once), come
    # from its last verdict: every second of speech_seconds has its range (a merge that kept
    # only the last stream's ranges listed 10.86 s of 12.34 s after a real outage)
    assert any(b <= start + 0.05 for _, b in speech), speech
    # (the ranges also hold the last fraction of a second, too short to score and so not
    # in speech_seconds)
    (caller,) = summary["speakers"]
    listed = sum(b - a for a, b in caller["speech"])
    assert caller["speech_seconds"] - 0.1 <= listed <= caller["speech_seconds"] + 0.6, caller
    assert max(b for _, b in speech) == pytest.approx(16.0, abs=0.05)  # to the call's end
