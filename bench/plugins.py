"""``make bench-plugins``: what the telephony plugins add, on this machine.

For each plugin, ``calls`` concurrent peers replay noise-as-speech at real-time pacing (20 ms
frames) through the real plugin to a real in-process server with the default model. Reported:
the added latency per 20 ms frame, plugin to detector (frame read off the platform socket ->
handed to the gRPC stream), p50 and p99, and the most concurrent calls held, meaning every
call finished with a summary and p99 stayed under one frame (20 ms). For SIPREC a frame is
one RTP packet (20 ms of PCMU per stream), its latency counted from the arrival of the
packet that released the audio (the jitter buffer holds a packet until it is in order). Writes
``bench/results/plugins.json`` and ``bench/results/plugins.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import uuid
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

from bench.plugin_peers import (  # noqa: E402
    AUDIOHOOK_KEY,
    TWILIO_TOKEN,
    Legs,
    audiohook_call,
    audiosocket_call,
    back_ends,
    freeswitch_call,
    plugin_stack,
    siprec_call,
    twilio_call,
    ws_url,
)
from devstack import noise_pcm, serving  # noqa: E402
from models.inference import load_detector  # noqa: E402
from plugins.metrics import observe_forward  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
PLUGINS = ("audiosocket", "twilio", "freeswitch", "audiohook", "siprec")
FRAME_SECONDS = 0.02


class ForwardLatencies:
    """Every frame's added latency (plugin -> gRPC stream) beside the production histogram,
    whose buckets are too coarse for a p99 under one frame."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    def __call__(self, plugin: str, seconds: float) -> None:
        observe_forward(plugin, seconds)
        self.seconds.append(seconds)


async def _level(detector: Any, plugin: str, calls: int, seconds: float) -> dict[str, Any]:
    pcm = noise_pcm(seconds, channels=2)
    legs = Legs(np.ascontiguousarray(pcm[:, 0]), np.ascontiguousarray(pcm[:, 1]))
    forward = ForwardLatencies()
    async with serving(detector) as server, back_ends() as (ami, http), \
            plugin_stack(server.port, ami, http, observe_forward=forward) as running:
        def one(i: int) -> Any:
            if plugin == "audiosocket":
                return audiosocket_call(running.ports["audiosocket"], str(uuid.uuid4()), legs)
            if plugin == "twilio":
                return twilio_call(ws_url(running, "/twilio"), TWILIO_TOKEN, f"CA{i}", legs)
            if plugin == "freeswitch":
                return freeswitch_call(ws_url(running, "/fork"), str(uuid.uuid4()), legs)
            if plugin == "siprec":
                return siprec_call(running.ports["siprec"], legs)
            return audiohook_call(ws_url(running, "/audiohook"), AUDIOHOOK_KEY, f"c{i}", legs)

        outcomes = await asyncio.gather(*(one(i) for i in range(calls)), return_exceptions=True)
        latencies = np.array(forward.seconds or [0.0])
    errors = sum(isinstance(o, BaseException) for o in outcomes)
    p50, p99 = (float(np.percentile(latencies, q)) * 1000 for q in (50, 99))
    return {"plugin": plugin, "calls": calls, "errors": errors, "frames": int(latencies.size),
            "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
            "held": errors == 0 and p99 < FRAME_SECONDS * 1000}


async def run(levels: list[int], seconds: float) -> dict[str, Any]:
    detector = load_detector("default")
    load_before = [round(x, 2) for x in os.getloadavg()]
    rows = []
    for plugin in PLUGINS:
        for calls in levels:
            row = await _level(detector, plugin, calls, seconds)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not row["held"]:
                break
    held = {p: max([r["calls"] for r in rows if r["plugin"] == p and r["held"]], default=0)
            for p in PLUGINS}
    # the 1, 5 and 15 minute load averages before and after: other jobs on a shared machine
    # take CPU from the calls, and a reader must be able to tell
    return {"machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "platform": platform.platform(), "load_before": load_before,
                        "load_after": [round(x, 2) for x in os.getloadavg()]},
            "seconds_per_call": seconds, "levels": levels, "rows": rows,
            "calls_held": held}


def markdown(result: dict[str, Any]) -> str:
    lines = ["# Plugins: added latency per 20 ms frame and concurrent calls", "",
             f"{result['machine']['cpus']} CPUs, {result['seconds_per_call']} s per call, "
             "real-time pacing, in-process server with the default model.",
             *([f"Load average (1, 5, 15 min) before: {result['machine']['load_before']}, "
                f"after: {result['machine']['load_after']}."]
               if "load_before" in result["machine"] else []),
             "SIPREC: one recording session (INVITE, two PCMU streams, BYE) per call with the "
             "shipped limits; a frame is one RTP packet, its latency counted from the arrival "
             "of the packet that released it.", "",
             "| plugin | calls | frames | p50 ms | p99 ms | errors | held |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['plugin']} | {r['calls']} | {r['frames']} | {r['p50_ms']} | "
                     f"{r['p99_ms']} | {r['errors']} | {'yes' if r['held'] else 'no'} |")
    lines += ["", "Most concurrent calls held (of the levels tried): " + ", ".join(
        f"{p} {n}" for p, n in result["calls_held"].items()), ""]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.plugins")
    p.add_argument("--levels", default="10,25,50", help="concurrent calls to try, ascending")
    p.add_argument("--seconds", type=float, default=6.0, help="audio per call")
    args = p.parse_args()
    result = asyncio.run(run([int(x) for x in args.levels.split(",")], args.seconds))
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "plugins.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / "plugins.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
