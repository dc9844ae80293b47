"""``python -m server`` as a process (configuration from the environment, TLS, SIGTERM drain),
and flow control: a client faster than the queue is slowed, not dropped."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from devstack import free_port
from models.inference import Detector
from server.config import parse_args
from server.queue.base import WindowJob, WindowScore
from server.queue.inprocess import InProcessQueue
from server.session import Session
from tests.paths import missing
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    NOT_SERVING,
    ROOT,
    SERVING,
    linear16_chunks,
    noise_pcm,
    refuses_new_calls,
    requests,
    serving,
    stream_config,
    wait_health,
    wait_until,
)


def test_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSHIELD_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("CALLSHIELD_MAX_STREAMS", "7")
    config = parse_args(["--model", "x.pt"])
    assert (config.listen, config.max_streams, config.model) == ("0.0.0.0:6000", 7, "x.pt")
    assert parse_args(["--listen", "127.0.0.1:1"]).listen == "127.0.0.1:1"
    assert parse_args([]).threads == 1
    monkeypatch.setenv("CALLSHIELD_THREADS", "0")
    assert parse_args([]).threads == 0


class GatedQueue(InProcessQueue):
    """Scores a window only when the test releases one: a backed-up queue, for the flow
    control test. Records the most windows ever waiting at once."""

    def __init__(self, detector: Detector) -> None:
        super().__init__(detector)
        self.released = asyncio.Semaphore(0)
        self.waiting = 0
        self.peak = 0

    async def submit(self, job: WindowJob) -> WindowScore:
        self.waiting += 1
        self.peak = max(self.peak, self.waiting)
        await self.released.acquire()
        self.waiting -= 1
        return await super().submit(job)


WINDOWS = 12  # 1 s hop: one window per second of audio


async def test_fast_client_is_slowed_not_dropped(detector: Detector) -> None:
    """A client sends 12 s of audio at once while the queue scores one window at a time,
    only when the test lets it: the stream never has more than its two windows in flight
    (a server that read on regardless would have read all 12 s at the first wait), and
    every window is scored in the end. Nothing is timed: the queue counts."""
    queue = GatedQueue(detector)
    async with serving(detector, queue, max_inflight_per_stream=2) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.DetectionServiceStub(channel)
            chunks = linear16_chunks(noise_pcm(float(WINDOWS)), seconds=0.5)
            reqs = requests(stream_config(), chunks)
            call = stub.StreamDetect(iter(reqs))
            reading = asyncio.ensure_future(_responses(call))
            for left in range(WINDOWS, 0, -1):
                await wait_until(lambda left=left: queue.waiting >= min(2, left),  # type: ignore[misc]
                                 f"a window waiting, {left} to go")
                (session,) = running.servicer.sessions.values()
                assert isinstance(session, Session)
                scored = WINDOWS - left
                # read no further than the two windows in flight (1 s hop), the next one
                # formed and waiting for a slot, and one 0.5 s chunk
                assert session.lanes.lane("A").windower.total / 8000 <= scored + 2 + 1 + 0.5
                queue.released.release()
            responses = await asyncio.wait_for(reading, 60)
    assert queue.peak == 2
    assert responses[-1].summary.windows_scored == WINDOWS


async def _responses(call: grpc.aio.StreamStreamCall) -> list[pb.StreamDetectResponse]:
    return [r async for r in call]


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


async def test_server_process_with_tls_auth_and_sigterm(tmp_path: Path) -> None:
    if not any((Path(p) / "openssl").exists() for p in os.environ["PATH"].split(os.pathsep)):
        missing("openssl is not installed")
    cert, key = _self_signed(tmp_path)
    port = free_port()
    env = os.environ | {
        "PYANNOTE_METRICS_ENABLED": "false", "CALLSHIELD_LISTEN": f"127.0.0.1:{port}",
        "CALLSHIELD_AUTH_TOKEN": "t0k", "CALLSHIELD_TLS_CERT": str(cert),
        "CALLSHIELD_TLS_KEY": str(key),
        # a grace the probe below cannot outlast on a loaded machine (the 10 s default, and
        # what happens when it runs out: test_sigterm_drain_ends_every_stream_with_its_summary)
        "CALLSHIELD_GRACE_SECONDS": "120",
        # The shipped defaults otherwise (diarization auto); the stream below is a SPLIT
        # single-party leg, which is never diarized.
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            await asyncio.wait_for(channel.channel_ready(), 180)  # process start, loaded CI
            stub = pb_grpc.DetectionServiceStub(channel)
            metadata = (("authorization", "Bearer t0k"),)
            model = await stub.GetModel(pb.GetModelRequest(), metadata=metadata)
            assert model.sample_rate_hz == 8000
            call = stub.StreamDetect(metadata=metadata)
            await call.write(pb.StreamDetectRequest(config=stream_config(
                channel_mode=pb.CHANNEL_MODE_SPLIT, party_labels=["caller"])))
            (chunk,) = linear16_chunks(noise_pcm(1.5), seconds=1.5)
            await call.write(pb.StreamDetectRequest(audio=chunk))
            # The stream is open on the server once its first window comes back.
            responses = [await asyncio.wait_for(call.read(), 60)]
            proc.send_signal(signal.SIGTERM)  # drains: the open stream still completes
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as probe:
                await wait_until(lambda: refuses_new_calls(probe, metadata),
                                 "SIGTERM refusing new calls")
            assert proc.returncode is None
            await call.done_writing()
            while (response := await call.read()) != grpc.aio.EOF:
                responses.append(response)
            assert responses[-1].summary.windows_scored == 2
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b'"event": "draining"' in err
        assert b'"threads": 1' in err  # the default: one thread per computation, calls in parallel
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def _blocking_stream(port: int, reqs: list[pb.StreamDetectRequest]) -> list[object]:
    """The blocking client for a stream the server refuses at once (grpc/grpc#36066: the
    asyncio client may report such a refusal as INTERNAL, see test_server_errors.py)."""
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        return list(pb_grpc.DetectionServiceStub(channel).StreamDetect(iter(reqs)))


async def test_sigterm_drain_ends_every_stream_with_its_summary() -> None:
    """SIGTERM with two streams open, ``--grace-seconds 15``: health turns NOT_SERVING while
    the listener still answers, new calls get UNAVAILABLE, the stream that half-closes within
    the grace gets its summary and OK; the one that never half-closes is ended by the server
    when the grace is over: its last window, its summary, then UNAVAILABLE. Then the process
    exits 0."""
    port = free_port()
    env = os.environ | {
        "PYANNOTE_METRICS_ENABLED": "false", "CALLSHIELD_LISTEN": f"127.0.0.1:{port}",
        "CALLSHIELD_GRACE_SECONDS": "15", "CALLSHIELD_DIARIZATION": "off",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 180)  # process start, loaded CI
            await wait_health(port, SERVING, 30)
            stub = pb_grpc.DetectionServiceStub(channel)
            (a_audio,) = linear16_chunks(noise_pcm(1.5), seconds=1.5)
            (b_audio,) = linear16_chunks(noise_pcm(2.0, seed=1), seconds=2.0)
            a, b = stub.StreamDetect(), stub.StreamDetect()
            for call, audio, name in ((a, a_audio, "stays"), (b, b_audio, "leaves")):
                await call.write(pb.StreamDetectRequest(config=stream_config(call_id=name)))
                await call.write(pb.StreamDetectRequest(audio=audio))
                assert (await asyncio.wait_for(call.read(), 60)).HasField("window")

            proc.send_signal(signal.SIGTERM)
            await wait_health(port, NOT_SERVING, 30)  # observable: still listening
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await stub.GetModel(pb.GetModelRequest(), timeout=30)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "shutting down" in info.value.details()
            with pytest.raises(grpc.RpcError) as refused:
                await asyncio.to_thread(_blocking_stream, port, requests(stream_config(), []))
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]

            await b.done_writing()
            b_responses = []
            while (response := await asyncio.wait_for(b.read(), 60)) != grpc.aio.EOF:
                b_responses.append(response)
            assert b_responses[-1].summary.windows_scored == 2
            assert await b.code() == grpc.StatusCode.OK
            assert proc.returncode is None

            a_responses = []
            with pytest.raises(grpc.aio.AioRpcError) as info:
                while (response := await asyncio.wait_for(a.read(), 60)) != grpc.aio.EOF:
                    a_responses.append(response)
            assert info.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "ended early, with its summary" in info.value.details()
            assert a_responses[-1].summary.call_id == "stays"
            assert a_responses[-1].summary.windows_scored == 2  # its last window came too
        _, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b'"event": "drain grace over"' in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
