"""The SDK and the ``client`` command against a real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

import numpy as np
import soundfile

from client import AsyncDetectionClient, DetectionClient, verdict_name
from server.app import RunningServer
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import EXAMPLES, ROOT, noise_pcm


def _wav(tmp_path: Path, seconds: float = 4.0, channels: int = 1) -> Path:
    path = tmp_path / "call.wav"
    soundfile.write(path, noise_pcm(seconds, channels=channels), 8000, subtype="PCM_16")
    return path


async def _client(*args: str) -> tuple[int, str, str]:
    env = os.environ | {"PYANNOTE_METRICS_ENABLED": "false"}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", *args, cwd=ROOT, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    return int(proc.returncode or 0), out.decode(), err.decode()


async def test_cli_stream_json_end_to_end(backend_server: RunningServer) -> None:
    """The stereo example: party B is a cloned voice, party A is genuine (both backends)."""
    port = backend_server.port
    code, out, err = await _client("stream", str(EXAMPLES / "spoof_call_stereo.wav"),
                                   "--server", f"127.0.0.1:{port}", "--fast", "--json",
                                   "--split", "--call-id", "c-1")
    lines = [json.loads(line) for line in out.splitlines()]
    assert {line["type"] for line in lines} >= {"window", "verdict", "alert", "summary"}
    assert all(line["call_id"] == "c-1" for line in lines)
    windows = [line for line in lines if line["type"] == "window"]
    assert {w["speaker"] for w in windows} == {"A", "B"}
    assert all(0.0 <= w["spoof_probability"] <= 1.0 and w["end"] > w["start"] for w in windows)
    alerts = [line for line in lines if line["type"] == "alert"]
    assert [a["speaker"] for a in alerts] == ["B"]
    summary = lines[-1]
    assert summary["type"] == "summary" and summary["end"] == 30.0
    verdicts = {s["speaker"]: s["verdict"] for s in summary["speakers"]}
    assert verdicts["B"] == "spoof" and verdicts["A"] != "spoof"
    assert summary["spoof"] is True and code == 3, err


async def test_cli_detect_and_plain_output(server: RunningServer) -> None:
    target = f"127.0.0.1:{server.port}"
    code, out, err = await _client("detect", str(EXAMPLES / "bonafide_call.wav"),
                                   "--server", target)
    assert code == 0, err  # a genuine call: exit 0, and the plain line says so
    assert out.startswith("speaker A: bonafide (spoof probability ")
    code, out, err = await _client("detect", str(EXAMPLES / "spoof_call.wav"), "--server",
                                   target, "--json")
    summary = json.loads(out.splitlines()[-1])
    assert summary["type"] == "summary" and summary["spoof"] is True
    assert code == 3, err


async def test_cli_exit_codes_for_errors(server: RunningServer, tmp_path: Path) -> None:
    assert (await _client("stream", str(tmp_path / "missing.wav")))[0] == 2
    assert (await _client("stream"))[0] == 2
    assert (await _client("stream", str(_wav(tmp_path)), "--split"))[0] == 2  # mono file
    code, _, err = await _client("detect", str(_wav(tmp_path)), "--server", "127.0.0.1:1")
    assert code == 1 and "UNAVAILABLE" in err


async def test_async_sdk(server: RunningServer, tmp_path: Path) -> None:
    wav = _wav(tmp_path, seconds=3.0)
    async with AsyncDetectionClient(f"127.0.0.1:{server.port}") as client:
        model = await client.get_model()
        responses = [r async for r in client.stream_file(wav, call_id="sdk")]
        detected = await client.detect_file(wav)
    assert responses[-1].summary.call_id == "sdk"
    windows = [r.window for r in responses if r.HasField("window")]
    assert windows[0].model == model.name
    np.testing.assert_allclose([w.spoof_probability for w in windows],
                               [w.spoof_probability for w in detected.windows], atol=1e-4)


def _sync_session(port: int, wav: Path, realtime: bool) -> tuple[str, list[float]]:
    with DetectionClient(f"127.0.0.1:{port}") as client:
        responses = list(client.stream_file(wav, realtime=realtime, chunk_seconds=0.5))
    summary = responses[-1].summary
    windows = [r.window.spoof_probability for r in responses if r.HasField("window")]
    assert summary.windows_scored == len(windows)
    return verdict_name(summary.speakers[0].state), windows


async def test_sync_sdk_realtime(server: RunningServer, tmp_path: Path) -> None:
    """Pacing changes nothing: a real-time stream gives the windows of a fast one."""
    wav = _wav(tmp_path, seconds=2.0)
    paced = await asyncio.to_thread(_sync_session, server.port, wav, True)
    fast = await asyncio.to_thread(_sync_session, server.port, wav, False)
    assert len(paced[1]) == 2 and paced[0] == fast[0]
    np.testing.assert_allclose(paced[1], fast[1], atol=1e-4)
