"""Prometheus metrics of the plugins, labelled by ``plugin`` (audiosocket, twilio, freeswitch,
audiohook, siprec), and their ``/metrics`` endpoint (``--metrics-port``).

They live in the process-wide default registry, which in ``python -m plugins`` holds these
series and the client library's process collectors only: the plugins import nothing from the
server, whose module would register its own series (all zero here) in the same registry.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

FORWARD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.5)

CALLS_OPEN = Gauge("callshield_plugin_calls_open", "Platform connections streaming", ["plugin"])
CALLS = Counter("callshield_plugin_calls_total", "Platform connections accepted", ["plugin"])
FRAMES = Counter("callshield_plugin_frames_total", "Audio frames received", ["plugin"])
PROTOCOL_ERRORS = Counter(
    "callshield_plugin_protocol_errors_total",
    "Connections closed for a protocol error, by reason", ["plugin", "reason"],
)
DETECTOR_ERRORS = Counter(
    "callshield_plugin_detector_errors_total",
    "Detection streams that failed (detector gone, stalled or refusing)", ["plugin"],
)
ALERTS = Counter(
    "callshield_plugin_alerts_total",
    "Alert deliveries, by channel (platform, webhook) and outcome",
    ["plugin", "channel", "outcome"],
)
SUMMARIES = Counter(
    "callshield_plugin_summaries_total",
    "call_summary webhook deliveries at a call's normal end, by outcome", ["plugin", "outcome"],
)
FORWARD_SECONDS = Histogram(
    "callshield_plugin_frame_forward_seconds",
    "Added latency: a frame read off the platform socket -> handed to the gRPC stream",
    ["plugin"], buckets=FORWARD_BUCKETS,
)
RTP_DROPPED = Counter(
    "callshield_plugin_rtp_dropped_total",
    "SIPREC RTP packets dropped, by reason (foreign_ssrc, source, payload, late, malformed)",
    ["plugin", "reason"],
)
RTP_LOST_SECONDS = Counter(
    "callshield_plugin_rtp_lost_seconds_total",
    "SIPREC audio lost in transit and filled with silence", ["plugin"],
)


def observe_forward(plugin: str, seconds: float) -> None:
    """A frame's added latency, read off the platform socket -> handed to the gRPC stream."""
    FORWARD_SECONDS.labels(plugin).observe(seconds)


def serve(port: int, host: str = "127.0.0.1") -> None:
    """``/metrics`` on ``host:port`` (loopback unless an operator says otherwise), served by a
    daemon thread for the life of the process."""
    start_http_server(port, host)
