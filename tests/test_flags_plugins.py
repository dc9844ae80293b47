"""``python -m plugins serve --detector-token --metrics-port`` through the real process: a
detection server that requires a bearer token, an AudioSocket call from Asterisk's side, and
the plugins' Prometheus endpoint scraped over HTTP. A token the plugins did not send would
have the call refused (no verdicts, a detector error), and a metrics port that was not
served leaves nothing to scrape."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

from bench.plugin_peers import as_frame
from callshield.v1 import detection_pb2 as pb
from models.inference import Detector
from tests.conftest import free_port
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import ROOT, noise_pcm, serving, wait_until

HANGUP, UUID, SLIN = 0x00, 0x01, 0x10
CALL_SECONDS = 2.0


async def _port_open(port: int) -> bool:
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    writer.close()
    return True


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    """The value of one series in Prometheus text format, None when absent."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric, _, rest = series.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and found == wanted:
            return float(value)
    return None


async def _asterisk_call(port: int) -> bytes:
    """UUID, 2 s of slin in 20 ms frames, the 0x00 hangup; what the plugin wrote back until
    it closed the socket."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(as_frame(UUID, uuid.uuid4().bytes))
    pcm = noise_pcm(CALL_SECONDS)[:, 0]
    for i in range(0, pcm.shape[0], 160):
        writer.write(as_frame(SLIN, pcm[i:i + 160].astype("<i2").tobytes()))
    writer.write(as_frame(HANGUP))
    await writer.drain()
    received = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return received


async def test_detector_token_and_metrics_port(detector: Detector, tmp_path: Path) -> None:
    audiosocket, metrics_port = free_port(), free_port()
    log_path = tmp_path / "plugins.log"
    async with serving(detector, auth_token="plug-t0k") as running:
        with log_path.open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "plugins", "serve",
                "--audiosocket", f"127.0.0.1:{audiosocket}",
                "--detector", f"127.0.0.1:{running.port}", "--detector-token", "plug-t0k",
                "--metrics-port", str(metrics_port), cwd=ROOT,
                env=os.environ | {"PYANNOTE_METRICS_ENABLED": "false"},
                stdout=log, stderr=log)
        try:
            await wait_until(lambda: _port_open(audiosocket), "the AudioSocket listener", 60)
            assert await _asterisk_call(audiosocket) == b""  # a normal end: no error frame

            def closed() -> list[dict]:
                return [e for e in map(json.loads, log_path.read_text().splitlines())
                        if e.get("event") == "call closed"]

            await wait_until(closed, "the call closed in the plugins' log", 30)
            text = await asyncio.to_thread(_scrape, metrics_port)
        finally:
            if proc.returncode is None:
                proc.send_signal(signal.SIGTERM)
                await asyncio.wait_for(proc.wait(), 30)
    (call,) = closed()
    assert call["failed"] is False, log_path.read_text()[-3000:]
    assert list(call["verdicts"]) == ["caller"]  # the detector's summary came back
    assert call["verdicts"]["caller"] in pb.SpeakerState.keys()
    assert not [e for e in map(json.loads, log_path.read_text().splitlines())
                if e.get("event") == "detector error"]
    # the plugins' series, counting this call: one connection, 100 frames of 20 ms
    assert _sample(text, "callshield_plugin_calls_total", plugin="audiosocket") == 1.0
    assert _sample(text, "callshield_plugin_frames_total",
                   plugin="audiosocket") == CALL_SECONDS / 0.02
    assert _sample(text, "callshield_plugin_calls_open", plugin="audiosocket") == 0.0
    assert _sample(text, "callshield_plugin_detector_errors_total",
                   plugin="audiosocket") in (None, 0.0)
    # and only the plugins' own: the server's series (streams open, windows scored, ...)
    # would all read zero here and mislead a dashboard scraping both processes
    families = {line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")}
    ours = {name for name in families if name.startswith("callshield_")}
    assert ours and all(name.startswith("callshield_plugin_") for name in ours), sorted(ours)
    assert proc.returncode == 0


def test_the_plugins_process_imports_nothing_from_the_server() -> None:
    """What ``python -m plugins`` loads: not the server (its import would register the
    server's Prometheus series in the plugins' registry, and tie the plugins to its code)."""
    probe = ("import sys, plugins.__main__; "
             "print(' '.join(m for m in sys.modules if m.split('.')[0] == 'server'))")
    found = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                           text=True, check=True, timeout=120,
                           env=os.environ | {"PYANNOTE_METRICS_ENABLED": "false"})
    assert found.stdout.split() == []
