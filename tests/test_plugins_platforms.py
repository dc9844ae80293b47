"""Twilio and Genesys AudioHook as their real client code behaves.

Twilio signatures come from the ``twilio`` package's own ``RequestValidator`` (the library
Twilio's customers verify with), over the URL forms Twilio's back end produces (with and
without ``:443``, HMAC-SHA256 under a SharedKey). AudioHook requests are signed here exactly
as Genesys' reference client (purecloudlabs/audiohook-reference-implementation,
``client/src/clientwebsocket.ts`` + ``signature-builder.ts``) signs them, written out from
that algorithm rather than with the plugin's own code, and the probe and ``error`` messages
are the reference client's. The end-of-call tests use the real server: a silent track loses
no audio of the other, and every normal end sends a ``call_summary`` to the webhook.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import numpy as np
import pytest
import websockets
from structlog.testing import capture_logs
from twilio.request_validator import RequestValidator

from bench.plugin_peers import (
    FRAME,
    AudioHookClient,
    FakeHttp,
    twilio_messages,
)
from models.data.audio import mulaw_encode
from plugins.app import PluginSettings, RunningPlugins, start_plugins
from plugins.bridge import DetectorLink
from plugins.twilio import TwilioSettings
from plugins.webhook import WebhookSender
from server.app import RunningServer
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import noise_pcm, wait_until

TOKEN = "twilio-auth-token"
SHARED_KEY = "twilio-shared-key-secret"
STREAM_URL = "wss://calls.example.com/twilio"
API_KEY = "audiohook-api-key"
CLIENT_SECRET = base64.b64encode(b"audiohook client secret bytes!!").decode()
PROBE = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
async def http() -> AsyncIterator[FakeHttp]:
    http = await FakeHttp().start()
    yield http
    await http.stop()


async def _plugins(detector_port: int, http: FakeHttp, **twilio: Any) -> RunningPlugins:
    settings = PluginSettings(
        twilio="127.0.0.1:0/twilio", audiohook="127.0.0.1:0/audiohook",
        twilio_settings=TwilioSettings(auth_token=TOKEN, api_base=http.url, **twilio),
        audiohook_api_key=API_KEY, audiohook_client_secret=CLIENT_SECRET)
    webhook = WebhookSender([f"{http.url}/hook"], backoff_seconds=0.05)
    return await start_plugins(settings, DetectorLink(f"127.0.0.1:{detector_port}",
                                                  webhook=webhook))


@pytest.fixture
async def plugins(server: RunningServer, http: FakeHttp) -> AsyncIterator[RunningPlugins]:
    running = await _plugins(server.port, http, public_url=STREAM_URL)
    yield running
    await running.stop()


async def _upgrade(port: int, path: str, headers: dict[str, str]) -> int:
    """The HTTP status of a WebSocket upgrade (101 when accepted)."""
    async with aiohttp.ClientSession() as session:
        try:
            async with session.ws_connect(f"http://127.0.0.1:{port}{path}",
                                          headers=headers) as w:
                await w.close()
                return 101
        except aiohttp.WSServerHandshakeError as exc:
            return exc.status


# --- Twilio signatures, as RequestValidator computes them ---------------------------------

def _twilio_sig(url: str, secret: str = TOKEN, algorithm: str | None = None) -> str:
    return RequestValidator(secret).compute_signature(url, {}, algorithm)


async def test_twilio_accepts_the_stream_url_as_configured(plugins: RunningPlugins) -> None:
    port = plugins.ports["twilio"]
    for url in (STREAM_URL, "wss://calls.example.com:443/twilio"):
        assert await _upgrade(port, "/twilio", {"X-Twilio-Signature": _twilio_sig(url)}) == 101
    with capture_logs() as logs:
        # what the old base-URL reading signed: refused, and the log names the URL checked
        bad = _twilio_sig(STREAM_URL + "/twilio")
        assert await _upgrade(port, "/twilio", {"X-Twilio-Signature": bad}) == 403
    refusal = next(e for e in logs if e["event"] == "bad X-Twilio-Signature: upgrade refused")
    assert "wss://calls.example.com/twilio" in refusal["checked"]
    assert "--twilio-public-url" in refusal["hint"]


async def test_twilio_port_forms_query_and_base_url(server: RunningServer,
                                                    http: FakeHttp) -> None:
    """Twilio's back end signs with or without the default port; a base URL gets the path."""
    for public, signed, path in (
        ("wss://calls.example.com:443/twilio", STREAM_URL, "/twilio"),
        ("wss://calls.example.com", "wss://calls.example.com:443/twilio?site=eu",
         "/twilio?site=eu"),
        (STREAM_URL + "?site=eu", STREAM_URL + "?site=eu", "/twilio?site=eu"),
        (STREAM_URL, STREAM_URL + "?site=eu", "/twilio?site=eu"),
    ):
        running = await _plugins(server.port, http, public_url=public)
        try:
            status = await _upgrade(running.ports["twilio"], path,
                                    {"X-Twilio-Signature": _twilio_sig(signed)})
        finally:
            await running.stop()
        assert status == 101, (public, signed)


async def test_twilio_host_header_forms_and_trusted_proxy(server: RunningServer,
                                                          http: FakeHttp) -> None:
    sig = _twilio_sig(STREAM_URL)
    forwarded = {"X-Forwarded-Host": "calls.example.com", "X-Forwarded-Proto": "https",
                 "X-Twilio-Signature": sig}
    plain = await _plugins(server.port, http)
    proxied = await _plugins(server.port, http, trust_proxy=True)
    try:
        for host in ("calls.example.com", "calls.example.com:443"):
            headers = {"Host": host, "X-Twilio-Signature": sig}
            assert await _upgrade(plain.ports["twilio"], "/twilio", headers) == 101, host
        # behind a proxy the Host header is the proxy's; its X-Forwarded-* count only if trusted
        assert await _upgrade(plain.ports["twilio"], "/twilio", forwarded) == 403
        assert await _upgrade(proxied.ports["twilio"], "/twilio", forwarded) == 101
    finally:
        await plain.stop()
        await proxied.stop()


async def test_twilio_hmac_sha256_signatures(server: RunningServer, http: FakeHttp) -> None:
    settings = {"X-Twilio-Webhooks-Signature-Settings": "key=webhooks_sharedkey_1,"
                                                        "algorithm=HMAC_SHA256"}
    running = await _plugins(server.port, http, public_url=STREAM_URL, signing_key=SHARED_KEY)
    port = running.ports["twilio"]
    try:
        good = _twilio_sig(STREAM_URL, SHARED_KEY, "HMAC_SHA256")
        assert await _upgrade(port, "/twilio", settings | {"X-Twilio-Signature": good}) == 101
        sha1 = _twilio_sig(STREAM_URL, SHARED_KEY)
        assert await _upgrade(port, "/twilio", settings | {"X-Twilio-Signature": sha1}) == 403
        other = {"X-Twilio-Webhooks-Signature-Settings": "algorithm=HMAC_SHA512"}
        assert await _upgrade(port, "/twilio", other | {"X-Twilio-Signature": good}) == 403
        # without the settings header it is the Auth Token's HMAC-SHA1, as before
        sha1_token = {"X-Twilio-Signature": _twilio_sig(STREAM_URL)}
        assert await _upgrade(port, "/twilio", sha1_token) == 101
    finally:
        await running.stop()


# --- Twilio: a silent track, a socket closed without stop ---------------------------------

def _summaries(http: FakeHttp) -> list[dict[str, Any]]:
    events = [json.loads(r.body) for r in http.matching("/hook")]
    return [e for e in events if e.get("type") == "call_summary"]


async def _twilio_stream(port: int, call_sid: str, caller: np.ndarray,
                         send_stop: bool) -> None:
    """Both tracks declared, only the inbound one sends media (Twilio's outbound track is
    silent while nothing is played to the caller); sent as fast as the socket takes it."""
    first = twilio_messages(call_sid, "MZ" + uuid.uuid4().hex, "ACtest")
    url = f"ws://127.0.0.1:{port}/twilio"
    headers = {"X-Twilio-Signature": _twilio_sig(STREAM_URL)}
    async with websockets.connect(url, additional_headers=headers) as w:
        await w.send(json.dumps(first["connected"]))
        await w.send(json.dumps(first["start"]))
        for chunk, i in enumerate(range(0, len(caller), FRAME), start=1):
            payload = base64.b64encode(mulaw_encode(caller[i:i + FRAME]).tobytes()).decode()
            await w.send(json.dumps({"event": "media", "media": {
                "track": "inbound", "chunk": str(chunk), "timestamp": str(chunk * 20),
                "payload": payload}}))
        if send_stop:
            await w.send(json.dumps({"event": "stop", "stop": {"callSid": call_sid}}))
            async for _ in w:
                pass


@pytest.mark.parametrize("send_stop", [True, False], ids=["stop", "closed-without-stop"])
async def test_twilio_silent_track_loses_nothing_and_summary_reaches_webhook(
        plugins: RunningPlugins, http: FakeHttp, send_stop: bool) -> None:
    seconds = 4.0  # sent at once: under the bridge's 5 s stall bound
    caller = noise_pcm(seconds)
    call_sid = "CA" + uuid.uuid4().hex
    with capture_logs() as logs:
        await _twilio_stream(plugins.ports["twilio"], call_sid, caller, send_stop)
        await wait_until(lambda: _summaries(http), "the call_summary webhook", 60)
    (summary,) = _summaries(http)
    assert summary["call_id"] == call_sid and summary["plugin"] == "twilio"
    assert summary["audio_seconds"] == pytest.approx(seconds, abs=0.001)
    assert [s["speaker"] for s in summary["speakers"]] == ["caller"]  # no 0 s agent entry
    assert not [e for e in logs if e["event"] in ("call aborted", "connection lost before stop")]


# --- AudioHook: signatures as the reference client makes them -----------------------------

def _reference_signed_headers(
    port: int, path: str = "/audiohook", *, secret: str = CLIENT_SECRET,
    created: int | None = None, nonce: str | None = None, organization: str | None = None,
) -> dict[str, str]:
    """The upgrade headers of the reference client with ``--client-secret``: the signature
    base is one ``"name": value`` line per component, then ``"@signature-params"``, joined by
    newlines; HMAC-SHA256 under the base64-decoded secret; nonce 18 random bytes, base64;
    lifetime 30 s."""
    headers = {"audiohook-organization-id": organization or str(uuid.uuid4()),
               "audiohook-session-id": str(uuid.uuid4()),
               "audiohook-correlation-id": str(uuid.uuid4()), "x-api-key": API_KEY}
    created = int(time.time()) if created is None else created
    nonce = nonce or base64.b64encode(secrets.token_bytes(18)).decode()
    names = ["@request-target", "@authority", *headers]
    params = (f'({" ".join(json.dumps(n) for n in names)});keyid="{API_KEY}";nonce="{nonce}";'
              f'alg="hmac-sha256";created={created};expires={created + 30}')
    values = [path, f"127.0.0.1:{port}", *headers.values()]
    lines = [f'"{n}": {v}' for n, v in zip(names, values, strict=True)]
    base = "\n".join([*lines, f'"@signature-params": {params}'])
    digest = hmac.new(base64.b64decode(secret), base.encode(), hashlib.sha256).digest()
    return headers | {"signature-input": f"sig1={params}",
                      "signature": f"sig1=:{base64.b64encode(digest).decode()}:"}


async def test_audiohook_verifies_message_signatures(plugins: RunningPlugins) -> None:
    port = plugins.ports["audiohook"]
    assert await _upgrade(port, "/audiohook", _reference_signed_headers(port)) == 101
    wrong_secret = base64.b64encode(b"another secret").decode()
    nonce = base64.b64encode(secrets.token_bytes(18)).decode()
    replayed = _reference_signed_headers(port, nonce=nonce)
    with capture_logs() as logs:
        for headers in (
            _reference_signed_headers(port, secret=wrong_secret),
            _reference_signed_headers(port, created=int(time.time()) - 60),  # too old
            _reference_signed_headers(port, path="/elsewhere"),  # another request target
            {"x-api-key": API_KEY, "audiohook-session-id": str(uuid.uuid4())},  # unsigned
        ):
            assert await _upgrade(port, "/audiohook", headers) == 401
        assert await _upgrade(port, "/audiohook", replayed) == 101
        assert await _upgrade(port, "/audiohook", replayed) == 401
    reasons = [e["reason"] for e in logs if e["event"] == "upgrade refused"]
    assert len(reasons) == 5
    assert reasons[0] == "bad signature: signature does not match (client secret?)"
    assert reasons[1] == "bad signature: signature expired"
    assert reasons[-1] == "bad signature: nonce replayed"


async def _audiohook_session(port: int, headers: dict[str, str]) -> AudioHookClient:
    w = await websockets.connect(f"ws://127.0.0.1:{port}/audiohook", additional_headers=headers)
    return AudioHookClient(w, session_id=headers["audiohook-session-id"])


async def test_audiohook_open_must_name_the_signed_organization(
        plugins: RunningPlugins) -> None:
    port = plugins.ports["audiohook"]
    client = await _audiohook_session(port, _reference_signed_headers(port))
    await client.send("open", {"organizationId": str(uuid.uuid4()),
                               "conversationId": str(uuid.uuid4()), "media": []})
    disconnect = await client.expect("disconnect")
    assert disconnect["parameters"]["reason"] == "unauthorized"
    await client.w.close()


async def test_audiohook_connection_probe(plugins: RunningPlugins) -> None:
    """The reference client's ``--connection-probe``: open with conversation id all zeros,
    one empty audio frame, close. Answered like a call, with no detection stream."""
    port = plugins.ports["audiohook"]
    organization = str(uuid.uuid4())
    with capture_logs() as logs:
        client = await _audiohook_session(
            port, _reference_signed_headers(port, organization=organization))
        await client.send("open", {
            "organizationId": organization, "conversationId": PROBE,
            "participant": {"id": PROBE, "ani": "", "aniName": "", "dnis": ""},
            "media": [{"type": "audio", "format": "PCMU", "channels": ["external", "internal"],
                       "rate": 8000}]})
        opened = await client.expect("opened")
        await client.w.send(b"")
        await client.send("ping")
        await client.expect("pong")
        await client.send("close", {"reason": "end"})
        await client.expect("closed")
        await client.w.close()
    assert opened["parameters"]["media"][0]["channels"] == ["external", "internal"]
    events = [e["event"] for e in logs]
    assert "connection probe" in events
    assert "call open" not in events and "protocol error" not in events


async def test_audiohook_client_error_update_discarded_are_logged(
        plugins: RunningPlugins) -> None:
    port = plugins.ports["audiohook"]
    organization = str(uuid.uuid4())
    with capture_logs() as logs:
        client = await _audiohook_session(
            port, _reference_signed_headers(port, organization=organization))
        await client.send("open", {
            "organizationId": organization, "conversationId": str(uuid.uuid4()),
            "participant": {"id": str(uuid.uuid4()), "ani": "+15550100", "aniName": "J",
                            "dnis": "+15550199"},
            "media": [{"type": "audio", "format": "PCMU", "channels": ["external"],
                       "rate": 8000}]})
        await client.expect("opened")
        await client.w.send(mulaw_encode(noise_pcm(0.2)).tobytes())
        await client.send("discarded", {"start": "PT0.2S", "discarded": "PT1.5S"})
        await client.send("update", {"language": "de-DE"})
        await client.send("error", {"code": 429, "message": "too many requests", "retryAfter":
                                    "PT1S"})
        await client.send("close", {"reason": "end"})
        await client.expect("closed", 30)
        await client.w.close()
    by_event = {e["event"]: e for e in logs}
    assert by_event["client error"]["code"] == "429"
    assert by_event["client error"]["message"] == "too many requests"
    assert by_event["client discarded audio"]["discarded"] == "PT1.5S"
    assert by_event["client update"]["parameters"] == ["language"]
    assert "+15550100" not in repr(logs)  # participant data is never logged


async def test_audiohook_pause_is_filled_with_silence(plugins: RunningPlugins,
                                                     http: FakeHttp) -> None:
    """Genesys sends nothing while paused: the call's time goes on (silence in its place),
    so a pause longer than the server's idle timeout cannot end detection."""
    port = plugins.ports["audiohook"]
    organization, conversation = str(uuid.uuid4()), str(uuid.uuid4())
    client = await _audiohook_session(
        port, _reference_signed_headers(port, organization=organization))
    await client.send("open", {
        "organizationId": organization, "conversationId": conversation,
        "media": [{"type": "audio", "format": "PCMU", "channels": ["external"], "rate": 8000}]})
    await client.expect("opened")
    await client.w.send(mulaw_encode(noise_pcm(1.0)).tobytes())
    await client.send("paused")
    await asyncio.sleep(1.5)
    await client.send("resumed")
    await client.w.send(mulaw_encode(noise_pcm(1.0)).tobytes())
    await client.send("close", {"reason": "end"})
    await client.expect("closed", 30)
    await client.w.close()
    await wait_until(lambda: _summaries(http), "the call_summary webhook", 60)
    (summary,) = _summaries(http)
    assert summary["call_id"] == conversation
    assert 3.2 <= summary["audio_seconds"] <= 2.0 + 1.5 + 3.0  # audio + the pause (+ slack)


# --- FreeSWITCH: every mix type's summary covers the fork's whole life --------------------

async def _fork(port: int, call_uuid: str, mix: str, pcm: np.ndarray) -> None:
    """mod_audio_fork's side: the metadata, then L16 in 20 ms frames at real time, as the
    module sends them (``stereo``: the caller on channel 0, a silent agent on 1), then
    close."""
    channels = 2 if mix == "stereo" else 1
    frames = np.zeros((len(pcm), channels), np.int16)
    frames[:, 0] = pcm.reshape(-1)
    url = f"ws://127.0.0.1:{port}/fork"
    start = time.monotonic()
    async with websockets.connect(url, subprotocols=[
            websockets.Subprotocol("audio.drachtio.org")]) as w:
        await w.send(json.dumps({"uuid": call_uuid, "sampleRate": 8000, "mixType": mix}))
        for n, i in enumerate(range(0, len(frames), FRAME)):
            await w.send(frames[i:i + FRAME].astype("<i2").tobytes())
            await asyncio.sleep(max(0.0, start + (n + 1) * FRAME / 8000 - time.monotonic()))


@pytest.mark.parametrize("mix", ["mono", "stereo", "mixed"])
async def test_freeswitch_summary_covers_the_whole_fork(
        shipped_server: RunningServer, http: FakeHttp, mix: str) -> None:
    """``audio_seconds`` is the audio sent, to the sample, whatever the mix type: mono is one
    known party, stereo two (the agent silent), mixed one channel the server diarizes. (A real
    FreeSWITCH's stereo and mixed forks came out about 2 s shorter than the fork's life:
    audio its media bug never produced, docs/platforms/freeswitch.md; a plugin or server
    that dropped a partial last frame, a resampler tail or counted stereo bytes as mono
    fails here.)"""
    seconds = 4.03125  # 32250 samples: 201 whole 20 ms frames and a last one of 90 samples
    settings = PluginSettings(freeswitch="127.0.0.1:0/fork")
    webhook = WebhookSender([f"{http.url}/hook"], backoff_seconds=0.05)
    running = await start_plugins(settings, DetectorLink(f"127.0.0.1:{shipped_server.port}",
                                                         webhook=webhook))
    try:
        call_uuid = str(uuid.uuid4())
        await _fork(running.ports["freeswitch"], call_uuid, mix, noise_pcm(seconds))
        await wait_until(lambda: _summaries(http), "the call_summary webhook", 60)
    finally:
        await running.stop()
    (summary,) = _summaries(http)
    assert summary["call_id"] == call_uuid and summary["plugin"] == "freeswitch"
    assert summary["audio_seconds"] == pytest.approx(seconds, abs=0.001), summary
