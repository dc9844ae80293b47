"""Protocol errors, bad credentials, abrupt disconnects and a dropped detector: each gets the
platform's proper close or error and a log line, and never disturbs another call. Real
sockets, the real plugins and a real server; the platforms' back ends are local fakes."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
import websockets
from structlog.testing import capture_logs

from bench.plugin_peers import (
    AUDIOHOOK_KEY,
    TWILIO_TOKEN,
    AudioHookClient,
    FakeHttp,
    Legs,
    as_frame,
    audiohook_call,
    back_ends,
    plugin_stack,
    twilio_headers,
    twilio_messages,
    ws_url,
)
from plugins.app import RunningPlugins
from plugins.delivery import SpoofAlert
from plugins.webhook import WebhookSender, verify
from server.app import RunningServer
from tests.conftest import free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import noise_pcm, serving, wait_until


@pytest.fixture
async def plugins(server: RunningServer) -> AsyncIterator[RunningPlugins]:
    async with back_ends() as (ami, http), plugin_stack(server.port, ami, http) as running:
        yield running


def _noise_legs(seconds: float) -> Legs:
    pcm = noise_pcm(seconds, channels=2)
    return Legs(np.ascontiguousarray(pcm[:, 0]), np.ascontiguousarray(pcm[:, 1]))


async def _audiosocket(port: int, data: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    writer.write_eof()  # Asterisk closed its side: a frame cut short stays cut short
    received = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return received


async def _ws_close_code(url: str, messages: list[Any], **kwargs: Any) -> int | None:
    async with websockets.connect(url, **kwargs) as w:
        for m in messages:
            await w.send(m)
        with pytest.raises(websockets.ConnectionClosed):
            async with asyncio.timeout(10):
                while True:
                    await w.recv()
        return w.close_code


def _protocol_errors(logs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(e["plugin_name"], e["reason"]) for e in logs if e["event"] == "protocol error"]


async def test_audiosocket_errors_get_an_error_frame(plugins: RunningPlugins) -> None:
    port = plugins.ports["audiosocket"]
    uid = as_frame(0x01, uuid.uuid4().bytes)
    slin = as_frame(0x10, bytes(320))
    error = as_frame(0xFF)
    with capture_logs() as logs:
        assert await _audiosocket(port, slin) == error  # audio before the UUID
        assert await _audiosocket(port, uid + as_frame(0x42, b"x")) == error  # unknown type
        assert await _audiosocket(port, as_frame(0x01, bytes(15))) == error  # bad UUID length
        assert await _audiosocket(port, uid + as_frame(0x10, bytes(321))) == error  # odd slin
        # length field says 320, the connection ends after 100 bytes
        assert await _audiosocket(port, uid + b"\x10\x01\x40" + bytes(100)) == error
    reasons = [e["reason"] for e in logs if e["event"] == "protocol error"]
    assert reasons == ["sequence", "unknown_type", "length", "length", "length"]


async def test_twilio_errors_close_the_socket(plugins: RunningPlugins) -> None:
    url = ws_url(plugins, "/twilio")
    start = twilio_messages("CA1", "MZ1", "AC1")["start"]
    media = {"event": "media", "media": {"track": "inbound", "payload": "AAAA"}}
    signed = {"additional_headers": twilio_headers(url, TWILIO_TOKEN)}
    with capture_logs() as logs:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers={"X-Twilio-Signature": "x"}):
                pass
        assert refused.value.response.status_code == 403
        assert await _ws_close_code(url, [json.dumps(media)], **signed) == 1002
        assert await _ws_close_code(url, [json.dumps({"event": "nope"})], **signed) == 1002
        assert await _ws_close_code(url, ["{not json"], **signed) == 1007
        bad = {"event": "media", "media": {"track": "inbound", "payload": "***"}}
        assert await _ws_close_code(url, [json.dumps(start), json.dumps(bad)], **signed) == 1007
    assert [e["event"] for e in logs if "X-Twilio-Signature" in e["event"]] == [
        "bad X-Twilio-Signature: upgrade refused"]
    reasons = [e["reason"] for e in logs if e["event"] == "protocol error"]
    assert reasons == ["sequence", "unknown_type", "malformed", "malformed"]


async def test_freeswitch_errors_close_the_socket(plugins: RunningPlugins) -> None:
    url = ws_url(plugins, "/fork")
    meta = json.dumps({"uuid": str(uuid.uuid4()), "sampleRate": 8000, "mixType": "stereo"})
    with capture_logs() as logs:
        assert await _ws_close_code(url, [bytes(640)]) == 1008  # audio before metadata
        assert await _ws_close_code(url, ["{not json"]) == 1007
        assert await _ws_close_code(url, [json.dumps({"sampleRate": 11025})]) == 1007
        assert await _ws_close_code(url, [meta, bytes(642)]) == 1007  # not whole stereo samples
    reasons = [e["reason"] for e in logs if e["event"] == "protocol error"]
    assert reasons == ["sequence", "malformed", "format", "length"]


async def _audiohook_error(url: str, action: str) -> dict[str, Any]:
    headers = {"X-API-KEY": AUDIOHOOK_KEY}
    async with websockets.connect(url, additional_headers=headers) as w:
        client = AudioHookClient(w)
        if action == "audio_before_open":
            await w.send(bytes(320))
        else:
            await client.open(str(uuid.uuid4()))
            if action == "unknown":
                await client.send("teleport")
            else:  # a seq gap
                client.seq += 1
                await client.send("ping")
        disconnect = await client.expect("disconnect")
        await client.send("close", {"reason": "disconnect"})
        await client.expect("closed")
        return disconnect


async def test_audiohook_errors_get_disconnect(plugins: RunningPlugins) -> None:
    url = ws_url(plugins, "/audiohook")
    with capture_logs() as logs:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(url, additional_headers={"X-API-KEY": "wrong"}):
                pass
        assert refused.value.response.status_code == 401
        for action in ("audio_before_open", "unknown", "seq_gap"):
            message = await _audiohook_error(url, action)
            assert message["parameters"]["reason"] == "error"
    reasons = [e["reason"] for e in logs if e["event"] == "protocol error"]
    assert reasons == ["sequence", "unknown_type", "sequence"]
    assert [e["reason"] for e in logs if e["event"] == "upgrade refused"] == ["bad X-API-KEY"]


async def test_audiohook_ping_pause_resume(plugins: RunningPlugins) -> None:
    url = ws_url(plugins, "/audiohook")
    async with websockets.connect(url, additional_headers={"X-API-KEY": AUDIOHOOK_KEY}) as w:
        client = AudioHookClient(w)
        opened = await client.open(str(uuid.uuid4()))
        assert opened["parameters"]["media"][0]["channels"] == ["external", "internal"]
        await client.send("ping")
        pong = await client.expect("pong")
        assert (pong["seq"], pong["clientseq"]) == (2, 2)
        await client.send("paused")
        await w.send(bytes(320))
        await client.send("resumed")
        await client.send("close", {"reason": "end"})
        closed = await client.expect("closed")
        assert closed["clientseq"] == 5


async def test_errors_and_disconnects_never_touch_other_calls(plugins: RunningPlugins) -> None:
    """A healthy AudioHook call runs while every plugin sees bad and broken connections."""
    url = ws_url(plugins, "/audiohook")
    healthy = asyncio.create_task(
        audiohook_call(url, AUDIOHOOK_KEY, "healthy", _noise_legs(4.0)))
    port = plugins.ports["audiosocket"]
    with capture_logs() as logs:
        await _audiosocket(port, as_frame(0x42))
        # abrupt disconnects mid-call, one per plugin
        def opened(plugin: str) -> bool:
            return any(e["event"] == "call open" and e.get("plugin") == plugin for e in logs)

        _r, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(as_frame(0x01, uuid.uuid4().bytes) + as_frame(0x10, bytes(320)) * 10)
        await writer.drain()
        await wait_until(lambda: opened("audiosocket"), "AudioSocket call open")
        writer.transport.abort()
        signed = {"additional_headers": twilio_headers(ws_url(plugins, "/twilio"), TWILIO_TOKEN)}
        start = twilio_messages("CA2", "MZ2", "AC1")["start"]
        async with websockets.connect(ws_url(plugins, "/twilio"), **signed) as w:
            await w.send(json.dumps(start))
            await wait_until(lambda: opened("twilio"), "Twilio call open")
            w.transport.abort()
        messages = await healthy
        await wait_until(lambda: len([e for e in logs if e["event"] == "call closed"]) >= 3,
                         "the broken calls closed")
    assert [m["type"] for m in messages] == ["opened", "closed"]
    events = [e["event"] for e in logs]
    # AudioSocket: Asterisk ends every call by closing the socket, so a closed socket after
    # audio is a hangup (issue 10); a Twilio socket torn before `stop` is a lost connection,
    # and what it had sent is still scored (issue 13).
    assert "connection lost before stop: call ended" in events
    assert "hangup" in events or "connection lost" in events


async def test_dropped_detector_closes_every_call_cleanly(detector: Any) -> None:
    """A detector gone for longer than ``reconnect_seconds`` (1 s here, 30 s shipped: the
    reconnect itself is tested in test_plugins_timeouts.py) ends each call's fork cleanly."""
    async with serving(detector) as doomed, back_ends() as (ami, http), \
            plugin_stack(doomed.port, ami, http, reconnect_seconds=1.0) as plugins:
        port = plugins.ports["audiosocket"]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(as_frame(0x01, uuid.uuid4().bytes))
        fork = await websockets.connect(ws_url(plugins, "/fork"))
        await fork.send(json.dumps({"uuid": "fs-1", "sampleRate": 8000, "mixType": "mono"}))
        hook = await websockets.connect(ws_url(plugins, "/audiohook"),
                                        additional_headers={"X-API-KEY": AUDIOHOOK_KEY})
        hook_client = AudioHookClient(hook)
        await hook_client.open("conv-1")

        async def feed() -> None:
            for _ in range(100):
                writer.write(as_frame(0x10, bytes(320)))
                await fork.send(bytes(320))
                await hook.send(bytes(320))
                await asyncio.sleep(0.02)

        with capture_logs() as logs:
            feeding = asyncio.create_task(feed())
            await asyncio.sleep(0.5)
            await doomed.stop(0)  # the detector goes away mid-call
            async with asyncio.timeout(10):
                assert await reader.read() == as_frame(0x00)  # AudioSocket: hangup
                disconnect = await hook_client.expect("disconnect")
                await hook_client.send("close", {"reason": "disconnect"})
                await hook_client.expect("closed")
                with pytest.raises(websockets.ConnectionClosed):
                    while True:
                        await fork.recv()
            feeding.cancel()
            await wait_until(lambda: len([e for e in logs if e["event"] == "call closed"]) >= 3,
                             "every call closed")
        assert fork.close_code == 1011
        assert disconnect["parameters"]["info"] == "detector unavailable"
        failed = {e["plugin"]: e["reason"] for e in logs if e["event"] == "detector error"}
        assert failed == dict.fromkeys(["audiosocket", "freeswitch", "audiohook"],
                                       "detector unreachable for 1 s")
        # a call dropped at its end names what ended it, not the close that followed
        # ("connection closed without a hangup"). The AudioHook call is always aborted after
        # its close; an AudioSocket or FreeSWITCH call is too when a frame comes in between
        # the failure and our close of the fork (else it ends at the socket's close)
        aborted = {e["plugin"]: e["reason"] for e in logs if e["event"] == "call aborted"}
        assert "audiohook" in aborted, aborted
        assert set(aborted.values()) == {"detector unreachable for 1 s"}, aborted
        writer.close()
        await fork.close()
        await hook.close()


async def test_unreachable_detector_closes_the_call() -> None:
    async with back_ends() as (ami, http), plugin_stack(free_port(), ami, http) as plugins:
        with capture_logs() as logs:
            code = await _ws_close_code(ws_url(plugins, "/fork"), [
                json.dumps({"uuid": "fs-2", "sampleRate": 8000, "mixType": "mono"}), bytes(320)])
        assert code == 1011
        assert [e["plugin"] for e in logs if e["event"] == "detector error"] == ["freeswitch"]


ALERT = SpoofAlert("audiosocket", "call-1", "caller", 0.91, 3.0, 7.0)


async def test_webhook_is_signed_retried_and_bounded() -> None:
    http = await FakeHttp().start()
    try:
        sender = WebhookSender([f"{http.url}/hook"], "k", max_attempts=3, backoff_seconds=0.01)
        http.statuses = [500, 503]
        assert await sender.send(ALERT.to_dict()) == {f"{http.url}/hook": True}
        assert len(http.requests) == 3
        body = http.requests[-1].body
        assert verify("k", body, http.requests[-1].headers["X-Callshield-Signature"])
        assert json.loads(body)["speaker"] == "caller"
        http.requests.clear()
        http.statuses = [500, 500, 500, 500]
        with capture_logs() as logs:
            assert not (await sender.send(ALERT.to_dict()))[f"{http.url}/hook"]
        assert len(http.requests) == 3 and "webhook gave up" in [e["event"] for e in logs]
        http.requests.clear()
        http.statuses = [400]
        assert not (await sender.send(ALERT.to_dict()))[f"{http.url}/hook"]
        assert len(http.requests) == 1  # a 4xx is not retried
    finally:
        await http.stop()




async def test_audiosocket_accepts_only_allowed_sources() -> None:
    """AudioSocket has no authentication: ``--audiosocket-allow`` limits who may stream."""
    from ipaddress import ip_network

    from plugins.app import PluginSettings, start_plugins
    from plugins.bridge import DetectorLink

    for allow, accepted in ((ip_network("10.0.0.0/8"),), False), (
            (ip_network("10.0.0.0/8"), ip_network("127.0.0.1/32")), True):
        running = await start_plugins(
            PluginSettings(audiosocket="127.0.0.1:0", audiosocket_allow=allow),
            DetectorLink(f"127.0.0.1:{free_port()}"))
        try:
            with capture_logs() as logs:
                reader, writer = await asyncio.open_connection(
                    "127.0.0.1", running.ports["audiosocket"])
                writer.write(as_frame(0x01, uuid.uuid4().bytes) + as_frame(0x10, bytes(320)))
                await writer.drain()
                if not accepted:  # closed at once: EOF, or a reset for the unread frames
                    try:
                        assert await asyncio.wait_for(reader.read(), 10) == b""
                    except ConnectionResetError:
                        pass
                else:
                    await wait_until(lambda: any(e["event"] == "call open" for e in logs),
                                     "the call opened")
                writer.close()
        finally:
            await running.stop(grace_seconds=1)
        refused = [e for e in logs
                   if e["event"] == "connection refused: source not in --audiosocket-allow"]
        assert (refused == []) is accepted
        assert [e["source"] for e in refused] == ([] if accepted else ["127.0.0.1"])


async def test_audiosocket_that_never_sends_audio_opens_no_stream(plugins: RunningPlugins) -> None:
    """Asterisk's 2 s rule, as a real Asterisk showed it (issue 10): a fork started before
    the caller is answered sends its UUID, then nothing; Asterisk gives up after 2000 ms and
    closes the socket. That is a broken dialplan, logged as a lost connection, and no
    detection stream was opened for it."""
    with capture_logs() as logs:
        reader, writer = await asyncio.open_connection("127.0.0.1",
                                                       plugins.ports["audiosocket"])
        writer.write(as_frame(0x01, uuid.uuid4().bytes))
        await writer.drain()
        await asyncio.sleep(2.0)  # Asterisk: "Reached timeout after 2000 ms of no activity"
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b""
        writer.close()
        await wait_until(lambda: any(e["event"] == "connection lost" for e in logs),
                         "the lost connection logged")
    assert not [e for e in logs if e["event"] in ("call open", "hangup")]
