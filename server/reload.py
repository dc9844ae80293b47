"""Loading a new model (or the same file again) into a running server without dropping calls.

Why: an operator recalibrates from the fraud desk's verdicts (``python -m models calibrate``)
or adapts a model to their lines, and the calls in progress must not end for it. Two ways in:
``SIGHUP`` to ``python -m server`` (reloads the path it serves, e.g. after the file was
replaced) and the admin RPC ``ReloadModel`` (the same, or a new path), authorized by the
admin token like ``WatchCalls``.

What a reload does: the new checkpoint is loaded and scores one window of silence in a worker
thread (the event loop goes on serving streams), and is refused, the old model still serving,
when it does not load or score, or when its sample rate or window length differ from the
serving model's (open streams were cut for those). Only then is it swapped in: the servicer
(new streams' windows, ``Detect``, ``GetModel``), the admin feed's model name (calls opened
from now on) and the in-process queue, which reads its detector once per batch, so a batch
being scored finishes on the old model and the next batch, of any stream, uses the new one.
Calls in progress go on; their windows from then on are scored by the new model.

With the Redis queue the workers score, and each holds its own model: the server's reload
changes what ``GetModel`` and the feed report, and the response says ``queue: redis``; each
worker reloads its own ``--model`` path on ``SIGHUP`` (``server.worker``), with the same
checks. Jobs carry no model version, so during a rolling reload windows may be scored by
either model; the job stream's name (the ``--model`` string) stays the same.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
import numpy as np
import structlog

from callshield.v1 import detection_pb2 as pb
from models.inference import Detector, load_detector
from server.events import RELOAD_METHOD, require_admin

if TYPE_CHECKING:
    from server.service import DetectionServicer

__all__ = ["RELOAD_METHOD", "ModelReloader", "ReloadRefused", "load_checked", "reload_rpc"]
log = structlog.get_logger("callshield.reload")


class ReloadRefused(RuntimeError):
    """The new model cannot serve; the old one still does."""


def check_compatible(old: Detector, new: Detector) -> None:
    """Raise :class:`ReloadRefused` when ``new`` cannot take over ``old``'s open streams."""
    if new.sample_rate != old.sample_rate:
        raise ReloadRefused(f"the new model runs at {new.sample_rate} Hz, the serving one at "
                            f"{old.sample_rate} Hz: restart the server to change the rate")
    if abs(new.window_seconds - old.window_seconds) > 1e-9:
        raise ReloadRefused(f"the new model's window is {new.window_seconds:g} s, the serving "
                            f"one's {old.window_seconds:g} s: restart the server to change it")


def load_checked(path: str, device: str, half: bool = False,
                 serving: Detector | None = None) -> Detector:
    """Load ``path`` and score one window of silence with it (blocking: run it in a
    thread); :class:`ReloadRefused` with the reason when it cannot serve."""
    try:
        detector = load_detector(path, device=device, half=half)
        if serving is not None:
            check_compatible(serving, detector)
        detector.scores([np.zeros(detector.window_samples, np.float32)])
    except ReloadRefused:
        raise
    except Exception as exc:  # any failure to load or score is the file's, reported as such
        raise ReloadRefused(f"cannot load {path!r}: {type(exc).__name__}: {exc}") from exc
    return detector


def model_info(d: Detector) -> pb.GetModelResponse:
    return pb.GetModelResponse(
        name=d.name, version=d.version, architecture=d.architecture,
        sample_rate_hz=d.sample_rate, window_seconds=d.window_seconds,
        calibration=pb.Calibration(scale=d.calibration.scale, bias=d.calibration.bias))


@dataclass
class Reload:
    previous: Detector
    detector: Detector
    path: str


class ModelReloader:
    """Swaps the model of one servicer (and of its in-process queue); one reload at a time."""

    def __init__(self, servicer: DetectionServicer, path: str) -> None:
        self.servicer = servicer
        self.path = path  # what the serving model was loaded from (a name or a path)
        self._lock = asyncio.Lock()

    async def reload(self, path: str = "") -> Reload:
        async with self._lock:
            path = path or self.path
            servicer = self.servicer
            old = servicer.detector
            try:
                new = await asyncio.to_thread(load_checked, path, servicer.config.device,
                                              False, old)
            except ReloadRefused as exc:
                log.warning("model reload refused", path=path, reason=str(exc),
                            serving=f"{old.name} {old.version}")
                raise
            servicer.detector = new
            queue_detector = getattr(servicer.queue, "detector", None)
            if queue_detector is not None:  # the in-process queue: next batch on the new one
                servicer.queue.detector = new  # type: ignore[attr-defined]
            servicer.events.model = f"{new.name} {new.version}".strip()
            self.path = path
            log.info("model reloaded", path=path, model=new.name, version=new.version,
                     previous=f"{old.name} {old.version}", open_streams=len(servicer.sessions))
            return Reload(old, new, path)


async def reload_rpc(servicer: DetectionServicer, request: pb.ReloadModelRequest,
                     context: grpc.aio.ServicerContext) -> pb.ReloadModelResponse:
    """The body of ``ReloadModel``: the admin token, then the reload."""
    admin_token = servicer.config.admin_token
    await require_admin(context, admin_token, "ReloadModel")
    reloader: ModelReloader | None = getattr(servicer, "reloader", None)
    if reloader is None:  # a servicer built without start_server: its configured model
        reloader = ModelReloader(servicer, servicer.config.model)
        servicer.reloader = reloader  # type: ignore[attr-defined]
    try:
        done = await reloader.reload(request.path)
    except ReloadRefused as exc:
        await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                            f"model not reloaded, the previous one still serves: {exc}")
        raise  # pragma: no cover - abort raises
    return pb.ReloadModelResponse(model=model_info(done.detector),
                                  previous=model_info(done.previous), path=done.path,
                                  queue=servicer.config.queue)
