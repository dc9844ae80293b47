"""The faults an independent client probed from outside (issue 31), each fixed and run again
through the real server: ``python -m server`` as a process for the flags, the drain and the
logs it writes; the server on loopback gRPC for the rest.

- ``--listen :PORT`` binds 127.0.0.1 like every other bare port (it died with a traceback);
- call ids are hashed in the logs by default (a caller's number sent as a call id appeared
  verbatim); ``plain`` is the opt-in;
- SIGTERM during a long ``Detect``: once the grace is over the ``Detect`` answers UNAVAILABLE
  (it got INTERNAL ``RST_STREAM`` 18.5 s later when the listener closed under it);
- a refusal at the stream limits, and a ``Detect`` cancelled at its deadline, each log a line;
- a ``Detect`` of silence logs and returns its real length (it said ``audio_seconds: 0.0``);
- one long MIXED ``Detect`` no longer holds every other one behind a single diarization lock.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import soundfile
from structlog.testing import capture_logs

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from devstack import free_port
from models.inference import Detector
from server.app import RunningServer
from server.config import listen_address, parse_args
from server.logs import CallIdLogging
from tests.paths import require
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    ROOT,
    SHARED_CALLS,
    collect,
    linear16_chunks,
    noise_pcm,
    requests,
    serving,
    stream_config,
    wait_until,
)

pytestmark = pytest.mark.timeout(300)

PHONE = "+14155550123"  # a caller's number sent as the call id


@pytest.fixture(scope="module")
def long_silence_flac(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    """90 minutes of 48 kHz silence as FLAC: small on the wire, seconds of CPU to decode (a
    ``Detect`` that is still running when a drain's grace is over, or its deadline)."""
    path: Path = tmp_path_factory.mktemp("long") / "silence.flac"
    zeros = np.zeros(48000 * 60, np.int16)
    with soundfile.SoundFile(path, "w", 48000, 1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(90):
            f.write(zeros)
    return path.read_bytes()


def test_bare_listen_port_binds_loopback() -> None:
    assert listen_address(":50076") == listen_address("50076") == "127.0.0.1:50076"
    assert listen_address("0.0.0.0:50076") == "0.0.0.0:50076"
    assert listen_address("[::]:50076") == "[::]:50076"
    assert parse_args(["--listen", ":50076"]).listen == "127.0.0.1:50076"
    with pytest.raises(SystemExit):
        parse_args(["--listen", "localhost"])
    assert parse_args([]).log_call_ids == "hash"  # privacy by default
    assert CallIdLogging().mode == "hash"
    assert CallIdLogging("plain")(PHONE) == PHONE  # the opt-in logs it as sent


async def _gauge(port: int, name: str) -> float:
    async with aiohttp.ClientSession() as http, \
            http.get(f"http://127.0.0.1:{port}/metrics") as response:
        for line in (await response.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def _json_lines(err: bytes) -> list[dict[str, Any]]:
    lines = []
    for raw in err.splitlines():
        try:
            lines.append(json.loads(raw))
        except ValueError:
            continue
    return lines


async def test_process_bare_port_hashed_call_ids_and_detect_ended_by_drain(
        long_silence_flac: bytes) -> None:
    """``python -m server --listen :PORT`` serves on 127.0.0.1:PORT; a stream whose call id
    is a phone number leaves no trace of it in the logs; SIGTERM while a long ``Detect`` is
    decoding (``--grace-seconds 0.5``): the ``Detect`` answers UNAVAILABLE once the grace is
    over, a line says it was cancelled by the drain, and the process exits 0."""
    port, metrics_port = free_port(), free_port()
    env = os.environ | {
        "PYANNOTE_METRICS_ENABLED": "false", "CALLSHIELD_DIARIZATION": "off",
        "CALLSHIELD_GRACE_SECONDS": "0.5", "CALLSHIELD_MAX_DETECT_SECONDS": "7200",
        "CALLSHIELD_METRICS_PORT": str(metrics_port),
    }
    env.pop("CALLSHIELD_LISTEN", None)
    env.pop("CALLSHIELD_LOG_CALL_IDS", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", "--listen", f":{port}", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 90)
            stub = pb_grpc.DetectionServiceStub(channel)
            reqs = requests(stream_config(call_id=PHONE), linear16_chunks(noise_pcm(2.0)))
            summary = (await asyncio.wait_for(collect(stub, reqs), 60))[-1].summary
            assert summary.call_id == PHONE and summary.windows_scored == 2

            detect = asyncio.ensure_future(
                stub.Detect(pb.DetectRequest(audio=long_silence_flac), timeout=240))
            await wait_until(lambda: _gauge(metrics_port, "callshield_detect_decoding"),
                             "the long Detect decoding", within=60)
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await asyncio.wait_for(detect, 60)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE, info.value
            assert "shutting down" in (info.value.details() or "")
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = _json_lines(err)
    (serving_line,) = [e for e in lines if e.get("event") == "serving"]
    assert serving_line["listen"] == f"127.0.0.1:{port}"
    assert PHONE[1:].encode() not in err  # not even cut or escaped
    (stream,) = [e for e in lines if e.get("event") == "stream summary"]
    assert stream["call_id"] and stream["call_id"] != PHONE
    (cancelled,) = [e for e in lines if e.get("event") == "detect cancelled"]
    assert (cancelled["reason"], cancelled["stage"]) == ("draining", "decode")


def _blocking_stream(port: int, reqs: list[pb.StreamDetectRequest]) -> list[object]:
    """The blocking client for a stream refused at once (grpc/grpc#36066: the asyncio
    client may report such a refusal as INTERNAL, see test_server_errors.py)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(pb_grpc.DetectionServiceStub(channel).StreamDetect(iter(reqs)))


async def test_refusals_and_detects_cut_at_their_deadline_log_a_line(
        detector: Detector, long_silence_flac: bytes) -> None:
    """``--max-streams 1``: the second stream is refused RESOURCE_EXHAUSTED and a line says
    which limit; a ``Detect`` whose deadline passes while it decodes ends DEADLINE_EXCEEDED
    and a line says so, with the stage it reached."""
    async with serving(detector, max_streams=1, max_detect_seconds=7200.0) as running, \
            grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        with capture_logs() as logs:
            held = stub.StreamDetect()
            await held.write(pb.StreamDetectRequest(config=stream_config()))
            await wait_until(lambda: running.servicer.admitted == 1, "one stream admitted")
            reqs = requests(stream_config(), linear16_chunks(noise_pcm(1.0)))
            with pytest.raises(grpc.RpcError) as refused:
                await asyncio.to_thread(_blocking_stream, running.port, reqs)
            assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            await held.done_writing()
            assert (await asyncio.wait_for(held.read(), 60)).HasField("summary")

            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.Detect(pb.DetectRequest(audio=long_silence_flac), timeout=1.0)
            assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            await wait_until(lambda: any(e["event"] == "detect cancelled" for e in logs),
                             "the cancelled Detect's log line")
        refusals = [(e["reason"], e["rpc"]) for e in logs if e["event"] == "call refused"]
        assert refusals == [("max_streams", "StreamDetect")]
        (cancelled,) = [e for e in logs if e["event"] == "detect cancelled"]
        assert (cancelled["reason"], cancelled["stage"]) == ("deadline", "decode")


async def test_detect_of_silence_reports_its_length(server: RunningServer) -> None:
    """Three seconds of digital silence: no window has speech, and still the summary and
    the log say the recording lasted 3 s."""
    audio = np.zeros(3 * 8000, np.int16).astype("<i2").tobytes()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        with capture_logs() as logs:
            response = await stub.Detect(pb.DetectRequest(
                audio=audio, config=stream_config(call_id="silence")), timeout=60)
    assert response.summary.windows_scored == 0
    assert response.summary.audio_seconds == pytest.approx(3.0)
    (line,) = [e for e in logs if e["event"] == "stream summary"]
    assert line["audio_seconds"] == pytest.approx(3.0)


def _wav(audio: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    soundfile.write(buffer, audio, rate, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


async def test_long_mixed_detect_does_not_hold_up_a_short_one(
        shipped_server: RunningServer) -> None:
    """Two MIXED recordings (diarized offline, then scored): a 3-minute one sent first and a
    10-second one sent once the first is being diarized. The short one is diarized and
    scored while the long one is still being diarized (the long one, cancelled then, says
    which stage it was in); behind one diarization lock (until issue 31) the short one
    could only start once the long one's diarization was over. Nothing is timed: the stage
    the long one is in when the short one is back is the check."""
    stereo, rate = soundfile.read(require(SHARED_CALLS / "call_dev_03_stereo.flac"),
                                  dtype="float32")
    mono = stereo.mean(axis=1)
    long_audio = np.tile(mono, int(np.ceil(180 * rate / mono.shape[0])))[:180 * rate]
    short_audio = mono[:10 * rate]
    pool = shipped_server.servicer.diarization.pool  # type: ignore[union-attr]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{shipped_server.port}") as channel:
        stub = pb_grpc.DetectionServiceStub(channel)
        with capture_logs() as logs:
            long_call = stub.Detect(pb.DetectRequest(audio=_wav(long_audio, rate)), timeout=280)
            await wait_until(lambda: pool.busy == 1, "the long recording being diarized", 120)
            short = await asyncio.wait_for(
                stub.Detect(pb.DetectRequest(audio=_wav(short_audio, rate))), 240)
            long_call.cancel()
            await wait_until(lambda: any(e["event"] == "detect cancelled" for e in logs),
                             "the long Detect cancelled")
    assert short.summary.audio_seconds == pytest.approx(10.0, abs=0.01)
    assert short.summary.windows_scored > 0
    (cancelled,) = [e for e in logs if e["event"] == "detect cancelled"]
    assert cancelled["stage"] == "diarize", "the short recording waited for the long one"
