"""Behaviour the README and docstrings promise that no other test pinned: queue-depth
admission, a dead queue as UNAVAILABLE, Detect with offline diarization over gRPC, the
webhook's documented retry policy, and ``python -m plugins serve`` configuration."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc
import pytest

from bench.plugin_peers import FakeHttp
from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from plugins.__main__ import parser, settings_from
from plugins.asterisk import AmiTarget
from plugins.webhook import WebhookSender
from server.queue.base import QueueUnavailable, WindowJob, WindowScore
from server.queue.inprocess import InProcessQueue
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    EXAMPLES,
    collect,
    linear16_chunks,
    noise_pcm,
    requests,
    serving,
    stream_config,
    wait_until,
)


class HeldQueue(InProcessQueue):
    """Holds every window until released: a backed-up queue whose depth the test sees."""

    def __init__(self, detector: Detector) -> None:
        super().__init__(detector)
        self.release = asyncio.Event()
        self.held = 0

    def depth(self) -> int:
        return self.held + super().depth()

    async def submit(self, job: WindowJob) -> WindowScore:
        self.held += 1
        await self.release.wait()
        self.held -= 1
        return await super().submit(job)


class DeadQueue(InProcessQueue):
    """Healthy at admission, then refuses every window, as a broker that just went away."""

    async def submit(self, job: WindowJob) -> WindowScore:
        raise QueueUnavailable("broker unreachable")


async def test_queue_depth_over_the_limit_refuses_new_streams(detector: Detector) -> None:
    queue = HeldQueue(detector)
    async with serving(detector, queue, max_queue_depth=2) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        first = stub.StreamDetect(iter(requests(stream_config(call_id="busy"),
                                                linear16_chunks(noise_pcm(6.0)))))
        await wait_until(lambda: queue.depth() > 2, "three windows waiting")
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await collect(stub, requests(stream_config(call_id="late"), []))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "queue over capacity" in (info.value.details() or "")
        queue.release.set()
        responses = [r async for r in first]
        assert responses[-1].summary.windows_scored == 6  # the admitted stream lost nothing


def _sync_stream(port: int) -> grpc.RpcError:
    """The sync client: grpcio's asyncio client can report a status the server sends while
    the client is still writing as INTERNAL (grpc/grpc#36066); the sync one reports it."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        try:
            for _ in stub.StreamDetect(iter(requests(stream_config(),
                                                     linear16_chunks(noise_pcm(2.0)))),
                                       timeout=60):
                pass
        except grpc.RpcError as exc:
            return exc
    raise AssertionError("the stream succeeded on a dead queue")


async def test_unavailable_queue_is_unavailable_to_the_client(detector: Detector) -> None:
    async with serving(detector, DeadQueue(detector)) as running:
        error = await asyncio.to_thread(_sync_stream, running.port)
    assert error.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    assert "broker unreachable" in (error.details() or "")  # type: ignore[attr-defined]


@pytest.fixture
async def offline_server(detector: Detector) -> AsyncIterator[object]:
    async with serving(detector, diarization="on") as running:
        yield running


async def test_detect_diarizes_a_two_party_recording(offline_server: object) -> None:
    """Detect on a MIXED recording runs offline diarization first: the bona fide example
    (two genuine voices) comes back with more than one speaker and no spoof verdict."""
    port = offline_server.port  # type: ignore[attr-defined]
    audio = (EXAMPLES / "bonafide_call.wav").read_bytes()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        result = await stub.Detect(pb.DetectRequest(audio=audio, config=pb.StreamConfig(
            channel_mode=pb.CHANNEL_MODE_MIXED, call_id="offline")), timeout=300)
    summary = result.summary
    speakers = [s.speaker for s in summary.speakers]
    assert len(speakers) >= 2 and speakers[:2] == ["A", "B"]
    assert all(s.state != pb.SPEAKER_STATE_SPOOF_SUSPECTED for s in summary.speakers)
    assert {w.speaker for w in result.windows} <= set(speakers)


async def test_webhook_default_policy_retries_429_with_doubling_backoff() -> None:
    """The documented policy: 4 attempts, 0.5 s doubling backoff, 429 and 5xx retried."""
    sender = WebhookSender(["unused"])
    assert (sender.max_attempts, sender.backoff_seconds) == (4, 0.5)
    http = await FakeHttp().start()
    try:
        sender = WebhookSender([f"{http.url}/hook"], "k")
        http.statuses = [429, 429, 503]
        assert await sender.send({"call_id": "c", "plugin": "test"}) == {
            f"{http.url}/hook": True}
        assert len(http.requests) == 4
        stamps = [r.at for r in http.requests]
        gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
        # Lower bounds only (sleeps are at least this long on any machine).
        for gap, backoff in zip(gaps, (0.5, 1.0, 2.0), strict=True):
            assert gap >= backoff * 0.99, gaps
    finally:
        await http.stop()


def test_plugins_serve_reads_flags_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSHIELD_PLUGINS_AUDIOSOCKET", "127.0.0.1:9999")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_WEBHOOK", "http://a/hook,http://b/hook")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_AMI", "pbx:5038")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_ALERT_THRESHOLD", "0.7")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_TWILIO_SIGNING_KEY", "shared-key")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_TWILIO_TRUST_PROXY", "true")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_AUDIOHOOK_CLIENT_SECRET", "c2VjcmV0")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_AUDIOSOCKET_ALLOW", "10.1.2.0/24, 192.0.2.7")
    monkeypatch.setenv("CALLSHIELD_PLUGINS_RECONNECT_SECONDS", "12")
    args = parser().parse_args([
        "serve", "--slin-types", "0x12=16000", "--twilio", "127.0.0.1:8080/twilio",
        "--twilio-public-url", "wss://calls.example.com/twilio",
        "--twilio-alert-twiml", "<Response><Hangup/></Response>"])
    settings, detector = settings_from(args)
    assert settings.audiosocket == "127.0.0.1:9999" and settings.twilio == "127.0.0.1:8080/twilio"
    assert settings.slin_types[0x12] == 16000 and settings.slin_types[0x10] == 8000
    assert settings.twilio_settings.public_url == "wss://calls.example.com/twilio"
    assert settings.twilio_settings.alert_twiml == "<Response><Hangup/></Response>"
    assert settings.twilio_settings.signing_key == "shared-key"
    assert settings.twilio_settings.trust_proxy is True
    assert settings.audiohook_client_secret == "c2VjcmV0"
    assert [str(n) for n in settings.audiosocket_allow] == ["10.1.2.0/24", "192.0.2.7/32"]
    assert detector.reconnect_seconds == 12.0
    assert isinstance(settings.asterisk_alerts, AmiTarget)
    assert detector.alert_threshold == 0.7
    assert detector.webhook is not None
    assert detector.webhook.urls == ("http://a/hook", "http://b/hook")
    # A flag beats its environment variable.
    args = parser().parse_args(["serve", "--audiosocket", "127.0.0.1:1234"])
    assert settings_from(args)[0].audiosocket == "127.0.0.1:1234"


def test_listeners_bind_loopback_unless_told() -> None:
    """A bare port never exposes a listener to other machines (AudioSocket has no
    authentication; metrics describe calls)."""
    from plugins.addresses import parse_hostport, parse_listen_path
    from server import metrics
    from server.config import parse_args

    assert parse_hostport(":9092") == ("127.0.0.1", 9092)
    assert parse_hostport("9092") == ("127.0.0.1", 9092)
    assert parse_hostport("0.0.0.0:9092") == ("0.0.0.0", 9092)
    assert parse_listen_path(":8080/twilio") == ("127.0.0.1", 8080, "/twilio")
    config = parse_args(["--metrics-port", "9100"])
    assert metrics.listen_address(config.metrics_listen, config.metrics_port) == (
        "127.0.0.1", 9100)
    config = parse_args(["--metrics-listen", "0.0.0.0:9101"])
    assert metrics.listen_address(config.metrics_listen, config.metrics_port) == (
        "0.0.0.0", 9101)
    httpd = metrics.serve(0)
    try:
        assert httpd.server_address[0] == "127.0.0.1"
    finally:
        httpd.shutdown()
        httpd.server_close()
