"""``python -m server`` as a process (configuration from the environment, TLS, SIGTERM), and
flow control: a client faster than the queue is slowed, not dropped."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from models.inference import Detector
from server.config import parse_args
from server.queue.base import WindowJob, WindowScore
from server.queue.inprocess import InProcessQueue
from server.session import Session
from tests.paths import missing
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import (
    ROOT,
    linear16_chunks,
    noise_pcm,
    refuses_new_calls,
    requests,
    serving,
    stream_config,
    wait_until,
)


def test_flags_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLSHIELD_LISTEN", "0.0.0.0:6000")
    monkeypatch.setenv("CALLSHIELD_MAX_STREAMS", "7")
    config = parse_args(["--model", "x.pt"])
    assert (config.listen, config.max_streams, config.model) == ("0.0.0.0:6000", 7, "x.pt")
    assert parse_args(["--listen", "127.0.0.1:1"]).listen == "127.0.0.1:1"


class GatedQueue(InProcessQueue):
    """Scores nothing until the gate opens: a backed-up queue, for the flow control test."""

    def __init__(self, detector: Detector) -> None:
        super().__init__(detector)
        self.gate = asyncio.Event()
        self.waiting = 0

    async def submit(self, job: WindowJob) -> WindowScore:
        self.waiting += 1
        await self.gate.wait()
        self.waiting -= 1
        return await super().submit(job)


async def test_fast_client_is_slowed_not_dropped(detector: Detector) -> None:
    queue = GatedQueue(detector)
    async with serving(detector, queue, max_inflight_per_stream=2) as running:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as channel:
            stub = pb_grpc.DetectionServiceStub(channel)
            reqs = requests(stream_config(), linear16_chunks(noise_pcm(60.0), seconds=0.5))
            call = stub.StreamDetect(iter(reqs))
            await wait_until(lambda: queue.waiting == 2, "two windows held at the gate")
            await asyncio.sleep(0.5)  # time for a server that ignores the limit to read on
            (session,) = running.servicer.sessions.values()
            assert isinstance(session, Session)
            read = session.windowers["A"].total / 8000
            assert 2 <= read < 20  # stopped reading near two windows in flight
            queue.gate.set()
            responses = [r async for r in call]
    assert responses[-1].summary.windows_scored == 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
    port = _free_port()
    env = os.environ | {
        "PYANNOTE_METRICS_ENABLED": "false", "CALLSHIELD_LISTEN": f"127.0.0.1:{port}",
        "CALLSHIELD_AUTH_TOKEN": "t0k", "CALLSHIELD_TLS_CERT": str(cert),
        "CALLSHIELD_TLS_KEY": str(key),
        # The shipped defaults otherwise (diarization auto); the stream below is a SPLIT
        # single-party leg, which is never diarized.
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    try:
        credentials = grpc.ssl_channel_credentials(cert.read_bytes())
        async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials) as channel:
            await asyncio.wait_for(channel.channel_ready(), 60)
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
                await wait_until(lambda: refuses_new_calls(probe), "SIGTERM refusing new calls")
            assert proc.returncode is None
            await call.done_writing()
            while (response := await call.read()) != grpc.aio.EOF:
                responses.append(response)
            assert responses[-1].summary.windows_scored == 2
        _, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()[-2000:]
        assert b'"event": "draining"' in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
