"""``make bench-memory``: the server's RSS across long calls, abandoned streams and a huge
``Detect``, with the defaults of ``make run`` (in-process queue, diarization on).

Writes ``bench/results/memory.{json,md}``. Steps, each against one ``python -m server``
process (its RSS from ``/proc``):

1. a 1-minute MIXED call (warm-up), then a ``--minutes`` call sent as fast as flow control
   allows, 300 streams opened with a config and half a second of audio then cancelled, and
   another long call: what each leaves behind;
2. 1000 streams opened without a config over 4 connections, dropped after 3 s;
3. a ``Detect`` of one hour of 48 kHz silence in a ~0.5 MB FLAC with a 30 s deadline, while a
   real-time MIXED stream runs beside it: peak RSS, what stays after, the server's CPU in the
   second and the five seconds after the deadline, and the stream's window latency (from the
   window's end to its result) against the same stream run alone just before.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from bench import page

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

import grpc  # noqa: E402
import numpy as np  # noqa: E402
import soundfile  # noqa: E402

from callshield.v1 import detection_pb2 as pb  # noqa: E402
from callshield.v1 import detection_pb2_grpc as pb_grpc  # noqa: E402
from devstack import Stack, noise_pcm  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
OWN = [("grpc.use_local_subchannel_pool", 1)]  # a TCP connection of its own per channel


def rss_mb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS"):
            return int(line.split()[1]) // 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def config(call_id: str, interim: bool = False) -> pb.StreamConfig:
    return pb.StreamConfig(encoding=pb.AUDIO_ENCODING_LINEAR16, sample_rate_hz=8000, channels=1,
                           channel_mode=pb.CHANNEL_MODE_MIXED, call_id=call_id,
                           interim_results=interim)


async def fast_call(target: str, minutes: int) -> None:
    pcm = noise_pcm(60, 8000)

    async def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamDetectRequest(config=config("long"))
        for _ in range(minutes):
            for i in range(0, pcm.shape[0], 800):
                yield pb.StreamDetectRequest(audio=pcm[i : i + 800].tobytes())

    async with grpc.aio.insecure_channel(target, OWN) as channel:
        async for _ in pb_grpc.DetectionServiceStub(channel).StreamDetect(requests()):
            pass


async def abandoned(target: str, count: int, with_config: bool) -> None:
    channels = [grpc.aio.insecure_channel(target, OWN) for _ in range(4)]
    calls = []
    for k in range(count):
        call = pb_grpc.DetectionServiceStub(channels[k % 4]).StreamDetect()
        if with_config:
            await call.write(pb.StreamDetectRequest(config=config(f"ab{k}")))
            await call.write(pb.StreamDetectRequest(audio=noise_pcm(0.5, 8000).tobytes()))
            call.cancel()
        calls.append(call)
    await asyncio.sleep(3)
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close()


async def realtime_stream(target: str, seconds: float) -> list[float]:
    """Window latency (s): result arrival minus the call time of the window's end."""
    pcm = noise_pcm(seconds, 8000)
    latencies: list[float] = []
    t0 = time.perf_counter()

    async def requests():  # type: ignore[no-untyped-def]
        yield pb.StreamDetectRequest(config=config("rt", interim=True))
        for i in range(0, pcm.shape[0], 800):
            await asyncio.sleep(max(0.0, t0 + (i + 800) / 8000 - time.perf_counter()))
            yield pb.StreamDetectRequest(audio=pcm[i : i + 800].tobytes())

    async with grpc.aio.insecure_channel(target, OWN) as channel:
        async for r in pb_grpc.DetectionServiceStub(channel).StreamDetect(requests()):
            if r.HasField("window"):
                latencies.append(time.perf_counter() - (t0 + r.window.end_seconds))
    return sorted(latencies)


def _p(values: list[float], q: float) -> float:
    return round(values[min(len(values) - 1, int(q * len(values)))] * 1000, 1)


async def huge_detect(target: str, pid: int) -> dict[str, Any]:
    buffer = io.BytesIO()
    soundfile.write(buffer, np.zeros((48000 * 3600, 1), np.int16), 48000, format="FLAC",
                    subtype="PCM_16")
    data = buffer.getvalue()
    alone = await realtime_stream(target, 20)
    base, peak, done = rss_mb(pid), [rss_mb(pid)], asyncio.Event()

    async def sample() -> None:
        while not done.is_set():
            peak.append(rss_mb(pid))
            await asyncio.sleep(0.2)

    sampler = asyncio.create_task(sample())
    beside = asyncio.create_task(realtime_stream(target, 45))
    await asyncio.sleep(3)
    options = [*OWN, ("grpc.max_send_message_length", 64 << 20)]
    async with grpc.aio.insecure_channel(target, options) as channel:
        try:
            await pb_grpc.DetectionServiceStub(channel).Detect(pb.DetectRequest(audio=data),
                                                              timeout=30)
            status = "OK"
        except grpc.aio.AioRpcError as e:
            status = e.code().name
    c0 = cpu_seconds(pid)
    await asyncio.sleep(1.0)
    c1 = cpu_seconds(pid)
    await asyncio.sleep(5.0)
    c2 = cpu_seconds(pid)
    with_detect = await beside
    done.set()
    await sampler
    return {"flac_bytes": len(data), "status": status, "rss_base_mb": base,
            "rss_peak_mb": max(peak), "rss_after_mb": rss_mb(pid),
            "cpu_first_second_after": round(c1 - c0, 2),
            "cpu_next_5_seconds": round(c2 - c1, 2),
            "stream_alone_p50_ms": _p(alone, 0.5), "stream_alone_p99_ms": _p(alone, 0.99),
            "stream_beside_p50_ms": _p(with_detect, 0.5),
            "stream_beside_p99_ms": _p(with_detect, 0.99)}


async def run(minutes: int) -> dict[str, Any]:
    stack = Stack(queue="inprocess", server_args=["--diarization", "auto"])
    stack.start()
    try:
        pid = next(p.pid for name, p in stack.procs if name == "server")
        out: dict[str, Any] = {"minutes": minutes}
        await fast_call(stack.target, 1)
        out["after_warm_up_mb"] = rss_mb(pid)
        await fast_call(stack.target, minutes)
        out["after_long_call_mb"] = rss_mb(pid)
        await abandoned(stack.target, 300, with_config=True)
        await asyncio.sleep(10)
        out["after_300_abandoned_mb"] = rss_mb(pid)
        await fast_call(stack.target, minutes)
        out["after_second_long_call_mb"] = rss_mb(pid)
        await abandoned(stack.target, 1000, with_config=False)
        await asyncio.sleep(2)
        out["after_1000_configless_mb"] = rss_mb(pid)
        out["detect"] = await huge_detect(stack.target, pid)
        return out
    finally:
        stack.stop()


def markdown(r: dict[str, Any]) -> str:
    d = r["detect"]
    rows = [("1-minute call (warm-up)", r["after_warm_up_mb"], ""),
            (f"{r['minutes']}-minute call", r["after_long_call_mb"],
             r["after_long_call_mb"] - r["after_warm_up_mb"]),
            ("300 abandoned streams", r["after_300_abandoned_mb"],
             r["after_300_abandoned_mb"] - r["after_long_call_mb"]),
            (f"another {r['minutes']}-minute call", r["after_second_long_call_mb"],
             r["after_second_long_call_mb"] - r["after_300_abandoned_mb"]),
            ("1000 streams without a config", r["after_1000_configless_mb"],
             r["after_1000_configless_mb"] - r["after_second_long_call_mb"])]
    lines = ["# Server memory (`make bench-memory`)", "",
             "`python -m server` as `make run` starts it (in-process queue, diarization on).", "",
             "| after | RSS MB | change MB |", "|---|---:|---:|"]
    lines += [f"| {a} | {b} | {c if c == '' else f'{c:+d}'} |" for a, b, c in rows]
    lines += ["", f"`Detect` of 1 h of 48 kHz silence ({d['flac_bytes']} bytes of FLAC, MIXED, "
              f"diarized), 30 s deadline -> {d['status']}: RSS {d['rss_base_mb']} MB before, "
              f"peak {d['rss_peak_mb']} MB (+{d['rss_peak_mb'] - d['rss_base_mb']}), "
              f"{d['rss_after_mb']} MB after. Server CPU after the deadline: "
              f"{d['cpu_first_second_after']} s in the first second, "
              f"{d['cpu_next_5_seconds']} s in the next five (one real-time stream runs "
              f"beside it). That stream's window latency p50/p99: {d['stream_beside_p50_ms']}"
              f"/{d['stream_beside_p99_ms']} ms beside the Detect, {d['stream_alone_p50_ms']}/"
              f"{d['stream_alone_p99_ms']} ms alone (a diarized window waits for the "
              "diarizer's look-ahead)."]
    return page(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--minutes", type=int, default=30, help="length of the long calls")
    args = p.parse_args()
    result = asyncio.run(run(args.minutes))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=1))
    (RESULTS / "memory.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
