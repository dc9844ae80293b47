"""The service bench's results: ``bench/results/service.json`` (every trial, every field) and
``bench/results/service.md`` (capacity per channel mode and connection pattern, then the
trials)."""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
from contextlib import suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any

import grpc

from bench import page
from bench.service.driver import P99_LIMIT_S, Capacity, Run
from devstack import ROOT

RESULTS = ROOT / "bench" / "results"
TARGET_STREAMS = 50  # issue 9: real time for 50 calls with the shipped defaults


def machine() -> dict[str, object]:
    """What the figures were measured on: CPU model and count, GPU if any, the load."""
    cpu = platform.processor() or platform.machine()
    with suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = "none"
    if shutil.which("nvidia-smi"):
        with suppress(OSError, subprocess.SubprocessError):
            gpu = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=10,
                                 check=True).stdout.strip() or "none"
    from diarization.models import native_bf16

    return {"cpu": cpu, "cpus": os.cpu_count(), "gpu": gpu, "bf16_in_hardware": native_bf16(),
            "python": platform.python_version(), "grpcio": grpc.__version__,
            "loadavg_at_start": [round(x, 2) for x in os.getloadavg()]}


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _verdict(c: Capacity) -> str:
    if c.streams >= TARGET_STREAMS:
        return "met"
    return "missed" if c.first_failing is not None else "undecided"


def write(runs: list[Run], capacity: dict[tuple[str, str, str], Capacity],
          meta: dict[str, Any], config: dict[str, Any]) -> None:
    """Both files; ``capacity`` by (backend, mode, pattern)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    payload = {
        "meta": meta, "config": config,
        "capacity": [{"backend": b, "mode": m, "pattern": p, **asdict(c)}
                     for (b, m, p), c in capacity.items()],
        "capacity_target_streams": TARGET_STREAMS,
        "p99_limit_s": P99_LIMIT_S,
        "runs": [asdict(r) | {"held": r.held} for r in runs],
    }
    (RESULTS / "service.json").write_text(json.dumps(payload, indent=2) + "\n")
    (RESULTS / "service.md").write_text(markdown(runs, capacity, meta, config))


def markdown(runs: list[Run], capacity: dict[tuple[str, str, str], Capacity],
             meta: dict[str, Any], config: dict[str, Any]) -> str:
    m = meta["machine"]
    lines = [
        "# Service capacity with the shipped defaults (gRPC end to end)", "",
        f"Machine: {m['cpu']}, {m['cpus']} CPUs, GPU {m['gpu']}, bfloat16 in hardware: "
        f"{'yes' if m.get('bf16_in_hardware') else 'no'} (the speaker embeddings run in "
        "bfloat16 where it is, `--diarization-precision auto`); load average at start "
        f"{m['loadavg_at_start']}, at end {meta.get('loadavg_at_end')} (1, 5, 15 min; the "
        "machine is shared: a load above its 2 cores means other work took CPU from the "
        "server during the trials, so the counts below are lower bounds). "
        f"Server: `python -m server {' '.join(meta['server_flags'])}` (the flags of `make run`; "
        "listen port and metrics port set by the bench), queue "
        f"{', '.join(config['backends'])}; diarization of MIXED calls: "
        f"{meta['diarization']}. {meta['duration_min']:.1f} min in all.", "",
        f"Each trial: N concurrent calls, {config['seconds']:g} s of a real call each, 100 ms "
        "LINEAR16 chunks at real-time pace, interim results on, starts staggered over one "
        "hop; MIXED calls send the mono mixture (diarized by the server), SPLIT calls one "
        "party per channel. *per-call*: one gRPC channel (TCP connection) per call; "
        "*shared-4*: all calls round-robin over 4 channels. The client (asyncio SDK) runs "
        "in the bench process on the same machine.", "",
        f"A count is *held* when window p99 <= {P99_LIMIT_S:g} s, every scored window "
        "arrived and no call failed. Window latency: from the moment real time made the chunk "
        "completing the window due to its WindowResult arriving; for diarized MIXED calls "
        "the window is complete only once the diarizer has decided its last second, "
        f"{meta['lookahead_s']:g} s later (its fixed right context), so that is added to the "
        "window's end first (the *raw* columns count from the window's own end). Search: "
        f"{', '.join(map(str, config['ladder']))} while held, then one bisection.", "",
        "| queue | mode | connections | calls held | first not held | p50 / p99 ms at "
        "the count held | raw p50 ms | target >= 50 |",
        "|---|---|---|---:|---:|---|---:|---|",
    ]
    for (b, mode, pattern), c in capacity.items():
        at = next((r for r in runs if (r.backend, r.mode, r.pattern, r.streams) ==
                   (b, mode, pattern, c.streams)), None)
        lines.append(
            f"| {b} | {mode.upper()} | {pattern} | {c.streams} | "
            f"{c.first_failing if c.first_failing is not None else '-'} | "
            f"{_fmt(at.p50_ms) if at else '-'} / {_fmt(at.p99_ms) if at else '-'} | "
            f"{_fmt(at.raw_p50_ms) if at else '-'} | {_verdict(c)} |")
    lines += [
        "", "## Trials", "",
        "*conn*: TCP connections the server held; *missing*: windows scored but not back "
        f"when the trial ended ({config['drain_slack_s']:g} s after the audio); *send lag*: "
        "worst delay of a chunk behind real time (flow control or a busy client); *client "
        "lag*: p99 of the bench's event-loop wake-up delay; *server p50*: the server's own "
        "histogram (chunk arriving -> result out): when it is close to the client's p50, the "
        "time is spent in the server, not in transport; *diarized*: MIXED calls whose "
        "windows named two or more speakers; *load*: 1-min load average before the trial.", "",
        "| queue | mode | connections | calls | conn | windows | missing | p50 ms | p95 ms "
        "| p99 ms | max ms | raw p50 ms | server p50 ms | first verdict p50 s | send lag ms "
        "| client lag ms | diarized | errors | held | load |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:"
        "|---|---|---:|",
    ]
    for r in runs:
        errors = ", ".join(f"{k} {v}" for k, v in r.error_codes.items()) or "0"
        lines.append(
            f"| {r.backend} | {r.mode.upper()} | {r.pattern} | {r.streams} | {r.connections} "
            f"| {r.windows} | {r.missing_windows} | {_fmt(r.p50_ms)} | {_fmt(r.p95_ms)} "
            f"| {_fmt(r.p99_ms)} | {_fmt(r.max_ms)} | {_fmt(r.raw_p50_ms)} "
            f"| {_fmt(r.server.get('server_p50_ms'))} | {_fmt(r.first_verdict_p50_s, 2)} "
            f"| {_fmt(r.max_send_lag_ms)} | {_fmt(r.client_lag_p99_ms, 1)} "
            f"| {r.diarized_streams if r.mode == 'mixed' else '-'} | {errors} "
            f"| {'yes' if r.held else 'no'} | {r.loadavg_1m:.1f} |")
    notes = meta.get("notes") or []
    if notes:
        lines += ["", "## Notes", "", *[f"- {n}" for n in notes]]
    sources = meta["audio_sources"]
    lines += ["", "Audio: " + ", ".join(f"{name} (SPLIT from {how})"
                                        for name, how in sources.items()) + "."]
    return page(lines)
