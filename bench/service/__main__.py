"""``python -m bench.service``: for each channel mode (MIXED, diarized by the server's
default; SPLIT) and connection pattern (one channel per call; all calls over 4 channels),
the largest number of real-time calls held with window p99 <= 1 s, by a coarse search that
fits a time budget (about 12 minutes on a 2-core machine; ``make bench`` runs
``bench-models`` first)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
import time
from collections.abc import Sequence
from typing import Any

from bench.service import report
from bench.service.audio import AudioPool
from bench.service.driver import (
    DRAIN_SLACK_S,
    MODES,
    PATTERNS,
    Capacity,
    Run,
    find_capacity,
    trial,
    warm_up,
)
from bench.service.stack import histogram_stats, make_stack, scrape, wait_idle
from devstack import Stack

_T0 = time.monotonic()


def say(message: str) -> None:
    """Progress on stderr, stamped with the seconds since start (for the run-time budget)."""
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


def diarization_state(stack: Stack) -> bool | None:
    """Whether the server diarizes MIXED calls, from its ``serving`` log line."""
    if stack.logdir is None:
        return None
    for line in (stack.logdir / "server.log").read_text(errors="replace").splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if event.get("event") == "serving":
            return bool(event.get("diarization"))
    return None


def lookahead_seconds() -> float:
    """How long after a window's end the streaming diarizer decides its last second: its
    right context, rounded up to its step grid (``diarization.stream.StreamingDiarizerConfig``)."""
    from diarization.stream import StreamingDiarizerConfig

    c = StreamingDiarizerConfig()
    return math.ceil(c.latency_seconds / c.step_seconds - 1e-9) * c.step_seconds


async def bench_backend(backend: str, args: argparse.Namespace, pool: AudioPool,
                        meta: dict[str, Any], runs: list[Run],
                        capacity: dict[tuple[str, str, str], Capacity]) -> None:
    say(f"{backend}: starting the server")
    stack = make_stack(backend, args.workers)
    meta["server_flags"] = list(stack.server_args)
    try:
        await asyncio.to_thread(stack.start)
        port = int(stack.target.rsplit(":", 1)[1])
        diarized = diarization_state(stack)
        meta["diarization"] = {True: "on", False: "OFF", None: "unknown"}[diarized]
        lookahead = lookahead_seconds() if diarized else 0.0
        meta["lookahead_s"] = lookahead
        say(f"{backend}: serving on {stack.target}, diarization {meta['diarization']}")
        await warm_up(stack.target, pool)
        for mode in args.modes:
            for name in args.patterns:

                async def measure(n: int, mode: str = mode, name: str = name) -> Run:
                    before = await asyncio.to_thread(scrape, stack.metrics_url)
                    run = await trial(stack.target, port, pool, backend=backend, mode=mode,
                                      pattern=PATTERNS[name], streams=n, seconds=args.seconds,
                                      lookahead=lookahead if mode == "mixed" else 0.0)
                    after = await asyncio.to_thread(scrape, stack.metrics_url)
                    run.server = histogram_stats(before, after)
                    waited = await asyncio.to_thread(wait_idle, stack.metrics_url)
                    runs.append(run)
                    say(f"{backend} {mode:5s} {name:8s} {n:4d} calls ({run.connections} conn): "
                        f"p50 {run.p50_ms:7.0f} ms  p99 {run.p99_ms:7.0f} ms  raw p50 "
                        f"{run.raw_p50_ms:6.0f} ms  server p50 "
                        f"{run.server['server_p50_ms']:6.0f} ms  missing "
                        f"{run.missing_windows}  errors {run.error_codes or 0}  held "
                        f"{run.held}  load {run.loadavg_1m:.1f}  idle after {waited:.0f} s")
                    return run

                capacity[(backend, mode, name)] = await find_capacity(
                    measure, args.ladder, args.cell_budget, args.resolution)
    finally:
        await asyncio.to_thread(stack.stop)


def _ints(text: str) -> list[int]:
    return [int(s) for s in str(text).split(",") if s.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.service",
                                description=(__doc__ or "").split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="a smoke run of a few minutes: 5 s calls, counts 1 and 2")
    p.add_argument("--backends", default="inprocess",
                   help="comma-separated: inprocess (what make run starts), redis (the same "
                        "flags over a private redis-server and --workers workers: a "
                        "comparison, doubling the run time)")
    p.add_argument("--modes", default=",".join(MODES), help="mixed and/or split")
    p.add_argument("--patterns", default=",".join(PATTERNS), help="per-call and/or shared-4")
    p.add_argument("--seconds", type=float, default=15.0, help="audio per call")
    p.add_argument("--ladder", default="1,5,10,20,50,100",
                   help="counts tried in order while held (100: the default per-client limit, "
                        "half of --max-streams 200, since every call comes from 127.0.0.1)")
    p.add_argument("--resolution", type=int, default=2,
                   help="no bisection when the bracket is this narrow")
    p.add_argument("--cell-budget", type=float, default=180.0,
                   help="seconds per (mode, pattern) after which no new trial starts")
    p.add_argument("--workers", type=int, default=1, help="Redis workers (--backends redis)")
    p.add_argument("--note", action="append", default=[],
                   help="a line for the report's notes (repeatable): how the run was reduced")
    args = p.parse_args(argv)
    if args.quick:
        args.seconds, args.ladder = 5.0, "1,2"
    args.ladder = _ints(args.ladder)
    args.backends = [b for b in args.backends.split(",") if b]
    args.modes = [m for m in args.modes.split(",") if m]
    args.patterns = [n for n in args.patterns.split(",") if n]
    for b in args.backends:
        if b not in ("inprocess", "redis"):
            p.error(f"unknown backend {b!r}: use inprocess and/or redis")
    if not set(args.modes) <= set(MODES) or not set(args.patterns) <= set(PATTERNS):
        p.error(f"modes: {', '.join(MODES)}; patterns: {', '.join(PATTERNS)}")
    if not args.ladder or min(args.ladder) < 1:
        p.error("--ladder needs positive counts")
    return args


async def amain(args: argparse.Namespace) -> None:
    task = asyncio.current_task()
    if task is not None:  # SIGTERM: unwind through every finally, stopping the children
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    meta: dict[str, Any] = {"machine": report.machine(),
                            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    say(f"load average at start: {meta['machine']['loadavg_at_start']}")
    pool = AudioPool(args.seconds)
    meta["audio_sources"] = pool.sources
    runs: list[Run] = []
    capacity: dict[tuple[str, str, str], Capacity] = {}
    for backend in args.backends:
        await bench_backend(backend, args, pool, meta, runs, capacity)
    meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    meta["loadavg_at_end"] = [round(x, 2) for x in os.getloadavg()]
    meta["duration_min"] = (time.monotonic() - _T0) / 60
    meta["notes"] = args.note
    config = vars(args) | {"drain_slack_s": DRAIN_SLACK_S}
    report.write(runs, capacity, meta, config)
    print((report.RESULTS / "service.md").read_text())


def main(argv: Sequence[str] | None = None) -> None:
    os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")
    from server.logs import configure

    configure("warning")
    asyncio.run(amain(parse_args(argv)))


if __name__ == "__main__":
    main()
