"""Building the configured queue backend; Redis is imported only when asked for, so the
embedded server needs no broker libraries at import time."""

from __future__ import annotations

from models.inference import Detector
from server.config import ServerConfig
from server.queue.base import InferenceQueue
from server.queue.inprocess import InProcessQueue


def make_queue(config: ServerConfig, detector: Detector) -> InferenceQueue:
    if config.queue == "inprocess":
        return InProcessQueue(
            detector, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000
        )
    if config.queue == "redis":
        from server.queue.redis_queue import RedisQueue

        return RedisQueue(config.redis_url, config.model)
    raise ValueError(f"unknown queue backend {config.queue!r}; use inprocess or redis")
