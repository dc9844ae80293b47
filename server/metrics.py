"""Prometheus metrics of the service, served over HTTP on ``--metrics-port``.

Metrics live in the process-wide default registry so that the queue, the sessions and the
servicer update them without passing a registry around.
"""

from __future__ import annotations

from wsgiref.simple_server import WSGIServer

from prometheus_client import Counter, Gauge, Histogram, start_http_server

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

STREAMS_OPEN = Gauge("callshield_streams_open", "StreamDetect calls in progress")
STREAMS_REJECTED = Counter(
    "callshield_streams_rejected_total", "Streams refused, by reason", ["reason"]
)
STREAMS_TIMED_OUT = Counter(
    "callshield_streams_timed_out_total",
    "Streams closed because their client sent nothing in time, by what was awaited",
    ["awaited"],
)
WINDOWS_SCORED = Counter("callshield_windows_scored_total", "Windows scored")
QUEUE_DEPTH = Gauge("callshield_queue_depth", "Windows accepted but not yet scored")
BATCH_SIZE = Histogram(
    "callshield_batch_size", "Windows per forward pass (in-process backend)",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
)
INFERENCE_SECONDS = Histogram(
    "callshield_inference_seconds", "Duration of one batched forward", buckets=LATENCY_BUCKETS
)
WINDOW_LATENCY_SECONDS = Histogram(
    "callshield_window_latency_seconds",
    "End to end: the chunk completing a window arriving -> its result going out",
    buckets=LATENCY_BUCKETS,
)
ALERTS = Counter("callshield_alerts_total", "Spoof alerts raised")
DETECT_DECODING = Gauge(
    "callshield_detect_decoding", "Detect recordings being decoded and resampled now")
DETECT_DECODE_SECONDS = Histogram(
    "callshield_detect_decode_seconds",
    "Decoding and resampling one Detect recording (refused and cancelled ones included)",
    buckets=LATENCY_BUCKETS + (30.0, 60.0),
)
DETECT_CANCELLED = Counter(
    "callshield_detect_cancelled_total",
    "Detect work stopped early because the client cancelled or its deadline passed, by stage",
    ["stage"],
)


def observe_batch(size: int, seconds: float) -> None:
    BATCH_SIZE.observe(size)
    INFERENCE_SECONDS.observe(seconds)


def listen_address(listen: str, port: int = 0) -> tuple[str, int]:
    """``--metrics-listen HOST:PORT`` wins; a bare ``--metrics-port`` binds loopback only, so
    metrics are exposed to other machines only when an operator says so."""
    if listen:
        host, _, number = listen.rpartition(":")
        return host or "127.0.0.1", int(number)
    return "127.0.0.1", port


def serve(port: int, addr: str = "127.0.0.1") -> WSGIServer:
    """Start the /metrics HTTP endpoint in a daemon thread; ``shutdown()`` stops it."""
    httpd, _thread = start_http_server(port, addr)
    return httpd
