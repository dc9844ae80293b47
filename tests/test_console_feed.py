"""The admin event feed (WatchCalls): only the admin token opens it, and it carries every
call's open, scores, verdicts, alert, summary and close, with a snapshot for late watchers;
the alert's audio only to a watcher that asks, from a server started to allow it."""

from __future__ import annotations

import asyncio
import wave
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import soundfile

from callshield.v1 import detection_pb2 as pb
from client import AsyncDetectionClient
from client.audio import file_stream
from models.data.audio import resample
from models.inference import Detector
from server.app import RunningServer
from server.config import parse_args
from server.events import EventBus
from tests.conftest import RedisBackend
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import EXAMPLES, noise_pcm, serving, wait_until

ADMIN = "admin-secret"
STREAM = "stream-secret"


@pytest.fixture
async def admin_server(detector: Detector) -> AsyncIterator[RunningServer]:
    async with serving(detector, admin_token=ADMIN, auth_token=STREAM) as running:
        yield running


@pytest.fixture
async def admin_backend_server(
    detector: Detector, backend: RedisBackend | None
) -> AsyncIterator[RunningServer]:
    """``admin_server`` on each queue backend: in-process, and Redis with a real worker (the
    server that holds the stream publishes its events, whoever scores the windows); it
    allows 5 s of flagged audio."""
    context = (serving(detector, backend.queue(), queue="redis", redis_url=backend.url,
                       admin_token=ADMIN, auth_token=STREAM, feed_flagged_audio=5.0)
               if backend else serving(detector, admin_token=ADMIN, auth_token=STREAM,
                                       feed_flagged_audio=5.0))
    async with context as running:
        yield running


async def first_event(target: str, token: str | None) -> pb.WatchCallsResponse:
    async with AsyncDetectionClient(target, token=STREAM) as client:
        async for event in client.watch_calls(admin_token=token):
            return event
    raise AssertionError("the feed ended without an event")


async def test_only_the_admin_token_opens_the_feed(admin_server: RunningServer) -> None:
    target = f"127.0.0.1:{admin_server.port}"
    for token, code in ((STREAM, grpc.StatusCode.UNAUTHENTICATED),
                        ("", grpc.StatusCode.UNAUTHENTICATED),
                        ("wrong", grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await first_event(target, token)
        assert err.value.code() == code, token
    event = await first_event(target, ADMIN)
    assert event.HasField("ready") and event.ready.open_calls == 0
    # and the admin token is no stream token
    async with AsyncDetectionClient(target, token=ADMIN) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.get_model()
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_feed_is_disabled_without_an_admin_token(server: RunningServer) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await first_event(f"127.0.0.1:{server.port}", "anything")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


async def test_feed_carries_a_spoof_call_from_open_to_close(
        admin_backend_server: RunningServer, tmp_path: Path) -> None:
    target = f"127.0.0.1:{admin_backend_server.port}"
    events: list[pb.WatchCallsResponse] = []
    plain: list[pb.WatchCallsResponse] = []  # a watcher that asks for no audio
    ready = asyncio.Event()
    plain_ready = asyncio.Event()

    async def watch() -> None:
        async with AsyncDetectionClient(target, token=ADMIN) as client:
            async for event in client.watch_calls(include_windows=True,
                                                  flagged_audio_seconds=3.0):
                events.append(event)
                ready.set()

    async def watch_plain() -> None:
        async with AsyncDetectionClient(target, token=ADMIN) as client:
            async for event in client.watch_calls():
                plain.append(event)
                plain_ready.set()

    watcher = asyncio.create_task(watch())
    plain_watcher = asyncio.create_task(watch_plain())
    await asyncio.wait_for(ready.wait(), 30)
    await asyncio.wait_for(plain_ready.wait(), 30)
    assert events[0].ready.flagged_audio_seconds == 5.0
    # the stereo example's first 16 s: party B (machine-made) speaks at 12.6-14.8 s
    with wave.open(str(EXAMPLES / "spoof_call_stereo.wav")) as src, \
            wave.open(str(tmp_path / "call.wav"), "wb") as dst:
        dst.setparams(src.getparams())
        dst.writeframes(src.readframes(16 * src.getframerate()))
    sent = file_stream(tmp_path / "call.wav", split=True, call_id="feed-1")
    sent.config.platform = "asterisk"
    sent.config.interim_results = False  # the feed has windows whatever the client asked
    async with AsyncDetectionClient(target, token=STREAM) as client:
        own = [r async for r in client.stream(sent.config, sent.chunks)]
    await wait_until(lambda: any(e.HasField("closed") for e in events), "the close", 30)
    await wait_until(lambda: any(e.HasField("closed") for e in plain), "the close", 30)
    watcher.cancel()
    plain_watcher.cancel()
    call = [e for e in events if e.stream_id]
    clips = [e.flagged_audio for e in call if e.HasField("flagged_audio")]
    call = [e for e in call if not e.HasField("flagged_audio")]
    kinds = [e.WhichOneof("event") for e in call]
    assert kinds[0] == "opened" and kinds[-2:] == ["summary", "closed"], kinds
    opened = call[0].opened
    assert (opened.platform, opened.rpc, list(opened.speakers)) == (
        "asterisk", "StreamDetect", ["A", "B"])
    assert opened.channel_mode == pb.CHANNEL_MODE_SPLIT and opened.model
    assert {e.call_id for e in call} == {"feed-1"} and len({e.stream_id for e in call}) == 1
    windows = [e.window for e in call if e.HasField("window")]
    summary = next(r.summary for r in own if r.HasField("summary"))
    assert len(windows) == summary.windows_scored  # every window, though the client has none
    assert not any(r.HasField("window") for r in own)
    assert kinds.count("verdict") == len(windows)  # the running verdict after each window
    alerts = [e.alert for e in call if e.HasField("alert")]
    assert [a.speaker for a in alerts] == ["B"]
    assert alerts == [r.alert for r in own if r.HasField("alert")]
    assert call[-2].summary == summary and call[-1].closed.status == "OK"
    times = [e.server_time for e in call]
    assert times == sorted(times)

    # the alert's audio: its last 3 s (the watcher's cap, under the server's 5 s), party B's
    # own channel, as the server heard it
    assert len(clips) == 1 and clips[0].speaker == "B"
    clip, alert = clips[0], alerts[0]
    rate = clip.sample_rate_hz
    assert (clip.alert_start_seconds, clip.alert_end_seconds) == (
        alert.start_seconds, alert.end_seconds)
    assert clip.end_seconds == pytest.approx(alert.end_seconds, abs=1 / rate)
    assert clip.start_seconds == pytest.approx(
        max(alert.start_seconds, alert.end_seconds - 3.0), abs=1 / rate)
    got = np.frombuffer(clip.audio, "<i2").astype(np.float32) / 32767
    assert got.shape[0] == round((clip.end_seconds - clip.start_seconds) * rate)
    source, source_rate = soundfile.read(tmp_path / "call.wav", dtype="float32",
                                         always_2d=True)
    party_b = resample(source[:, 1], source_rate, rate)
    first = round(clip.start_seconds * rate)
    heard = party_b[first:first + got.shape[0]]
    assert np.corrcoef(heard, got)[0, 1] > 0.9  # B's voice, not A's, not silence
    party_a = resample(source[:, 0], source_rate, rate)[first:first + got.shape[0]]
    assert abs(np.corrcoef(party_a, got)[0, 1]) < 0.5
    # a watcher that did not ask gets the same call, and no audio
    assert any(e.HasField("alert") for e in plain)
    assert not any(e.HasField("flagged_audio") for e in plain)


async def test_a_late_watcher_gets_the_open_calls_first(admin_server: RunningServer) -> None:
    """A console that (re)connects mid-call learns of it from the snapshot."""
    target = f"127.0.0.1:{admin_server.port}"
    pcm = noise_pcm(8.0)
    chunks = [pcm[i:i + 800].tobytes() for i in range(0, pcm.shape[0], 800)]
    release = asyncio.Event()

    async def audio() -> AsyncIterator[bytes]:
        for i, chunk in enumerate(chunks):
            if i == len(chunks) // 2:
                await release.wait()  # hold the call open, half sent
            yield chunk

    config = pb.StreamConfig(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=8000,
                             call_id="late-1", platform="freeswitch")
    async with AsyncDetectionClient(target, token=STREAM) as client:
        responses = client.stream(config, audio())
        call = asyncio.create_task(anext(responses, None))
        servicer = admin_server.servicer
        await wait_until(lambda: any(f.verdicts for f in servicer.events.calls.values()),
                         "a scored window of the open call", 60)
        seen: list[pb.WatchCallsResponse] = []
        async with AsyncDetectionClient(target, token=ADMIN) as admin:
            async for event in admin.watch_calls(flagged_audio_seconds=10.0):
                seen.append(event)
                if event.HasField("ready"):
                    break
        release.set()
        await call
        async for _ in responses:
            pass
    assert all(e.snapshot for e in seen[:-1]) and not seen[-1].snapshot
    assert seen[0].HasField("opened") and seen[0].call_id == "late-1"
    assert seen[0].opened.platform == "freeswitch"
    assert any(e.HasField("verdict") for e in seen[:-1])
    assert seen[-1].ready.open_calls == 1
    assert seen[-1].ready.server_started_at > 0
    # asked for audio, from a server not started to send any: it says so, sends none
    assert seen[-1].ready.flagged_audio_seconds == 0
    await wait_until(lambda: not servicer.events.calls, "the call leaves the bus", 30)
    assert not servicer.events.watchers



def test_admin_token_must_differ_from_the_stream_token() -> None:
    assert parse_args(["--admin-token", "a", "--auth-token", "b"]).admin_token == "a"
    with pytest.raises(SystemExit):
        parse_args(["--admin-token", "same", "--auth-token", "same"])


async def test_a_watcher_that_falls_behind_is_ended_not_buffered() -> None:
    bus = EventBus("model 1", max_backlog=4)
    slow = bus.subscribe(include_windows=False)  # the ready marker is its first event
    for i in range(10):
        bus.publish(pb.WatchCallsResponse(stream_id=str(i)))
    assert slow.overflowed and slow.queue.qsize() == 5  # 4 events, then the end marker
    got = [e async for e in slow.events()]
    assert got[0].HasField("ready") and [e.stream_id for e in got[1:]] == ["0", "1", "2"]
