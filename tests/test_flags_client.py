"""The ``client`` command's connection and stream flags, each through the real process against
a real server on 127.0.0.1: ``--token``, ``--tls``, ``--ca-cert``, ``--threshold``,
``--platform`` and the default real-time pacing. Each check is built so that the flag doing
nothing fails it: a token that is not sent is refused, a channel without TLS cannot speak to
a TLS listener, a threshold that does not reach the server leaves the verdicts of the
examples as they are, an unpaced stream hands the server all of its windows at once, and a
platform that is not sent is not in the admin feed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import soundfile

from models.inference import Detector
from server.queue.base import WindowJob, WindowScore
from server.queue.inprocess import InProcessQueue
from tests.paths import missing
from tests.service_fixtures import *  # noqa: F403
from tests.service_fixtures import EXAMPLES, ROOT, noise_pcm, serving, wait_until


async def _client(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    """``python -m client.cli ARGS``: exit code, stdout, stderr."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "client.cli", *args, cwd=ROOT,
        env=os.environ | {"PYANNOTE_METRICS_ENABLED": "false"} | (env or {}),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 180)
    return int(proc.returncode or 0), out.decode(), err.decode()


def _wav(tmp_path: Path, seconds: float) -> Path:
    path = tmp_path / f"noise{seconds:g}.wav"
    soundfile.write(path, noise_pcm(seconds), 8000, subtype="PCM_16")
    return path


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if not any((Path(p) / "openssl").exists() for p in os.environ["PATH"].split(os.pathsep)):
        missing("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1",
         "-keyout", str(key), "-out", str(cert)],
        check=True, capture_output=True)
    return cert, key


def _summary(out: str) -> dict:
    summary = json.loads(out.splitlines()[-1])
    assert summary["type"] == "summary"
    return summary


async def test_token_tls_and_ca_cert(detector: Detector, tmp_path: Path) -> None:
    """A server with TLS (self-signed certificate) and a bearer token. ``--ca-cert`` trusts
    that certificate (and implies TLS); ``--tls`` alone uses the default roots, here pointed
    at the same certificate through gRPC's own variable; ``--token`` is what gets the call
    past the token check."""
    cert, key = _self_signed(tmp_path)
    wav = str(_wav(tmp_path, 2.0))
    async with serving(detector, auth_token="s3cret", tls_cert=str(cert),
                       tls_key=str(key)) as running:
        target = ("detect", wav, "--server", f"127.0.0.1:{running.port}", "--json")
        roots = {"GRPC_DEFAULT_SSL_ROOTS_FILE_PATH": str(cert)}
        cases = {
            "ca-cert, token": _client(*target, "--ca-cert", str(cert), "--token", "s3cret"),
            "ca-cert": _client(*target, "--ca-cert", str(cert)),
            "ca-cert, wrong token": _client(*target, "--ca-cert", str(cert), "--token", "no"),
            "token, no tls": _client(*target, "--token", "s3cret"),
            "tls, token, default roots": _client(*target, "--tls", "--token", "s3cret",
                                                 env=roots),
            "tls, token, untrusted": _client(*target, "--tls", "--token", "s3cret"),
        }
        runs = dict(zip(cases, await asyncio.gather(*cases.values()), strict=True))
    for name in ("ca-cert, token", "tls, token, default roots"):
        code, out, err = runs[name]
        assert code in (0, 3), (name, err)
        assert _summary(out)["end"] == pytest.approx(2.0), name
    for name, status in (("ca-cert", "UNAUTHENTICATED"),  # no token: refused
                         ("ca-cert, wrong token", "UNAUTHENTICATED"),
                         ("token, no tls", "UNAVAILABLE"),  # plaintext to a TLS listener
                         # without the root --tls checks the certificate: untrusted, refused
                         ("tls, token, untrusted", "UNAVAILABLE")):
        code, _, err = runs[name]
        assert code == 1 and status in err, (name, err)


def _excerpt(tmp_path: Path, name: str, seconds: float) -> str:
    """The first ``seconds`` of an example call."""
    audio, rate = soundfile.read(EXAMPLES / name, dtype="int16")
    path = tmp_path / f"{seconds:g}s_{name}"
    soundfile.write(path, audio[: int(seconds * rate)], rate, subtype="PCM_16")
    return str(path)


async def test_threshold_reaches_the_verdict_rule(detector: Detector, tmp_path: Path) -> None:
    """The evidence rule (models/verdicts.py) clips one window's spoof log-odds to +-3 and
    drifts by the threshold's log-odds: at 0.001 (log-odds -6.9) every window with speech
    adds evidence, so a genuine voice is flagged; at 0.999 (+6.9) none can, so a cloned one
    is not. Those outcomes follow from the rule, not from the model's scores; the default
    (0.5) gives the examples' known verdicts, so the flag is what changed them. The first
    12 s of each example: the spoof call's Flite voice speaks from 3.35 s to 12 s."""
    bonafide = _excerpt(tmp_path, "bonafide_call.wav", 12.0)
    spoof = _excerpt(tmp_path, "spoof_call.wav", 12.0)
    async with serving(detector) as running:
        target = ("--server", f"127.0.0.1:{running.port}", "--fast", "--json")
        cases = {"bonafide, default": (bonafide,), "bonafide, 0.001": (bonafide, "--threshold",
                                                                          "0.001"),
                 "spoof, default": (spoof,), "spoof, 0.999": (spoof, "--threshold", "0.999"),
                 "out of range": (bonafide, "--threshold", "1.5")}
        done = await asyncio.gather(*(_client("stream", *args, *target)
                                      for args in cases.values()))
    runs = dict(zip(cases, done, strict=True))
    code, _, err = runs.pop("out of range")
    assert code == 1 and "INVALID_ARGUMENT" in err and "alert_threshold" in err
    codes = {name: code for name, (code, _, _) in runs.items()}
    assert codes == {"bonafide, default": 0, "bonafide, 0.001": 3, "spoof, default": 3,
                     "spoof, 0.999": 0}, {name: err[-500:] for name, (_, _, err) in runs.items()}
    alerts = {name: [json.loads(line)["speaker"] for line in out.splitlines()
                     if json.loads(line)["type"] == "alert"] for name, (_, out, _) in runs.items()}
    assert alerts["bonafide, 0.001"] == ["A"] and alerts["spoof, 0.999"] == []


class _TimedQueue(InProcessQueue):
    """The in-process queue, noting when each window reached it (its audio had arrived)."""

    def __init__(self, detector: Detector) -> None:
        super().__init__(detector)
        self.arrivals: list[float] = []

    async def submit(self, job: WindowJob) -> WindowScore:
        self.arrivals.append(time.monotonic())
        return await super().submit(job)


SECONDS = 6  # windows end at 1, 2, ... 6 s of the call (1 s hop)


async def test_stream_is_paced_in_real_time_by_default(detector: Detector,
                                                       tmp_path: Path) -> None:
    """Without ``--fast`` the client sends each 0.1 s chunk at its time in the call, so the
    window ending at 6 s cannot reach the server before 5.9 s after the first chunk left,
    while the one ending at 1 s can arrive from 0.9 s on: at least 5 s between them, whatever
    the machine (only a first window later than 1.9 s would shrink it, and a loaded server
    delays the last one as much). Unpaced, all six arrive within the scoring of a few
    windows; ``--fast`` is run too to show the measure tells the two apart."""
    wav = str(_wav(tmp_path, float(SECONDS)))
    spans = {}
    for pacing in ((), ("--fast",)):
        queue = _TimedQueue(detector)
        async with serving(detector, queue) as running:
            code, out, err = await _client("stream", wav, "--server",
                                           f"127.0.0.1:{running.port}", "--json", *pacing)
        assert code in (0, 3), err
        assert sum(json.loads(line)["type"] == "window" for line in out.splitlines()) == SECONDS
        assert len(queue.arrivals) == SECONDS
        spans[pacing] = queue.arrivals[-1] - queue.arrivals[0]
    assert spans[()] >= (SECONDS - 1) - 1.0, spans
    assert spans[("--fast",)] < spans[()], spans


async def test_platform_reaches_the_admin_feed(detector: Detector, tmp_path: Path) -> None:
    """``--platform`` is the call's StreamConfig.platform: the admin feed (what the console
    lists) carries it with the call id; without the flag it is ``cli``; a name the server
    would refuse is a usage error before anything is sent."""
    from client import AsyncDetectionClient

    wav = str(_wav(tmp_path, 2.0))
    async with serving(detector, admin_token="admin-1", auth_token="stream-1") as running:
        target = f"127.0.0.1:{running.port}"
        opened: dict[str, str] = {}
        ready = asyncio.Event()

        async def watch() -> None:
            async with AsyncDetectionClient(target, token="admin-1") as admin:
                async for event in admin.watch_calls():
                    ready.set()
                    if event.HasField("opened"):
                        opened[event.call_id] = event.opened.platform

        watcher = asyncio.create_task(watch())
        await asyncio.wait_for(ready.wait(), 30)
        common = ("stream", wav, "--server", target, "--token", "stream-1", "--fast", "--json")
        code, _, err = await _client(*common, "--call-id", "p-1", "--platform", "asterisk")
        assert code in (0, 3), err
        code, _, err = await _client(*common, "--call-id", "p-2")
        assert code in (0, 3), err
        code, _, err = await _client(*common, "--call-id", "p-3", "--platform", "x" * 65)
        assert code == 2 and "platform" in err
        await wait_until(lambda: len(opened) == 2, "both calls in the feed", 30)
        watcher.cancel()
    assert opened == {"p-1": "asterisk", "p-2": "cli"}
