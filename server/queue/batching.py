"""One batched forward over windows from many streams: the code every backend shares."""

from __future__ import annotations

from collections.abc import Sequence

from models.inference import Detector
from server.queue.base import WindowJob, WindowScore


def score_jobs(detector: Detector, jobs: Sequence[WindowJob]) -> list[WindowScore]:
    """Score ``jobs`` in as few forwards as their lengths allow (equal lengths batch
    together; early windows of a stream are shorter than full ones)."""
    scores = detector.scores([job.audio for job in jobs], batch_size=max(1, len(jobs)))
    probabilities = detector.spoof_probability(scores)
    return [
        WindowScore(job.job_id, float(s), float(p), detector.name)
        for job, s, p in zip(jobs, scores, probabilities, strict=True)
    ]
