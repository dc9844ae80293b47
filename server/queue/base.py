"""The contract between the stream pipeline and whatever runs the model."""

from __future__ import annotations

import abc
from dataclasses import dataclass

import numpy as np


class QueueUnavailable(RuntimeError):
    """No worker or no broker can take jobs now (health goes NOT_SERVING)."""


@dataclass(frozen=True)
class WindowJob:
    """One scoring window: mono float32 audio at the model's sample rate."""

    job_id: str
    stream_id: str
    audio: np.ndarray


@dataclass(frozen=True)
class WindowScore:
    job_id: str
    score: float  # raw model score, higher = more likely bona fide
    spoof_probability: float  # calibrated, in [0, 1]
    model: str


class InferenceQueue(abc.ABC):
    """Submit windows, await their scores. Implementations batch across streams."""

    @abc.abstractmethod
    async def start(self) -> None: ...

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    async def submit(self, job: WindowJob) -> WindowScore:
        """Score one window. Raises :class:`QueueUnavailable` when it cannot be accepted."""

    @abc.abstractmethod
    async def healthy(self) -> bool:
        """True while jobs can be scored: the broker is reachable and a worker is alive."""

    @abc.abstractmethod
    def depth(self) -> int:
        """Windows accepted but not yet answered (for metrics and overload decisions)."""
