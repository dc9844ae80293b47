"""Loading a new model into a running ``python -m server`` without dropping calls.

Through the real server process over gRPC on loopback: the ``ReloadModel`` admin RPC while a
real stream is in progress (the stream goes on, its windows switch from the old model to the
new one, never back), refusals that leave the old model serving, and ``SIGHUP`` reading the
served path again. The two models differ by their calibration offset only (what
``python -m models calibrate`` writes), by 20 log-odds, so every window tells which of the
two scored it."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import grpc
import numpy as np
import pytest

from callshield.v1 import detection_pb2 as pb
from callshield.v1 import detection_pb2_grpc as pb_grpc
from client import AsyncDetectionClient
from client.audio import CHUNK_SECONDS, read_audio
from devstack import free_port
from models.checkpoint import read_checkpoint, save_checkpoint
from models.inference import NAMED_MODELS
from tests.service_fixtures import ROOT, SERVING, wait_health

ADMIN, STREAM = "reload-admin-token", "reload-stream-token"
SHIFT = 20.0
SPOOF = ROOT / "examples" / "spoof_call.wav"


def _write(path: Path, bias_shift: float = 0.0, version: str | None = None,
           **changes: object) -> dict:
    state = read_checkpoint(NAMED_MODELS["default"])
    cal = dict(state["calibration"])
    cal["bias"] += bias_shift
    fields = {k: v for k, v in state.items() if k != "format"}
    fields.update(calibration=cal, version=version or state["version"], **changes)
    save_checkpoint(path, **fields)
    return fields


class ServerProcess:
    def __init__(self, proc: asyncio.subprocess.Process, port: int) -> None:
        self.proc = proc
        self.port = port
        self.target = f"127.0.0.1:{port}"
        self.lines: list[str] = []
        self._new_line = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            self.lines.append(raw.decode(errors="replace"))
            self._new_line.set()

    async def logged(self, pattern: str, after: int, within: float = 120.0) -> str:
        """The first line from index ``after`` on matching ``pattern``, waiting for it."""
        async with asyncio.timeout(within):
            while True:
                for line in self.lines[after:]:
                    if re.search(pattern, line):
                        return line
                self._new_line.clear()
                await self._new_line.wait()


@asynccontextmanager
async def server_process(model: Path) -> AsyncIterator[ServerProcess]:
    port = free_port()
    env = os.environ | {
        "PYANNOTE_METRICS_ENABLED": "false", "CALLSHIELD_LISTEN": f"127.0.0.1:{port}",
        "CALLSHIELD_DIARIZATION": "off", "CALLSHIELD_MODEL": str(model),
        "CALLSHIELD_ADMIN_TOKEN": ADMIN, "CALLSHIELD_AUTH_TOKEN": STREAM,
        "CALLSHIELD_GRACE_SECONDS": "0",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "server", cwd=ROOT, env=env,
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    server = ServerProcess(proc, port)
    try:
        async with grpc.aio.insecure_channel(server.target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 180)  # process start, loaded CI
        await wait_health(port, SERVING, 60)
        yield server
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            await asyncio.wait_for(proc.wait(), 60)
        server._reader.cancel()


def _logit(p: float) -> float:
    p = min(max(p, 1e-12), 1 - 1e-12)
    return math.log(p / (1 - p))


def _which(p: float, reference: float) -> str:
    """Which model scored a window: its probability is the old model's (``reference``) or
    the new one's (20 log-odds lower); "either" for a window that both score near 0."""
    old = abs(p - reference) < 1e-3
    new = abs(_logit(p) - (_logit(reference) - SHIFT)) < 0.5 or p < 1e-6
    if old and new:
        return "either"
    return "old" if old else "new" if new else f"neither ({p} vs {reference})"


async def test_reload_rpc_mid_stream_switches_models_without_dropping_the_call(
        tmp_path: Path) -> None:
    old_path, new_path = tmp_path / "serving.pt", tmp_path / "operator.pt"
    old = _write(old_path)
    new = _write(new_path, SHIFT, version=f"{old['version']}+op.test01")
    audio = read_audio(SPOOF)
    chunks = list(audio.chunks())
    half = len(chunks) // 2
    async with server_process(old_path) as server, \
            AsyncDetectionClient(server.target, token=STREAM) as client:
        # the old model's probability of every window of the call, for reference
        reference = {(round(w.start_seconds, 2), round(w.end_seconds, 2)): w.spoof_probability
                     for w in (await client.detect_file(SPOOF)).windows}
        channel = grpc.aio.insecure_channel(server.target)
        stream = pb_grpc.DetectionServiceStub(channel).StreamDetect(
            metadata=(("authorization", f"Bearer {STREAM}"),))
        await stream.write(pb.StreamDetectRequest(config=audio.config(call_id="across")))
        for chunk in chunks[:half]:
            await stream.write(pb.StreamDetectRequest(audio=chunk))
        windows: list[pb.WindowResult] = []
        while len(windows) < 3:  # the old model has scored some of the call
            r = await stream.read()
            if r.HasField("window"):
                windows.append(r.window)
        before_reload = len(windows)
        done = await client.reload_model(str(new_path), admin_token=ADMIN)
        assert (done.previous.version, done.model.version) == (old["version"], new["version"])
        assert done.model.calibration.bias == pytest.approx(new["calibration"]["bias"])
        assert done.queue == "inprocess" and done.path == str(new_path)
        assert (await client.get_model()).version == new["version"]
        sent_before = half * CHUNK_SECONDS  # seconds of audio the server had by the reload
        for chunk in chunks[half:]:
            await stream.write(pb.StreamDetectRequest(audio=chunk))
        await stream.done_writing()
        summary = None
        while (r := await stream.read()) is not grpc.aio.EOF:
            if r.HasField("window"):
                windows.append(r.window)
            elif r.HasField("summary"):
                summary = r.summary
        assert await stream.code() == grpc.StatusCode.OK
        assert summary is not None and summary.windows_scored == len(windows)
        await channel.close()
    kinds = [_which(w.spoof_probability,
                    reference[(round(w.start_seconds, 2), round(w.end_seconds, 2))])
             for w in windows]
    assert all(k in ("old", "new", "either") for k in kinds), kinds
    assert "new" not in kinds[:before_reload] and "old" in kinds[:before_reload]
    # one switch, never back; every window of audio sent after the reload is the new model's
    switch = kinds.index("new")
    assert "old" not in kinds[switch:], kinds
    after = [k for w, k in zip(windows, kinds, strict=True) if w.end_seconds > sent_before + 1e-6]
    assert "new" in after and "old" not in after


async def test_a_bad_reload_leaves_the_old_model_serving(tmp_path: Path) -> None:
    served = tmp_path / "serving.pt"
    old = _write(served)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    _write(tmp_path / "window.pt", window_seconds=old["window_seconds"] / 2, version="w")
    _write(tmp_path / "fine.pt", SHIFT, version="never")
    ok, refused = grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNAUTHENTICATED
    cases = [("garbage.pt", ADMIN, ok, "cannot load"), ("missing.pt", ADMIN, ok, "not found"),
             ("window.pt", ADMIN, ok, "window"), ("fine.pt", STREAM, refused, "admin token"),
             ("fine.pt", "", refused, "admin token")]
    async with server_process(served) as server, \
            AsyncDetectionClient(server.target, token=STREAM) as client:
        for name, token, code, expect in cases:
            with pytest.raises(grpc.aio.AioRpcError) as error:
                await client.reload_model(str(tmp_path / name), admin_token=token)
            details = error.value.details() or ""
            assert error.value.code() == code, (name, details)
            assert expect in details, (name, details)
            if code == ok:
                assert "previous one still serves" in details
            assert (await client.get_model()).version == old["version"]
        result = await client.detect_file(SPOOF)  # still scoring, with the old model
        assert result.summary.windows_scored > 0
        assert max(w.spoof_probability for w in result.windows) > 0.5


async def test_sighup_reloads_the_served_path_and_a_bad_file_changes_nothing(
        tmp_path: Path) -> None:
    served = tmp_path / "serving.pt"
    old = _write(served)
    async with server_process(served) as server, \
            AsyncDetectionClient(server.target, token=STREAM) as client:
        assert (await client.get_model()).version == old["version"]
        # the operator replaces the file (atomically, as models calibrate writes), then HUP
        new = _write(tmp_path / "next.pt", SHIFT, version=f"{old['version']}+op.hup001")
        os.replace(tmp_path / "next.pt", served)
        mark = len(server.lines)
        server.proc.send_signal(signal.SIGHUP)
        await server.logged("model reloaded", mark)
        model = await client.get_model()
        assert model.version == new["version"]
        assert model.calibration.bias == pytest.approx(new["calibration"]["bias"])
        result = await client.detect_file(SPOOF)
        assert max(w.spoof_probability for w in result.windows) < 1e-3  # the new offset
        # a broken file at the path: logged, refused, the last good model serves on
        served.write_bytes(b"\x00" * 64)
        mark = len(server.lines)
        server.proc.send_signal(signal.SIGHUP)
        line = await server.logged("model reload refused", mark)
        assert "cannot load" in line
        assert (await client.get_model()).version == new["version"]
        assert server.proc.returncode is None
        assert np.isfinite((await client.detect_file(SPOOF)).summary.audio_seconds)


async def test_reload_without_a_path_reads_the_served_path_again(tmp_path: Path) -> None:
    """The operator overwrote the served file: ``ReloadModel`` with no path reads it."""
    served = tmp_path / "serving.pt"
    old = _write(served)
    async with server_process(served) as server, \
            AsyncDetectionClient(server.target, token=STREAM) as client:
        new = _write(served, SHIFT, version=f"{old['version']}+op.again1")
        done = await client.reload_model(admin_token=ADMIN)
        assert done.path == str(served) and done.model.version == new["version"]


async def test_redis_worker_reloads_its_model_on_sighup(redis_server: str,
                                                        tmp_path: Path) -> None:
    """The Redis deployment: each worker holds its own model and reloads its ``--model``
    path on SIGHUP (the server's reload only changes what it reports); a broken file is
    refused and the worker goes on scoring with the model it had."""
    import devstack
    from models.data.audio import load_audio
    from server.queue.base import WindowJob
    from server.queue.redis_queue import RedisQueue

    served = tmp_path / "worker.pt"
    old = _write(served)
    log_path = tmp_path / "worker.log"
    prefix, consumer = "hup", "hup-worker"
    with log_path.open("wb") as log:
        proc = devstack.start_worker(
            redis_server, consumer, "--device", "cpu", "--prefix", prefix, "--threads", "1",
            "--diarization", "off", "--log-level", "info", model=str(served), output=log)
    queue = RedisQueue(redis_server, str(served), prefix=prefix, job_timeout=120)

    async def logged(pattern: str, after: int) -> str:
        async with asyncio.timeout(120):
            while True:
                lines = log_path.read_text(errors="replace").splitlines()[after:]
                found = [line for line in lines if pattern in line]
                if found:
                    return found[0]
                await asyncio.sleep(0.05)

    window = load_audio(SPOOF, 8000)[: int(old["window_seconds"] * 8000)]
    try:
        await asyncio.to_thread(devstack.wait_worker, redis_server, consumer, proc,
                                model=str(served), prefix=prefix, within=180)
        await queue.start()
        first = await queue.submit(WindowJob("j1", "s", window))
        _write(tmp_path / "next.pt", SHIFT, version=f"{old['version']}+op.worker")
        os.replace(tmp_path / "next.pt", served)
        mark = len(log_path.read_text().splitlines())
        proc.send_signal(signal.SIGHUP)
        await logged("worker model reloaded", mark)
        second = await queue.submit(WindowJob("j2", "s", window))
        assert second.score == pytest.approx(first.score, abs=1e-4)  # same scorer
        assert _logit(second.spoof_probability) == pytest.approx(
            _logit(first.spoof_probability) - SHIFT, abs=0.05)
        served.write_bytes(b"broken")
        mark = len(log_path.read_text().splitlines())
        proc.send_signal(signal.SIGHUP)
        assert "cannot load" in await logged("worker model reload refused", mark)
        third = await queue.submit(WindowJob("j3", "s", window))
        assert third.spoof_probability == pytest.approx(second.spoof_probability, abs=1e-6)
        assert proc.poll() is None
    finally:
        await queue.close()
        devstack.stop_process(proc)
