"""Validating a client's StreamConfig into the settings one stream runs with.

Every rule here answers INVALID_ARGUMENT with a message naming the field, so a client
developer sees what to fix without reading server logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from callshield.v1 import detection_pb2 as pb
from models.verdicts import DEFAULT_THRESHOLD
from server.audio import check_format
from server.errors import InvalidArgument

MIN_WINDOW_SECONDS, MAX_WINDOW_SECONDS = 0.5, 10.0
MIN_HOP_SECONDS = 0.25  # smaller hops multiply the load of a stream
DEFAULT_HOP_SECONDS = 1.0
MAX_LABEL_CHARS = 64
MAX_CALL_ID_CHARS = 128


@dataclass(frozen=True)
class StreamSettings:
    encoding: int
    sample_rate: int
    channels: int
    split: bool
    call_id: str
    speakers: tuple[str, ...]  # one per output channel
    window_seconds: float
    hop_seconds: float
    interim_results: bool
    alert_threshold: float
    platform: str = ""  # StreamConfig.platform, shown in the admin feed (server/events.py)


def _labels(config: pb.StreamConfig, split: bool, channels: int) -> tuple[str, ...]:
    labels = tuple(config.party_labels)
    for label in labels:
        if not label or len(label) > MAX_LABEL_CHARS:
            raise InvalidArgument(f"party labels must have 1 to {MAX_LABEL_CHARS} characters")
    if len(set(labels)) != len(labels):
        raise InvalidArgument(f"party labels must be distinct, got {list(labels)}")
    if not split:
        return labels[:1] or ("A",)
    if labels and len(labels) != channels:
        raise InvalidArgument(
            f"SPLIT mode needs one party label per channel: {channels} channel(s), "
            f"{len(labels)} label(s)"
        )
    return labels or ("A", "B")[:channels]


def parse_settings(config: pb.StreamConfig, model_window_seconds: float) -> StreamSettings:
    channels = config.channels or 1
    check_format(config.encoding, config.sample_rate_hz, channels)
    if config.channel_mode not in pb.ChannelMode.values():
        raise InvalidArgument(f"unknown channel_mode {config.channel_mode}; use MIXED or SPLIT")
    split = config.channel_mode == pb.CHANNEL_MODE_SPLIT
    window = config.window_seconds or model_window_seconds
    if not MIN_WINDOW_SECONDS <= window <= MAX_WINDOW_SECONDS:
        raise InvalidArgument(
            f"window_seconds {window} out of range [{MIN_WINDOW_SECONDS}, {MAX_WINDOW_SECONDS}]"
        )
    hop = config.hop_seconds or min(DEFAULT_HOP_SECONDS, window)
    if not MIN_HOP_SECONDS <= hop <= window:
        raise InvalidArgument(f"hop_seconds {hop} out of range [{MIN_HOP_SECONDS}, window]")
    threshold = config.alert_threshold or DEFAULT_THRESHOLD
    if not 0 < threshold < 1 or math.isnan(threshold):
        raise InvalidArgument(f"alert_threshold {threshold} must lie strictly between 0 and 1")
    if len(config.call_id) > MAX_CALL_ID_CHARS:
        raise InvalidArgument(f"call_id longer than {MAX_CALL_ID_CHARS} characters")
    if len(config.platform) > MAX_LABEL_CHARS:
        raise InvalidArgument(f"platform longer than {MAX_LABEL_CHARS} characters")
    return StreamSettings(
        platform=config.platform,
        encoding=config.encoding, sample_rate=config.sample_rate_hz, channels=channels,
        split=split, call_id=config.call_id, speakers=_labels(config, split, channels),
        window_seconds=float(window), hop_seconds=float(hop),
        interim_results=config.interim_results, alert_threshold=float(threshold),
    )
