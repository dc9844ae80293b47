"""The server under test, started as ``make run`` starts it, through
:class:`devstack.Stack`; and what the bench reads from it while it runs.

The flags are read from the Makefile's ``run`` recipe itself (only ``--listen`` is replaced by
a free port, and ``--metrics-port`` added to watch the server drain between trials), so that
the figures describe what ``make run`` gives, defaults included (``--diarization auto``: on
for MIXED calls when the committed checkpoint is there), and cannot drift from it. The Redis
backend, a comparison rather than the product's default, swaps only ``--queue``.
"""

from __future__ import annotations

import math
import re
import shlex
import time
import urllib.request

from devstack import ROOT, Stack, free_port

MAKEFILE = ROOT / "Makefile"


def make_run_flags(makefile: str | None = None) -> list[str]:
    """The flags of ``python -m server`` in the Makefile's ``run`` recipe, ``--listen`` and
    ``--queue`` (with their values) left out: the stack sets those."""
    text = makefile if makefile is not None else MAKEFILE.read_text()
    match = re.search(r"^run:.*\n\t(.*)-m server (.*)$", text, re.MULTILINE)
    if match is None:
        raise ValueError("no `python -m server ...` recipe under `run:` in the Makefile")
    words = shlex.split(match.group(2))
    flags: list[str] = []
    i = 0
    while i < len(words):
        name, _, value = words[i].partition("=")
        takes_value = not value and i + 1 < len(words) and not words[i + 1].startswith("--")
        if name not in ("--listen", "--queue"):
            flags += words[i : i + 2] if takes_value else [words[i]]
        i += 2 if takes_value else 1
    return flags


def make_stack(backend: str, workers: int = 1) -> Stack:
    """The server of ``make run`` (``backend`` inprocess) or the same flags over a private
    redis-server and ``workers`` workers, logging to files, with a metrics port."""
    flags = make_run_flags()
    model = flags[flags.index("--model") + 1] if "--model" in flags else "default"
    return Stack(queue=backend, model=model, workers=workers if backend == "redis" else 0,
                 metrics_port=free_port(), server_args=flags, worker_args=["--device", "cpu"],
                 consumer_prefix="bench", logs=True)


def scrape(url: str) -> dict[str, float]:
    """The server's window-latency histogram (cumulative buckets by ``le``, ``count``, ``sum``)
    and its open-stream and queue-depth gauges; empty when it does not answer."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:
            text = reply.read().decode()
    except OSError:
        return {}
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if family.name in ("callshield_streams_open", "callshield_queue_depth"):
                out[family.name] = s.value
            elif family.name != "callshield_window_latency_seconds":
                continue
            elif s.name.endswith("_bucket"):
                out[s.labels["le"]] = s.value
            elif s.name.endswith("_count"):
                out["count"] = s.value
            elif s.name.endswith("_sum"):
                out["sum"] = s.value
    return out


def histogram_stats(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """Windows, p50 (interpolated within buckets, as PromQL's histogram_quantile) and mean, in
    ms, of the server's own latency (chunk arriving -> result going out) between two scrapes."""
    count = after.get("count", 0.0) - before.get("count", 0.0)
    if count <= 0:
        return {"server_windows": 0.0, "server_p50_ms": math.nan, "server_mean_ms": math.nan}
    bounds = sorted((float(le), after[le] - before.get(le, 0.0))
                    for le in after if le[:1].isdigit() or le == "+Inf")
    rank, lower, prev, p50 = 0.5 * count, 0.0, 0.0, math.nan
    for upper, cumulative in bounds:
        if cumulative >= rank:
            p50 = lower if math.isinf(upper) else (
                lower + (upper - lower) * (rank - prev) / max(cumulative - prev, 1e-12))
            break
        lower, prev = upper, cumulative
    mean = (after.get("sum", 0.0) - before.get("sum", 0.0)) / count
    return {"server_windows": count, "server_p50_ms": p50 * 1000, "server_mean_ms": mean * 1000}


def wait_idle(url: str, within: float = 60.0) -> float:
    """Until the server holds no stream and no queued window (an overloaded trial leaves work
    behind: the next one must not pay for it); returns the seconds waited."""
    started = time.monotonic()
    while time.monotonic() - started < within:
        state = scrape(url)
        if not state.get("callshield_streams_open", 0) and not state.get(
                "callshield_queue_depth", 0):
            break
        time.sleep(0.5)
    return time.monotonic() - started
